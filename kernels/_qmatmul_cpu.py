"""Packed-weight matmul with the C kernels (``csrc/qmatmul.c``), for CPU tensors.

Few rows of ``x`` (decoding): one pass over the packed weight, decoding codes in registers; the weight is
never expanded in memory, so the pass reads ``bits / 32`` of what an fp32 matmul reads. Many rows (prefill):
the weight is dequantized to fp32 once per call by the C kernel and handed to torch's BLAS matmul, whose
cost then dwarfs the dequantization, and the result is the reference's bit for bit. Results of the decoding
kernel equal ``qmatmul_ref`` within fp32 rounding (the same products, summed in another order).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cpu_build
from ._cpu_abi import check
from .qmatmul import check_weight_args, qmatmul_ref

# Above this many rows of x, dequantize-then-BLAS beats the decoding kernel. Measured by bench_qmatmul.py (rows
# section, one thread of a 2-core AVX2 EPYC, [1536, 576] W4 g64 weight), decode kernel vs dequantize + BLAS in ms:
# load 2: 0.67 vs 0.79 at 12 rows, 0.94 vs 0.86 at 16, 1.34 vs 1.10 at 24; under heavier load (5) the kernel
# kept up to about 48 rows. The quiet machine's crossover is the one kept.
MAX_DECODE_ROWS = 16
# Below this many weight elements per thread, one thread does the work. What a second thread costs is waking
# it, and that depends on the load: on the 2-core machine of benchmarks/bench_qmatmul.py, at load average 1.5 two
# threads took a [1536, 576] W4 matvec from 0.135 to 0.093 ms and [4096, 4096] from 2.85 to 1.48 ms, but at load
# 4-8 (other processes on both cores) every OpenMP region cost 3-20 ms: 0.2-0.8 ms became 15-19 ms, and even
# [11008, 4096] went from 15 to 20 ms. torch's own ops suffer the same (fp32 generate fell from 11 to 1.7 tokens/s
# on two threads). Small layers (all of SmolLM2-135M's, at most 0.9 M weights) therefore stay on one thread,
# which costs up to 1.5x on an idle machine and saves 20-100x on a busy one; layers of 8 M weights and more split.
MIN_WEIGHTS_PER_THREAD = 1 << 22


class PackedWeight(ctypes.Structure):
    """csrc/qmatmul.c: effllm_packed_weight (field for field)."""

    _fields_ = [
        ("qweight", ctypes.c_void_p),
        ("stream_bytes", ctypes.c_int64),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("group_size", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("bits", ctypes.c_int32),
    ]


_weight_p = ctypes.POINTER(PackedWeight)
_SIGNATURES = {
    # (weight, x, m, out, num_threads)
    "effllm_qmatmul": [_weight_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32],
    # (weight, out, num_threads)
    "effllm_dequantize_packed": [_weight_p, ctypes.c_void_p, ctypes.c_int32],
}


@functools.cache
def _kernels() -> ctypes.CDLL:
    library = cpu_build.library()
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return library


def threads_for(weight_numel: int) -> int:
    return max(1, min(torch.get_num_threads(), weight_numel // MIN_WEIGHTS_PER_THREAD))


class CpuQMatmul:
    """``plan(x, bias=None)``: the packed-weight matmul of one weight on CPU tensors (see ``prepare_qmatmul``).

    Holds the weight's tensors (no copy of the codes), its scales as fp32, the C structure describing them and
    the C entry points, so that a call costs little more than the kernel: a decode step makes hundreds of them.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int | None, out_features: int, in_features: int):
        self.reference_args = (qweight, scales, zeros, bits, group_size, out_features, in_features)
        group = check_weight_args(*self.reference_args)
        self.out_features, self.in_features = out_features, in_features
        self.stream = qweight.detach().contiguous()
        self.scales32 = scales.detach().float().contiguous()
        self.zeros8 = zeros.detach().contiguous()
        self.weight = PackedWeight(self.stream.data_ptr(), self.stream.numel(), self.scales32.data_ptr(),
                                   self.zeros8.data_ptr(), group, out_features, in_features, bits)
        self.weight_ref = ctypes.byref(self.weight)
        kernels = _kernels()
        self.decode_kernel, self.dequantize_kernel = kernels.effllm_qmatmul, kernels.effllm_dequantize_packed
        self.single_threaded = out_features * in_features < 2 * MIN_WEIGHTS_PER_THREAD

    def threads(self) -> int:
        return 1 if self.single_threaded else threads_for(self.out_features * self.in_features)

    def dequantize(self) -> torch.Tensor:
        """``W`` as fp32 [out_features, in_features]."""
        weight = torch.empty(self.out_features, self.in_features, dtype=torch.float32)
        check(self.dequantize_kernel(self.weight_ref, weight.data_ptr(), self.threads()), "dequantize_packed")
        return weight

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the weight expects {self.in_features}")
        if x.requires_grad and torch.is_grad_enabled():
            return qmatmul_ref(x, *self.reference_args, bias=bias)  # differentiable
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.float().contiguous()
        m = rows.shape[0]
        if m > MAX_DECODE_ROWS:
            out = torch.nn.functional.linear(rows, self.dequantize(), None if bias is None else bias.float())
        else:
            out = torch.empty(m, self.out_features, dtype=torch.float32)
            status = self.decode_kernel(self.weight_ref, rows.data_ptr(), m, out.data_ptr(), self.threads())
            if status:
                check(status, "qmatmul")
            if bias is not None:
                out = out + bias
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)


def qmatmul_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int | None, out_features: int, in_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., in_features] -> [..., out_features] in ``x``'s dtype."""
    return CpuQMatmul(qweight, scales, zeros, bits, group_size, out_features, in_features)(x, bias)
