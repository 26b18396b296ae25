"""Packed low-bit weight x activation matmul: ``x @ W.T`` with ``W`` dequantized on the fly.

The weight ``W`` [out_features, in_features] is stored as ``QuantLinear`` stores it:

* ``qweight`` uint8 [ceil(out * in * bits / 8)]: the codes of the row-major [out, in] weight as a little-endian
  bit stream (``packing.pack_bits_ref``), so code ``e = n * in_features + k`` sits at bits ``[e * bits,
  (e + 1) * bits)``;
* ``scales`` [out, groups] (any float dtype) and ``zeros`` uint8 [out, groups], ``groups = in / group_size``
  (``group_size=None``: one group per row, i.e. per output channel);
* ``W[n, k] = (code[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]``.

``qmatmul_ref`` is the specification: fp32 arithmetic, the result cast to ``x``'s dtype. ``qmatmul`` picks a
backend (see ``effllm.kernels.backend_for``): Triton on CUDA (or under the interpreter), the C kernels on CPU
tensors, else the reference. Gradients reach ``x`` and ``bias`` on every backend: a call that needs them (under
grad mode) runs the differentiable reference, or adds the bias with torch ops. ``prepare_qmatmul`` does the
per-weight work once for a layer that calls the matmul at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import backend_for
from .packing import packed_numel, unpack_bits_ref


def resolve_group_size(group_size: int | None, in_features: int) -> int:
    """The group size as a number: ``None`` (per output channel) is one group spanning the whole row."""
    return in_features if group_size is None else group_size


def check_weight_args(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int | None, out_features: int, in_features: int) -> int:
    """Raises ValueError on an inconsistent packed weight; returns the group size as a number."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes must have 1 to 8 bits, got {bits}")
    group = resolve_group_size(group_size, in_features)
    if group < 1 or in_features % group:
        raise ValueError(f"group size {group_size} does not divide the input dimension {in_features}")
    groups = in_features // group
    if tuple(scales.shape) != (out_features, groups) or tuple(zeros.shape) != (out_features, groups):
        raise ValueError(f"scales and zeros must be [{out_features}, {groups}], got {tuple(scales.shape)} and "
                         f"{tuple(zeros.shape)}")
    if zeros.dtype != torch.uint8:
        raise ValueError(f"zeros must be uint8, got {zeros.dtype}")
    if qweight.dtype != torch.uint8 or qweight.numel() < packed_numel(out_features * in_features, bits):
        raise ValueError(f"qweight must hold {packed_numel(out_features * in_features, bits)} uint8 bytes, got "
                         f"{qweight.numel()} of {qweight.dtype}")
    return group


def check_qmatmul_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                       group_size: int | None, out_features: int, in_features: int) -> int:
    """Raises ValueError on inconsistent arguments; returns the group size as a number."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    return check_weight_args(qweight, scales, zeros, bits, group_size, out_features, in_features)


def dequantize_packed_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                          group_size: int | None, out_features: int, in_features: int) -> torch.Tensor:
    """``W`` as fp32 [out_features, in_features]."""
    group = resolve_group_size(group_size, in_features)
    codes = unpack_bits_ref(qweight, bits, out_features * in_features).view(out_features, in_features // group, group)
    weight = (codes.float() - zeros.float()[..., None]) * scales.float()[..., None]
    return weight.view(out_features, in_features)


def qmatmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int | None, out_features: int, in_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., in_features] -> [..., out_features] in ``x``'s dtype: ``x @ W.T + bias`` computed in fp32.

    Differentiable with respect to ``x`` and ``bias``.
    """
    check_qmatmul_args(x, qweight, scales, zeros, bits, group_size, out_features, in_features)
    weight = dequantize_packed_ref(qweight, scales, zeros, bits, group_size, out_features, in_features)
    return torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


class _BoundWeight:
    """``fn(x, *weight_args, bias=bias)``: a plan for backends that keep no state of their own."""

    def __init__(self, fn: Callable, *weight_args):
        self.fn, self.weight_args = fn, weight_args

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(x, *self.weight_args, bias=bias)


def prepare_qmatmul(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    group_size: int | None, out_features: int,
                    in_features: int) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A callable ``plan(x, bias=None)`` equal to ``qmatmul(x, <this weight>, bias)``, for layers that call it
    again and again: the arguments are checked, the backend chosen and whatever the backend derives from the
    weight (fp32 scales on CPU) computed once. The plan reads ``qweight``, ``scales`` and ``zeros`` as they are
    when it is called only on backends that keep no derived state; rebuild it after changing them.
    """
    weight_args = (qweight, scales, zeros, bits, group_size, out_features, in_features)
    check_weight_args(*weight_args)
    backend = backend_for(qweight)
    if backend == "triton":
        from ._qmatmul_triton import qmatmul_triton

        return _BoundWeight(qmatmul_triton, *weight_args)
    if backend == "cpu":
        from ._qmatmul_cpu import CpuQMatmul

        return CpuQMatmul(*weight_args)
    return _BoundWeight(qmatmul_ref, *weight_args)


def qmatmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
            group_size: int | None, out_features: int, in_features: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as ``qmatmul_ref`` (within fp32 rounding), on the backend chosen for ``qweight``."""
    plan = prepare_qmatmul(qweight, scales, zeros, bits, group_size, out_features, in_features)
    return plan(x, bias)
