"""Blockwise-packed weight matmul for CPU tensors: the weight decoded by the C dequantize kernel
(``_blockwise_cpu``), then torch's matmul.

The C kernel decodes the same fp32 values as the reference (one product per weight), so the result is
``blockwise_matmul_ref``'s bit for bit; only the decoding is faster. Differentiable with respect to ``x`` and
``bias`` like the reference (the decoded weight is a constant).
"""

from __future__ import annotations

import torch

from ._blockwise_cpu import dequantize_blockwise_cpu
from .blockwise_matmul import check_blockwise_matmul_args, in_own_order
from .packing import unpack_bits_ref


def blockwise_matmul_cpu(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor, bits: int,
                         blocksize: int, out_features: int, in_features: int, column_major: bool,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., in_features] -> [..., out_features] in ``x``'s dtype: ``x @ W.T + bias`` computed in fp32."""
    check_blockwise_matmul_args(x, codes, scales, qmap, bits, blocksize, out_features, in_features)
    stored = dequantize_blockwise_cpu(unpack_bits_ref(codes, bits, out_features * in_features),
                                      scales.detach().reshape(-1), qmap.detach(), blocksize)
    weight = in_own_order(stored, out_features, in_features, column_major)
    return torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)
