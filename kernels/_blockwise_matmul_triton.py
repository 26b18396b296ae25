"""Triton kernel for the blockwise-packed weight matmul (the spec is ``blockwise_matmul.blockwise_matmul_ref``).

Imported lazily by ``blockwise_matmul``: importing effllm never imports Triton. On CPU tensors it runs under the
interpreter (``TRITON_INTERPRET=1``).

Each program computes a tile ``out[BLOCK_M, BLOCK_N]``, walking K in steps of ``BLOCK_K``: it loads a tile of x
and decodes the matching [BLOCK_K, BLOCK_N] tile of W^T straight from the bit stream, as ``_qmatmul_triton``
does. ``W[n, k]`` is stored element ``e = n * K + k`` (row-major) or ``e = k * N + n`` (column-major); its code
starts at stream bit ``e * BITS`` and, with at most 8 bits, spans at most two bytes. The value is the map entry
the code names (a gather from the map, ``2**BITS`` fp32 values that stay in cache) times the scale of block
``e // blocksize``: any block size works, whether or not blocks line up with the tiles or the rows. The weight is
never materialised in memory. Products accumulate in fp32; on GPUs half-precision x is multiplied in its own
dtype (tensor cores) with the decoded weight rounded to that dtype, fp32 x in IEEE fp32 (no TF32); under the
interpreter everything is multiplied in fp32. Calls that need gradients go to the (differentiable) reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blockwise_triton import on_device, to_storage_dtype
from ._qmatmul_triton import BLOCK_K, BLOCK_N, BYTE_BITS, HALF_DTYPES, NUM_WARPS, block_m_for, read_codes
from .blockwise_matmul import blockwise_matmul_ref, check_blockwise_matmul_args


@triton.jit
def _blockwise_matmul_kernel(
    x_ptr,  # [M, K] float, rows stride_xm apart
    codes_ptr,  # [stream_bytes] uint8: codes of W in stored order, BITS each
    scales_ptr,  # [nblocks] fp32: scale of each block of blocksize stored elements
    qmap_ptr,  # [2**BITS] fp32
    bias_ptr,  # [N] float (unused without HAS_BIAS)
    out_ptr,  # [M, N] x's dtype, contiguous
    M,
    N,
    K,
    blocksize,
    stream_bytes,
    stride_xm,
    BITS: tl.constexpr,
    CODES_CROSS_BYTES: tl.constexpr,  # 8 % BITS != 0: some codes reach into the next byte
    COLUMN_MAJOR: tl.constexpr,  # W stored as W.T flattened: e = k * N + n
    HAS_BIAS: tl.constexpr,
    HALF_DOT: tl.constexpr,  # multiply half-precision x in its own dtype (tensor cores) rather than in fp32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]

        # W^T tile [BK, BN] from the bit stream.
        w_ok = k_ok[:, None] & col_ok[None, :]  # [BK, BN]
        if COLUMN_MAJOR:
            element = ks[:, None].to(tl.int64) * N + cols[None, :]  # [BK, BN] stored index of W[n, k]
        else:
            element = cols[None, :].to(tl.int64) * K + ks[:, None]
        code = read_codes(codes_ptr, element, w_ok, stream_bytes, BITS, CODES_CROSS_BYTES)  # [BK, BN]
        value = tl.load(qmap_ptr + code, mask=w_ok, other=0.0)  # [BK, BN] fp32 map entries
        scale = tl.load(scales_ptr + element // blocksize, mask=w_ok, other=0.0)
        weight = value * scale  # [BK, BN], the reference's fp32 product

        if HALF_DOT:
            acc += tl.dot(x, weight.to(x.dtype))
        else:
            acc += tl.dot(x.to(tl.float32), weight, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(out_ptr + out_offsets, to_storage_dtype(acc, out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def blockwise_matmul_triton(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor,
                            bits: int, blocksize: int, out_features: int, in_features: int, column_major: bool,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., in_features] -> [..., out_features] in ``x``'s dtype."""
    args = (codes, scales, qmap, bits, blocksize, out_features, in_features, column_major)
    if needs_grad(x, bias, scales, qmap):
        return blockwise_matmul_ref(x, *args, bias)
    check_blockwise_matmul_args(x, codes, scales, qmap, bits, blocksize, out_features, in_features)
    rows = x.detach().reshape(x.shape[:-1].numel(), in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out.view(*x.shape[:-1], out_features)
    stream = codes.contiguous()
    block_scales = scales.detach().reshape(-1).to(device=x.device, dtype=torch.float32).contiguous()
    table = qmap.detach().to(device=x.device, dtype=torch.float32).contiguous()
    bias_arg = bias.detach().contiguous() if bias is not None else block_scales  # any pointer; never read
    block_m = block_m_for(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(out_features, BLOCK_N))
    with on_device(x.device):
        _blockwise_matmul_kernel[grid](
            rows, stream, block_scales, table, bias_arg, out, m, out_features, in_features, blocksize,
            stream.numel(), rows.stride(0),
            BITS=bits, CODES_CROSS_BYTES=BYTE_BITS % bits != 0, COLUMN_MAJOR=bool(column_major),
            HAS_BIAS=bias is not None, HALF_DOT=x.dtype in HALF_DTYPES and x.is_cuda,
            BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        )
    return out.view(*x.shape[:-1], out_features)
