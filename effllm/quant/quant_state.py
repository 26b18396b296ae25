"""``QuantState``: a tensor stored as packed blockwise codes plus per-block absmax, and back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm.kernels.blockwise import DEFAULT_BLOCKSIZE, dequantize_blockwise, quantize_blockwise
from effllm.kernels.packing import pack_bits_ref, packed_numel, unpack_bits_ref
from effllm.kernels.quant_maps import make_map


@dataclass
class QuantState:
    """A blockwise-quantized tensor: ``packed`` codes (``bits`` each), fp32 ``absmax`` per block."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    blocksize: int
    map_kind: str
    signed: bool

    @property
    def qmap(self) -> torch.Tensor:
        return make_map(self.map_kind, self.signed, self.bits, self.packed.device)

    def nbytes(self) -> int:
        """Bytes really held: packed codes plus absmax."""
        return self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()

    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes() / max(1, self.shape.numel())


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    blocksize: int = DEFAULT_BLOCKSIZE,
    map_kind: str = "dynamic",
    signed: bool = True,
) -> QuantState:
    """Blockwise-quantize ``x`` with a map of ``2**bits`` entries; codes are packed when ``bits < 8``."""
    qmap = make_map(map_kind, signed, bits, x.device)
    codes, absmax = quantize_blockwise(x, qmap, blocksize)
    packed = codes if bits == 8 else pack_bits_ref(codes, bits)
    assert packed.numel() == packed_numel(x.numel(), bits)
    return QuantState(packed, absmax, x.shape, x.dtype, bits, blocksize, map_kind, signed)


def dequantize(state: QuantState) -> torch.Tensor:
    numel = state.shape.numel()
    codes = state.packed if state.bits == 8 else unpack_bits_ref(state.packed, state.bits, numel)
    flat = dequantize_blockwise(codes, state.absmax, state.qmap, state.blocksize, state.dtype)
    return flat.view(state.shape)
