"""``ActivationQuantizer``: re-quantizes an intermediate result blockwise, as an integer pipeline would hand it on.

The last dimension is cut into blocks of ``blocksize`` (blocks never straddle two tokens, so no token's scale
depends on another's), each block is quantized as the core's ``quantize_blockwise`` does and decoded again: what
the next operation sees is exactly what ``bits``-bit codes plus one fp32 scale per block can represent. When
``blocksize`` does not divide the last dimension, the last dimension is zero-padded to whole blocks (padding
does not change any block's absmax). The work is one kernel, ``effllm.kernels.requantize.requantize_blockwise``
(Triton on GPUs, the C kernels on CPU), equal bit for bit to quantize-then-dequantize with the core.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.kernels.quant_maps import make_map
from effllm.kernels.requantize import requantize_blockwise

from .config import ActivationSpec


def fake_quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` in blocks along its last dimension; same shape and dtype (detached)."""
    return requantize_blockwise(x, qmap, blocksize)


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
