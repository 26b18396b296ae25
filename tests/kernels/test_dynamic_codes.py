"""Computed codes of the dynamic map (``dynamic_codes``): the torch replay of the kernels' arithmetic and the
Triton encoder both give ``torch.bucketize``'s code at every probe (midpoints and their float32 neighbours,
level thresholds, specials, random values of every scale); maps that are not dynamic maps keep the search."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch
from effllm.kernels import triton_available
from effllm.kernels.dynamic_codes import (
    COL_OFFSET,
    COL_SLOPE,
    COL_THRESHOLD,
    DYNAMIC,
    LEVELS_CAPACITY,
    LINEAR,
    LINEAR_NOZERO,
    SEARCHED,
    DynamicCodes,
    encode_ref,
    fma32,
    probes,
    verify_encode,
)
from effllm.kernels.quant_maps import dynamic_map, linear_map, make_map, map_midpoints

if triton_available():
    import triton
    import triton.language as tl
    from effllm.kernels._dynamic_codes_triton import dynamic_encode, level_parameters

    @triton.jit
    def _encode_kernel(x_ptr, out_ptr, numel, mid_ptr, BITS: tl.constexpr, SIGNED: tl.constexpr,
                       KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, dynamic_encode(x, mid_ptr, BITS, SIGNED, KIND), mask=mask)

    _THRESHOLDS: tl.constexpr = tl.constexpr(COL_THRESHOLD * LEVELS_CAPACITY)
    _SLOPES: tl.constexpr = tl.constexpr(COL_SLOPE * LEVELS_CAPACITY)
    _OFFSETS: tl.constexpr = tl.constexpr(COL_OFFSET * LEVELS_CAPACITY)

    @triton.jit
    def _level_parameters_kernel(out_ptr, BITS: tl.constexpr, SIGNED: tl.constexpr):
        """The encoder's compile-time constants, laid out as DynamicCodes.table."""
        for level in tl.static_range(0, BITS - 1):
            threshold, slope, offset = level_parameters(level, BITS, SIGNED)
            tl.store(out_ptr + _THRESHOLDS + level, threshold)
            tl.store(out_ptr + _SLOPES + level, slope)
            tl.store(out_ptr + _OFFSETS + level, offset)

    @triton.jit
    def _fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.fma(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(c_ptr + offs)))

DYNAMIC_MAPS = [(bits, signed) for bits in range(2, 9) for signed in (True, False)]


def _fp32_nearest(value: Fraction) -> float:
    """``value`` rounded to the nearest float32, ties to even: the exact oracle for ``fma32``."""
    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    distances = [abs(Fraction(float(c)) - value) for c in candidates]
    best = min(distances)
    nearest = [c for c, d in zip(candidates, distances) if d == best]
    return float(min(nearest, key=lambda c: int(np.array(c).view(np.int32)) & 1))


def _fma_cases(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random triples, and triples whose exact result lies a quarter float64 ulp from a point halfway between two
    float32 values, where rounding to float64 first and then to float32 goes the wrong way."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(count, generator=generator) * 2.0 ** torch.randint(-20, 20, (count,), generator=generator)
    b = torch.randn(count, generator=generator)
    c = torch.randn(count, generator=generator) * 2.0 ** torch.randint(-20, 20, (count,), generator=generator)
    r = torch.rand(count, generator=generator) + 1.0  # in [1, 2): float32 ulp 2**-23
    sign = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    # (1 + 2**-15)(1 - 2**-15) = 1 - 2**-30: half an ulp of r less 2**-54, exactly.
    hard_a = sign * 2.0**-24 * (1 + 2.0**-15) * torch.ones(count)
    hard_b = torch.full((count,), 1 - 2.0**-15)
    return torch.cat([a, hard_a]), torch.cat([b, hard_b]), torch.cat([c, sign * r])


def test_fma32_rounds_once():
    a, b, c = _fma_cases(1500, seed=0)
    want = torch.tensor([_fp32_nearest(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                         for x, y, z in zip(a, b, c)])
    assert torch.equal(fma32(a, b, c), want)
    double_rounded = (a.double() * b.double() + c.double()).float()
    assert not torch.equal(double_rounded, want)  # the hard cases are hard
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 3e38])
    assert torch.equal(fma32(special, torch.ones(5), torch.ones(5)), special + 1)


def test_fma32_equals_the_kernels_fma(triton_device):
    a, b, c = _fma_cases(1 << 17, seed=1)
    out = torch.empty_like(a, device=triton_device)
    _fma_kernel[(a.numel() // 1024,)](a.to(triton_device), b.to(triton_device), c.to(triton_device), out, 1024)
    assert torch.equal(out.cpu(), fma32(a, b, c))


@pytest.mark.parametrize("bits,signed", DYNAMIC_MAPS)
def test_computed_code_equals_bucketize(bits, signed):
    qmap = dynamic_map(signed, bits)
    codes = DynamicCodes.for_map(qmap)
    assert codes is not None and (codes.bits, codes.signed) == (bits, signed)
    x, midpoints = probes(qmap, codes, seed=1), map_midpoints(qmap)
    assert torch.equal(encode_ref(codes, x, midpoints), torch.bucketize(x, midpoints))


LINEAR_MAPS = [(bits, include_zero) for bits in range(2, 9) for include_zero in (True, False)]


@pytest.mark.parametrize("bits,include_zero", LINEAR_MAPS)
def test_unsigned_linear_maps_are_one_line(bits, include_zero):
    qmap = linear_map(False, bits, include_zero)
    codes = DynamicCodes.for_map(qmap)
    assert codes is not None and codes.kind == (LINEAR if include_zero else LINEAR_NOZERO) and codes.levels == 1
    x, midpoints = probes(qmap, codes, seed=2), map_midpoints(qmap)
    assert torch.equal(encode_ref(codes, x, midpoints), torch.bucketize(x, midpoints))


def test_other_maps_keep_the_search():
    nudged = dynamic_map(True, 8)
    nudged[200] = nudged[200].nextafter(torch.tensor(2.0))  # one entry one ulp off
    nudged_linear = linear_map(False, 8)
    nudged_linear[100] = nudged_linear[100].nextafter(torch.tensor(2.0))
    # The signed linear map repeats -1 (a symmetric grid in 2**bits entries): not one line, searched.
    for qmap in (linear_map(True, 8), nudged_linear, nudged, dynamic_map(True, 8)[:100], dynamic_map(True, 8).flip(0)):
        assert DynamicCodes.for_map(qmap) is None


def test_an_edited_map_is_read_again():
    qmap = dynamic_map(True, 8)
    assert DynamicCodes.for_map(qmap) is not None
    qmap[3] += 1e-3  # in place: same tensor, new version
    assert DynamicCodes.for_map(qmap) is None


@pytest.mark.parametrize("column,change", [(COL_OFFSET, lambda t: t + 0.3), (COL_SLOPE, lambda t: t * 1.01)])
def test_verification_rejects_wrong_parameters(column, change):
    qmap = dynamic_map(True, 8)
    codes = DynamicCodes.for_map(qmap)
    table = codes.table.clone()
    rows = slice(column * LEVELS_CAPACITY, (column + 1) * LEVELS_CAPACITY)
    table[rows] = change(table[rows])
    assert verify_encode(codes, qmap)
    assert not verify_encode(dataclasses.replace(codes, table=table), qmap)


@pytest.mark.parametrize("kind,bits,signed", [("dynamic", 8, True), ("dynamic", 8, False), ("dynamic", 5, True),
                                              ("linear", 8, False), ("linear_nozero", 4, False)])
def test_triton_encoder_equals_bucketize(triton_device, kind, bits, signed):
    device = triton_device
    import triton

    qmap = make_map(kind, signed, bits)
    codes = DynamicCodes.for_map(qmap, device)
    midpoints = map_midpoints(qmap)
    x = probes(qmap, codes)[:30_000] if device == "cpu" else probes(qmap, codes)  # the interpreter is slow
    out = torch.full(x.shape, -1, dtype=torch.int32, device=device)
    block = 1024
    _encode_kernel[(triton.cdiv(x.numel(), block),)](x.to(device), out, x.numel(), midpoints.to(device), bits,
                                                    signed, codes.kind, block)
    assert torch.equal(out.cpu().long(), torch.bucketize(x, midpoints))


@pytest.mark.parametrize("bits,signed", DYNAMIC_MAPS)
def test_triton_level_constants_equal_the_verified_table(triton_device, bits, signed):
    """The kernels' compile-time thresholds, slopes and offsets are the entries ``verify_encode`` checked."""
    codes = DynamicCodes.for_map(dynamic_map(signed, bits))
    out = torch.zeros(codes.table.numel(), dtype=torch.float32, device=triton_device)
    _level_parameters_kernel[(1,)](out, bits, signed)
    levels = [column * LEVELS_CAPACITY + level for column in (COL_THRESHOLD, COL_SLOPE, COL_OFFSET)
              for level in range(codes.levels)]
    assert torch.equal(out.cpu()[levels], codes.table[levels])


def test_update_kernel_computes_codes_for_dynamic_and_unsigned_linear_maps():
    pytest.importorskip("triton")
    from effllm.kernels._optim_update_triton import _map_args

    placeholder = torch.zeros(1, dtype=torch.int64)
    device = torch.device("cpu")
    computed = {name: _map_args(qmap, device, placeholder)[1]["COMPUTED"] for name, qmap in {
        "dynamic-8": dynamic_map(True, 8), "dynamic-unsigned-8": dynamic_map(False, 8),
        "dynamic-4": dynamic_map(True, 4), "linear-8": linear_map(True, 8),
        "linear-nozero-4": linear_map(False, 4, include_zero=False)}.items()}
    # Every verified map, 4-bit ones too (fewer instructions than the search); the signed linear map is searched.
    assert computed == {"dynamic-8": DYNAMIC, "dynamic-unsigned-8": DYNAMIC, "dynamic-4": DYNAMIC,
                        "linear-8": SEARCHED, "linear-nozero-4": LINEAR_NOZERO}
