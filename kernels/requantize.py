"""Blockwise requantization (fake quantization) of activations along their last dimension.

``x`` [..., width] is read as rows of ``width``; each row is cut into blocks of ``blocksize`` (blocks never
straddle two rows; a width that is not a multiple of ``blocksize`` is handled as if zero-padded to whole blocks,
which changes no block's absmax). Each block is divided by its absmax, every value replaced by the nearest entry
of the sorted map ``qmap`` (``blockwise.nearest_code_ref``: the core's code choice and tie-breaking) and decoded
again: ``qmap[code] * absmax``, in fp32, cast back to ``x``'s dtype. The result is exactly what the core's
``quantize_blockwise`` followed by ``dequantize_blockwise`` gives on the zero-padded rows, so models calibrated or
saved with one reproduce bit for bit with the other.

``requantize_blockwise_ref`` is the specification; ``requantize_blockwise`` picks a backend (see
``effllm.kernels.backend_for``): one Triton pass on CUDA (or under the interpreter), the C quantize / dequantize
kernels on CPU tensors, else the reference. The result is never differentiable (it is a detached tensor).
"""

from __future__ import annotations

import torch

from . import backend_for
from .blockwise import _check, absmax_to_scale, nearest_code_ref, num_blocks


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached as [rows, width] (a 0-d tensor is one row of one value)."""
    width = x.shape[-1] if x.dim() else 1
    return x.detach().reshape(x.shape[:-1].numel(), width)


def requantize_blockwise_ref(x: torch.Tensor, qmap: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` in blocks of ``blocksize`` along its last dimension; same shape and dtype."""
    _check(x, qmap, blocksize)
    if x.numel() == 0:
        return x.detach().clone()
    rows = rows_of(x).float()  # [R, W]
    width = rows.shape[1]
    pad = num_blocks(width, blocksize) * blocksize - width
    blocks = torch.nn.functional.pad(rows, (0, pad)).view(rows.shape[0], -1, blocksize)  # [R, nb, B]
    absmax = blocks.abs().amax(dim=2, keepdim=True)  # [R, nb, 1]
    table = qmap.to(device=x.device, dtype=torch.float32)
    codes = nearest_code_ref(blocks / absmax_to_scale(absmax), table)  # [R, nb, B]
    # An all-zero block (absmax 0) decodes to zeros whatever its codes, as dequantize_blockwise does.
    decoded = table[codes.long()] * absmax
    return decoded.view(rows.shape[0], -1)[:, :width].reshape(x.shape).to(x.dtype)


def requantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Same result as ``requantize_blockwise_ref`` (bit for bit), on the backend chosen for ``x``."""
    backend = backend_for(x)
    if backend == "triton":
        from ._requantize_triton import requantize_blockwise_triton

        return requantize_blockwise_triton(x, qmap, blocksize)
    if backend == "cpu":
        from ._requantize_cpu import requantize_blockwise_cpu

        return requantize_blockwise_cpu(x, qmap, blocksize)
    return requantize_blockwise_ref(x, qmap, blocksize)
