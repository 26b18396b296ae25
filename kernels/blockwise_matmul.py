"""Blockwise-packed weight x activation matmul: ``x @ W.T + bias`` with ``W`` decoded on the fly.

The weight ``W`` [out_features, in_features] is stored as BCT's ``PackedTensor`` stores a 2-D tensor:

* the *stored order* is ``W`` flattened row-major, or with ``column_major`` its transpose ``W.T`` flattened
  (blocks then run down the columns of ``W``): element ``W[n, k]`` is stored at ``e = n * in_features + k``, or at
  ``e = k * out_features + n``;
* ``codes`` uint8 [ceil(out * in * bits / 8)]: the code of stored element ``e`` at bits ``[e * bits,
  (e + 1) * bits)`` of a little-endian bit stream (``packing.pack_bits_ref``), 1 to 8 bits a code;
* ``scales`` fp32 [nblocks]: the decoded scale of each block of ``blocksize`` consecutive stored elements;
* ``qmap`` fp32 [2**bits]: the map the codes index;
* ``W[n, k] = qmap[code(e)] * scales[e // blocksize]``.

``blockwise_matmul_ref`` is the specification: fp32 arithmetic, the result cast to ``x``'s dtype, differentiable
with respect to ``x`` and ``bias``. ``blockwise_matmul`` picks a backend (see ``effllm.kernels.backend_for``): the
Triton kernel on CUDA (or under the interpreter), which never materialises ``W``; on CPU tensors the weight decoded
by the C dequantize kernel, then torch's matmul (the reference's result bit for bit); else the reference. On the
Triton backend a call that needs gradients runs the reference.
"""

from __future__ import annotations

import torch

from . import backend_for
from .blockwise import dequantize_blockwise_ref, num_blocks
from .packing import packed_numel, unpack_bits_ref


def check_blockwise_weight_args(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor, bits: int,
                                blocksize: int, out_features: int, in_features: int) -> None:
    """Raises ValueError on an inconsistent packed weight."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes must have 1 to 8 bits, got {bits}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    numel = out_features * in_features
    if codes.dtype != torch.uint8 or codes.numel() < packed_numel(numel, bits):
        raise ValueError(f"codes must hold {packed_numel(numel, bits)} uint8 bytes, got {codes.numel()} of "
                         f"{codes.dtype}")
    if scales.numel() < num_blocks(numel, blocksize):
        raise ValueError(f"{scales.numel()} scales cannot cover {numel} weights in blocks of {blocksize}")
    if qmap.dim() != 1 or qmap.numel() < 2**bits:
        raise ValueError(f"codes of {bits} bits need a 1-D map of {2**bits} entries, got shape {tuple(qmap.shape)}")


def check_blockwise_matmul_args(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor,
                                bits: int, blocksize: int, out_features: int, in_features: int) -> None:
    """Raises ValueError on inconsistent arguments."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    check_blockwise_weight_args(codes, scales, qmap, bits, blocksize, out_features, in_features)


def in_own_order(stored: torch.Tensor, out_features: int, in_features: int, column_major: bool) -> torch.Tensor:
    """Stored-order values [out * in] as ``W`` [out_features, in_features], contiguous like
    ``PackedTensor.dequantize`` gives it (so torch sums the products in the same order)."""
    if column_major:
        return stored.view(in_features, out_features).T.contiguous()
    return stored.view(out_features, in_features)


def decode_blockwise_weight_ref(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor, bits: int,
                                blocksize: int, out_features: int, in_features: int,
                                column_major: bool) -> torch.Tensor:
    """``W`` as fp32 [out_features, in_features], decoded with the core's reference."""
    numel = out_features * in_features
    stored = dequantize_blockwise_ref(unpack_bits_ref(codes, bits, numel), scales.detach().reshape(-1),
                                      qmap.detach(), blocksize)
    return in_own_order(stored, out_features, in_features, column_major)


def blockwise_matmul_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor, bits: int,
                         blocksize: int, out_features: int, in_features: int, column_major: bool,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., in_features] -> [..., out_features] in ``x``'s dtype: ``x @ W.T + bias`` computed in fp32.

    Differentiable with respect to ``x`` and ``bias``.
    """
    check_blockwise_matmul_args(x, codes, scales, qmap, bits, blocksize, out_features, in_features)
    weight = decode_blockwise_weight_ref(codes, scales, qmap, bits, blocksize, out_features, in_features,
                                         column_major)
    return torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


def blockwise_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor, bits: int,
                     blocksize: int, out_features: int, in_features: int, column_major: bool,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as ``blockwise_matmul_ref`` (within fp32 rounding), on the backend chosen for ``codes``."""
    backend = backend_for(codes)
    if backend == "triton":
        from ._blockwise_matmul_triton import blockwise_matmul_triton

        fn = blockwise_matmul_triton
    elif backend == "cpu":
        from ._blockwise_matmul_cpu import blockwise_matmul_cpu

        fn = blockwise_matmul_cpu
    else:
        fn = blockwise_matmul_ref
    return fn(x, codes, scales, qmap, bits, blocksize, out_features, in_features, column_major, bias)
