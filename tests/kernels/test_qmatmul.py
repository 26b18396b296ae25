"""Packed-weight matmul: every backend equals the reference, and the reference meets an explicit oracle.

Backends sum the same fp32 products in another order than the reference (per group, then scaled), so results are
compared within a bound proportional to ``|x| @ |W|.T``, the size of the terms being summed; a wrong code, zero,
scale or group shows up orders of magnitude above it.
"""

from __future__ import annotations

import pytest
import torch
from effllm.kernels.packing import pack_bits_ref, packed_numel
from effllm.kernels.qmatmul import dequantize_packed_ref, prepare_qmatmul, qmatmul, qmatmul_ref

# Relative rounding of the fp32 sums, against |x| @ |W|.T (measured: below 1e-6 on these shapes).
FP32_SUM_TOLERANCE = 2e-6
# (bits, group_size, out_features, in_features): widths 2/3/4/8 with per-channel, power-of-two and odd groups;
# shapes below one tile, odd sizes, and aligned ones that take the vectorised CPU path.
WEIGHTS = [
    (4, 64, 48, 128), (4, None, 33, 72), (4, 3, 17, 9),
    (3, 32, 40, 96), (3, None, 5, 13), (3, 8, 64, 24),
    (2, 16, 48, 64), (2, None, 31, 40), (2, 5, 7, 15),
    (8, 32, 33, 64), (8, None, 16, 11), (8, 7, 9, 21),
]
# Rows of x: one (decoding), a few, tiles of four plus two, past the CPU decode limit (16), more than a Triton tile.
ROWS = [1, 3, 14, 17, 70]


def make_weight(bits: int, group_size: int | None, out_features: int, in_features: int, seed: int = 0,
                scale_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Random packed weight: codes over the full range, zeros anywhere in it, scales over two decades."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // (group_size or in_features)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scales = torch.logspace(-2, 0, out_features * groups).view(out_features, groups)
    scales = scales[torch.randperm(out_features, generator=generator)]
    zeros = torch.randint(0, 2**bits, (out_features, groups), generator=generator, dtype=torch.uint8)
    return (pack_bits_ref(codes, bits).to(device), scales.to(device=device, dtype=scale_dtype), zeros.to(device),
            codes)


def make_x(shape, seed: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def assert_close_to_reference(out, ref, x, weight, bias, tolerance):
    """|out - ref| <= tolerance * (|x| @ |W|.T + |bias|), elementwise, and the same shape and dtype."""
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    magnitude = x.abs().float().reshape(-1, x.shape[-1]) @ weight.abs().T.to(x.device)
    if bias is not None:
        magnitude = magnitude + bias.abs().float()
    bound = tolerance * magnitude.reshape(ref.shape) + torch.finfo(torch.float32).tiny
    error = (out.float() - ref.float()).abs()
    assert (error <= bound).all(), f"max error {error.max().item():.3g}, worst error/bound {(error / bound).max():.3g}"


def output_tolerance(dtype: torch.dtype) -> float:
    """fp32: the sums' rounding; half dtypes: the weight rounded to that dtype (Triton) plus the output rounding."""
    return FP32_SUM_TOLERANCE if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


# --- the reference against an explicit oracle -------------------------------------------------------------


def oracle_weight(stream: list[int], bits: int, group_size: int | None, scales, zeros, out_features: int,
                  in_features: int) -> list[list[float]]:
    """W[n][k] read code by code from the bytes with Python integers: (code - zero) * scale of its group."""
    group = group_size or in_features
    weight = []
    for n in range(out_features):
        row = []
        for k in range(in_features):
            first_bit = (n * in_features + k) * bits
            code = 0
            for b in range(bits):  # bit by bit, little-endian within and across bytes
                bit = first_bit + b
                code |= ((stream[bit // 8] >> (bit % 8)) & 1) << b
            row.append((code - int(zeros[n][k // group])) * float(scales[n][k // group]))
        weight.append(row)
    return weight


@pytest.mark.parametrize("bits,group_size", [(1, 4), (2, None), (3, 3), (4, 2), (5, 6), (6, None), (7, 3), (8, 4)])
def test_reference_matches_a_python_loop_oracle(bits, group_size):
    out_features, in_features, rows = 5, 12, 3
    qweight, scales, zeros, _ = make_weight(bits, group_size, out_features, in_features, seed=bits)
    x = make_x((rows, in_features), seed=bits)
    bias = make_x((out_features,), seed=10 + bits)
    weight = oracle_weight(qweight.tolist(), bits, group_size, scales.tolist(), zeros.tolist(), out_features,
                           in_features)
    expected = [[sum(x[m, k].item() * weight[n][k] for k in range(in_features)) + bias[n].item()
                 for n in range(out_features)] for m in range(rows)]
    out = qmatmul_ref(x, qweight, scales, zeros, bits, group_size, out_features, in_features, bias)
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    dequantized = dequantize_packed_ref(qweight, scales, zeros, bits, group_size, out_features, in_features)
    torch.testing.assert_close(dequantized, torch.tensor(weight), rtol=0, atol=0)


def test_reference_keeps_dtype_and_leading_dims():
    qweight, scales, zeros, _ = make_weight(4, 8, 12, 16)
    x = make_x((2, 3, 16), dtype=torch.bfloat16)
    out = qmatmul_ref(x, qweight, scales, zeros, 4, 8, 12, 16)
    assert out.shape == (2, 3, 12) and out.dtype == torch.bfloat16


# --- every backend against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bits,group_size,out_features,in_features", WEIGHTS)
def test_backend_matches_reference(backend, bits, group_size, out_features, in_features, rows):
    _, device = backend
    qweight, scales, zeros, _ = make_weight(bits, group_size, out_features, in_features, seed=rows, device=device)
    x = make_x((rows, in_features), seed=rows, device=device)
    out = qmatmul(x, qweight, scales, zeros, bits, group_size, out_features, in_features)
    ref = qmatmul_ref(x, qweight, scales, zeros, bits, group_size, out_features, in_features)
    weight = dequantize_packed_ref(qweight, scales, zeros, bits, group_size, out_features, in_features)
    assert_close_to_reference(out, ref, x, weight, None, FP32_SUM_TOLERANCE)


@pytest.mark.parametrize("bits", [1, 5, 6, 7])
@pytest.mark.parametrize("rows", [1, 5])
def test_backend_matches_reference_for_other_widths(backend, bits, rows):
    _, device = backend
    for group_size, out_features, in_features in [(16, 24, 48), (3, 5, 9)]:  # vectorised CPU path, then scalar
        qweight, scales, zeros, _ = make_weight(bits, group_size, out_features, in_features, device=device)
        x = make_x((rows, in_features), device=device)
        out = qmatmul(x, qweight, scales, zeros, bits, group_size, out_features, in_features)
        ref = qmatmul_ref(x, qweight, scales, zeros, bits, group_size, out_features, in_features)
        weight = dequantize_packed_ref(qweight, scales, zeros, bits, group_size, out_features, in_features)
        assert_close_to_reference(out, ref, x, weight, None, FP32_SUM_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 17])
def test_backend_matches_reference_in_each_dtype_with_bias(backend, dtype, rows):
    _, device = backend
    bits, group_size, out_features, in_features = 4, 32, 40, 64
    qweight, scales, zeros, _ = make_weight(bits, group_size, out_features, in_features, scale_dtype=dtype,
                                            device=device)
    x = make_x((2, rows, in_features), dtype=dtype, device=device)  # leading dims are kept
    bias = make_x((out_features,), seed=7, dtype=dtype, device=device)
    out = qmatmul(x, qweight, scales, zeros, bits, group_size, out_features, in_features, bias)
    ref = qmatmul_ref(x, qweight, scales, zeros, bits, group_size, out_features, in_features, bias)
    assert out.shape == (2, rows, out_features)
    weight = dequantize_packed_ref(qweight, scales, zeros, bits, group_size, out_features, in_features)
    assert_close_to_reference(out, ref, x, weight, bias, output_tolerance(dtype))


def test_backend_handles_empty_and_strided_inputs(backend):
    _, device = backend
    qweight, scales, zeros, _ = make_weight(3, 8, 24, 32, device=device)
    empty = qmatmul(make_x((0, 32), device=device), qweight, scales, zeros, 3, 8, 24, 32)
    assert empty.shape == (0, 24)
    wide = make_x((5, 64), device=device)
    strided = wide[:, ::2]  # every other column: not contiguous
    out = qmatmul(strided, qweight, scales, zeros, 3, 8, 24, 32)
    ref = qmatmul_ref(strided.contiguous(), qweight, scales, zeros, 3, 8, 24, 32)
    weight = dequantize_packed_ref(qweight, scales, zeros, 3, 8, 24, 32)
    assert_close_to_reference(out, ref, strided, weight, None, FP32_SUM_TOLERANCE)


def test_backend_passes_gradients_through_the_reference(backend):
    _, device = backend
    qweight, scales, zeros, _ = make_weight(4, 16, 8, 32, device=device)
    bias = make_x((8,), device=device).requires_grad_()
    x = make_x((3, 32), device=device).requires_grad_()
    qmatmul(x, qweight, scales, zeros, 4, 16, 8, 32, bias).sum().backward()
    weight = dequantize_packed_ref(qweight, scales, zeros, 4, 16, 8, 32)
    torch.testing.assert_close(x.grad, weight.sum(dim=0).expand(3, 32))
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 3.0))


def test_plan_equals_the_function(backend):
    _, device = backend
    qweight, scales, zeros, _ = make_weight(4, 32, 20, 64, device=device)
    plan = prepare_qmatmul(qweight, scales, zeros, 4, 32, 20, 64)
    for rows in (1, 20):
        x = make_x((rows, 64), seed=rows, device=device)
        torch.testing.assert_close(plan(x), qmatmul(x, qweight, scales, zeros, 4, 32, 20, 64), rtol=0, atol=0)


def test_cpu_many_rows_equal_the_reference_bit_for_bit(monkeypatch):
    """Past the decode limit the C path dequantizes (exactly: one rounding per weight) and uses torch's matmul."""
    from effllm.kernels import cpu_kernels_available
    from effllm.kernels._qmatmul_cpu import MAX_DECODE_ROWS

    if not cpu_kernels_available():
        pytest.skip("no C compiler: the C kernels are not built here")
    monkeypatch.setenv("EFFLLM_KERNEL", "cpu")
    for bits, group_size, out_features, in_features in WEIGHTS:
        qweight, scales, zeros, _ = make_weight(bits, group_size, out_features, in_features)
        x = make_x((MAX_DECODE_ROWS + 1, in_features))
        bias = make_x((out_features,), seed=3)
        args = (qweight, scales, zeros, bits, group_size, out_features, in_features, bias)
        assert torch.equal(qmatmul(x, *args), qmatmul_ref(x, *args))


# --- argument checks --------------------------------------------------------------------------------------


def test_inconsistent_arguments_are_refused(backend):
    _, device = backend
    qweight, scales, zeros, _ = make_weight(4, 8, 6, 16, device=device)
    x = make_x((2, 16), device=device)
    with pytest.raises(ValueError, match="does not divide"):
        qmatmul(x, qweight, scales, zeros, 4, 5, 6, 16)
    with pytest.raises(ValueError, match="scales and zeros"):
        qmatmul(x, qweight, scales[:, :1], zeros[:, :1], 4, 8, 6, 16)
    with pytest.raises(ValueError, match="qweight must hold"):
        qmatmul(x, qweight[: packed_numel(6 * 16, 4) - 1], scales, zeros, 4, 8, 6, 16)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        qmatmul(x, qweight, scales, zeros, 9, 8, 6, 16)
    with pytest.raises(ValueError, match="features"):
        qmatmul(make_x((2, 15), device=device), qweight, scales, zeros, 4, 8, 6, 16)
