"""Blockwise quantize / dequantize with the C kernels (``csrc/blockwise.c``), for CPU tensors.

Same results as ``quantize_blockwise_ref`` / ``dequantize_blockwise_ref`` (codes bit-identical: the
nearest-code search is exact, see ``_cpu_code_maps``). Inputs of other dtypes are converted to fp32 first,
as the reference does.
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_build
from ._cpu_abi import DTYPE_CODES, check
from ._cpu_code_maps import prepare_map
from .blockwise import _check, dequantize_blockwise_ref, num_blocks, quantize_blockwise_ref

# Below this many elements one thread does the work: waking others costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 1 << 15


def threads_for(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // MIN_ELEMENTS_PER_THREAD))


def quantize_blockwise_cpu(x: torch.Tensor, qmap: torch.Tensor, blocksize: int = 256):
    """Returns ``(codes, absmax)``: uint8 codes [numel] and fp32 absmax [nblocks]."""
    _check(x, qmap, blocksize)
    prepared = prepare_map(qmap)
    if not prepared.sorted:
        return quantize_blockwise_ref(x, qmap, blocksize)
    flat = x.detach().reshape(-1)
    if flat.dtype not in DTYPE_CODES:
        flat = flat.float()
    flat = flat.contiguous()
    numel = flat.numel()
    codes = torch.empty(numel, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(numel, blocksize), dtype=torch.float32, device=x.device)
    if numel:
        status = cpu_build.library().effllm_quantize_blockwise(
            flat.data_ptr(), DTYPE_CODES[flat.dtype], numel, blocksize, ctypes.byref(prepared.struct),
            codes.data_ptr(), absmax.data_ptr(), threads_for(numel))
        check(status, "quantize_blockwise")
    return codes, absmax


def dequantize_blockwise_cpu(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    qmap: torch.Tensor,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_cpu``: a flat tensor of ``codes.numel()`` values."""
    _check(codes, qmap, blocksize)
    numel = codes.numel()
    if codes.dtype != torch.uint8 or absmax.numel() < num_blocks(numel, blocksize):
        return dequantize_blockwise_ref(codes, absmax, qmap, blocksize, dtype)  # it reports the problem
    out_dtype = dtype if dtype in DTYPE_CODES else torch.float32
    out = torch.empty(numel, dtype=out_dtype, device=codes.device)
    if numel:
        flat_codes = codes.reshape(-1).contiguous()
        flat_absmax = absmax.detach().reshape(-1).float().contiguous()
        status = cpu_build.library().effllm_dequantize_blockwise(
            flat_codes.data_ptr(), flat_absmax.data_ptr(), numel, blocksize, ctypes.byref(prepare_map(qmap).struct),
            out.data_ptr(), DTYPE_CODES[out_dtype], threads_for(numel))
        check(status, "dequantize_blockwise")
    return out if out_dtype == dtype else out.to(dtype)
