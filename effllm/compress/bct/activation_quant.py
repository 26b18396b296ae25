"""``ActivationQuantizer``: re-quantizes an intermediate result blockwise, as an integer pipeline would hand it on.

The last dimension is cut into blocks of ``blocksize`` (blocks never straddle two tokens, so no token's scale
depends on another's), each block is quantized with the core's ``quantize_blockwise`` and decoded again: what
the next operation sees is exactly what ``bits``-bit codes plus one fp32 scale per block can represent. When
``blocksize`` does not divide the last dimension, the last dimension is zero-padded to whole blocks (padding
does not change any block's absmax).
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.kernels.blockwise import dequantize_blockwise, quantize_blockwise
from effllm.kernels.quant_maps import make_map

from .config import ActivationSpec


def fake_quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` in blocks along its last dimension; same shape and dtype."""
    width = x.shape[-1]
    pad = -width % blocksize
    rows = x.detach().reshape(-1, width).float()
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    codes, absmax = quantize_blockwise(rows, qmap, blocksize)
    decoded = dequantize_blockwise(codes, absmax, qmap, blocksize).view(rows.shape)
    return decoded[:, :width].reshape(x.shape).to(x.dtype)


class ActivationQuantizer(nn.Module):
    """Identity when ``spec.bits`` is null; otherwise blockwise fake-quantization along the last dimension."""

    def __init__(self, spec: ActivationSpec, signed: bool = True):
        super().__init__()
        self.spec = spec
        self.signed = signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.bits is None:
            return x
        # the map is a constant of the spec, made where it is used (never a buffer: models load on "meta" first)
        qmap = make_map(self.spec.map, self.signed, self.spec.bits, x.device)
        return fake_quantize_blockwise(x, qmap, self.spec.blocksize)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, blocksize={self.spec.blocksize}, map={self.spec.map}, signed={self.signed}"
