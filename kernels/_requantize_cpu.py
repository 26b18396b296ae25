"""Blockwise requantization of CPU tensors with the C quantize / dequantize kernels (``_blockwise_cpu``).

Bit for bit ``requantize.requantize_blockwise_ref``: the C kernels' codes and decoded values equal the core's
reference, and a row whose width is a whole number of blocks is cut into the same blocks whether it is read
row by row or as one flat tensor. Only a width that is not a multiple of the block size needs a zero-padded
copy of the rows.
"""

from __future__ import annotations

import torch

from ._blockwise_cpu import dequantize_blockwise_cpu, quantize_blockwise_cpu
from ._cpu_abi import DTYPE_CODES
from .blockwise import _check, num_blocks
from .requantize import rows_of


def requantize_blockwise_cpu(x: torch.Tensor, qmap: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` in blocks of ``blocksize`` along its last dimension; same shape and dtype."""
    _check(x, qmap, blocksize)
    if x.numel() == 0:
        return x.detach().clone()
    rows = rows_of(x)  # [R, W]
    if rows.dtype not in DTYPE_CODES:
        rows = rows.float()  # what the C kernels do not read natively, the reference reads as fp32 too
    width = rows.shape[1]
    pad = num_blocks(width, blocksize) * blocksize - width
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))  # [R, nb * B]
    codes, absmax = quantize_blockwise_cpu(rows, qmap, blocksize)
    decoded = dequantize_blockwise_cpu(codes, absmax, qmap, blocksize, x.dtype).view(rows.shape)
    return (decoded[:, :width] if pad else decoded).reshape(x.shape)
