"""Blockwise quantize / dequantize.

A tensor is flattened and cut into blocks of ``blocksize`` elements (the last one may be short). Each block is
divided by its absolute maximum (kept in fp32) and every value becomes the index of the nearest entry of a
sorted quantization map (see ``quant_maps``). Codes are uint8, one per element; ``packing`` packs codes of
fewer than 8 bits.

``*_ref`` are the specification and the CPU fallback; ``quantize_blockwise`` / ``dequantize_blockwise`` pick
a backend (see ``effllm.kernels.backend_for``).
"""

from __future__ import annotations

import torch

from . import backend_for
from .quant_maps import map_midpoints

DEFAULT_BLOCKSIZE = 256


def num_blocks(numel: int, blocksize: int) -> int:
    return (numel + blocksize - 1) // blocksize


def _check(x: torch.Tensor, qmap: torch.Tensor, blocksize: int) -> None:
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if qmap.dim() != 1 or qmap.numel() > 256:
        raise ValueError(f"a quantization map is a 1-D tensor of at most 256 entries, got shape {tuple(qmap.shape)}")


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flat fp32 view of ``x`` padded with zeros to whole blocks: [nblocks, blocksize]."""
    flat = x.reshape(-1).float()
    pad = num_blocks(flat.numel(), blocksize) * blocksize - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def absmax_to_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Divisor for each block: its absmax, or 1 for an all-zero block (whose codes then all mean 0)."""
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax))


def nearest_code_ref(normalized: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Index of the nearest map entry; a value exactly between two entries takes the lower one."""
    return torch.bucketize(normalized, map_midpoints(qmap.float())).to(torch.uint8)


def quantize_blockwise_ref(
    x: torch.Tensor, qmap: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(codes, absmax)``: uint8 codes [numel] and fp32 absmax [nblocks]."""
    _check(x, qmap, blocksize)
    blocks = _blocks(x, blocksize)  # [nb, B]
    absmax = blocks.abs().amax(dim=1)  # [nb]
    normalized = blocks / absmax_to_scale(absmax)[:, None]
    codes = nearest_code_ref(normalized.reshape(-1)[: x.numel()], qmap.to(x.device))
    return codes, absmax


def dequantize_blockwise_ref(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    qmap: torch.Tensor,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_ref``: a flat tensor of ``codes.numel()`` values."""
    numel = codes.numel()
    values = qmap.to(codes.device).float()[codes.reshape(-1).long()]
    padded = torch.nn.functional.pad(values, (0, absmax.numel() * blocksize - numel)).view(-1, blocksize)
    # An all-zero block (absmax 0) decodes to zeros whatever its codes, even with a map that lacks 0.
    return (padded * absmax.float()[:, None]).reshape(-1)[:numel].to(dtype)


def quantize_blockwise(
    x: torch.Tensor, qmap: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = backend_for(x)
    if backend == "triton":
        from ._blockwise_triton import quantize_blockwise_triton

        return quantize_blockwise_triton(x, qmap, blocksize)
    if backend == "cpu":
        from ._blockwise_cpu import quantize_blockwise_cpu

        return quantize_blockwise_cpu(x, qmap, blocksize)
    return quantize_blockwise_ref(x, qmap, blocksize)


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    qmap: torch.Tensor,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    backend = backend_for(codes)
    if backend == "triton":
        from ._blockwise_triton import dequantize_blockwise_triton

        return dequantize_blockwise_triton(codes, absmax, qmap, blocksize, dtype)
    if backend == "cpu":
        from ._blockwise_cpu import dequantize_blockwise_cpu

        return dequantize_blockwise_cpu(codes, absmax, qmap, blocksize, dtype)
    return dequantize_blockwise_ref(codes, absmax, qmap, blocksize, dtype)
