"""Triton kernel for the packed-weight matmul (the spec is ``qmatmul.qmatmul_ref``).

Imported lazily by ``qmatmul``: importing effllm never imports Triton. On CPU tensors it runs under the
interpreter (``TRITON_INTERPRET=1``).

Each program computes a tile ``out[BLOCK_M, BLOCK_N]``, walking K in steps of ``BLOCK_K``: it loads a tile of x
and dequantizes the matching [BLOCK_K, BLOCK_N] tile of W^T straight from the bit stream. Code ``e = n * K + k``
starts at stream bit ``e * BITS``; with at most 8 bits it spans at most two bytes, so the kernel loads the byte
it starts in (and, for widths that do not divide 8, the next one), shifts and masks. The weight is never
materialised in memory. Products accumulate in fp32; on GPUs half-precision x is multiplied in its own dtype
(tensor cores) with the dequantized weight rounded to that dtype, fp32 x in IEEE fp32 (no TF32); under the
interpreter everything is multiplied in fp32. Calls that need
gradients go to the (differentiable) reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blockwise_triton import on_device
from .qmatmul import check_qmatmul_args, qmatmul_ref

BYTE_BITS = 8
# tl.dot needs every tile dimension to be at least 16.
MIN_DOT_TILE = 16
MAX_BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 64
NUM_WARPS = 4
# Multiplied in their own dtype on GPUs. Not under the interpreter: its bf16 tl.dot returns garbage (Triton 3.9).
HALF_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def read_codes(stream_ptr, element, mask, stream_bytes, BITS: tl.constexpr, CODES_CROSS_BYTES: tl.constexpr):
    """Codes number ``element`` (any shape of int64 indices) of a little-endian stream of ``BITS``-bit codes: a
    code of at most 8 bits starts in one byte and, for widths that do not divide 8, may end in the next."""
    bit = element * BITS
    byte = bit >> 3
    word = tl.load(stream_ptr + byte, mask=mask, other=0).to(tl.int32)
    if CODES_CROSS_BYTES:
        next_byte = tl.load(stream_ptr + byte + 1, mask=mask & (byte + 1 < stream_bytes), other=0)
        word = word | (next_byte.to(tl.int32) << 8)
    return (word >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)


@triton.jit
def _qmatmul_kernel(
    x_ptr,  # [M, K] float, rows stride_xm apart
    qweight_ptr,  # [stream_bytes] uint8: codes of the row-major [N, K] weight, BITS each
    scales_ptr,  # [N, G] float
    zeros_ptr,  # [N, G] uint8
    bias_ptr,  # [N] float (unused without HAS_BIAS)
    out_ptr,  # [M, N] x's dtype, contiguous
    M,
    N,
    K,
    G,
    group_size,
    stream_bytes,
    stride_xm,
    BITS: tl.constexpr,
    CODES_CROSS_BYTES: tl.constexpr,  # 8 % BITS != 0: some codes reach into the next byte
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
        element = cols[None, :].to(tl.int64) * K + ks[:, None]  # [BK, BN] index of the code
        code = read_codes(qweight_ptr, element, w_ok, stream_bytes, BITS, CODES_CROSS_BYTES)  # [BK, BN]
        scale_index = cols[None, :] * G + ks[:, None] // group_size  # [BK, BN]
        scale = tl.load(scales_ptr + scale_index, mask=w_ok, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + scale_index, mask=w_ok, other=0).to(tl.float32)
        weight = (code.to(tl.float32) - zero) * scale  # [BK, BN]

        if HALF_DOT:
            acc += tl.dot(x, weight.to(x.dtype))
        else:
            acc += tl.dot(x.to(tl.float32), weight, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def block_m_for(rows: int) -> int:
    """Rows of x per program: a power of two covering small batches, between 16 and MAX_BLOCK_M."""
    return max(MIN_DOT_TILE, min(MAX_BLOCK_M, triton.next_power_of_2(max(rows, 1))))


def qmatmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int | None, out_features: int, in_features: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., in_features] -> [..., out_features] in ``x``'s dtype."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return qmatmul_ref(x, qweight, scales, zeros, bits, group_size, out_features, in_features, bias)
    group = check_qmatmul_args(x, qweight, scales, zeros, bits, group_size, out_features, in_features)
    rows = x.detach().reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out.view(*x.shape[:-1], out_features)
    stream = qweight.contiguous()
    scales, zeros = scales.detach().contiguous(), zeros.contiguous()
    bias_arg = bias.detach().contiguous() if bias is not None else scales  # any pointer; never read
    block_m = block_m_for(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(out_features, BLOCK_N))
    with on_device(x.device):
        _qmatmul_kernel[grid](
            rows, stream, scales, zeros, bias_arg, out, m, out_features, in_features, in_features // group, group,
            stream.numel(), rows.stride(0),
            BITS=bits, CODES_CROSS_BYTES=BYTE_BITS % bits != 0, HAS_BIAS=bias is not None,
            HALF_DOT=x.dtype in HALF_DTYPES and x.is_cuda,
            BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        )
    return out.view(*x.shape[:-1], out_features)
