"""Blockwise quantize / dequantize: every backend equals the reference, and the reference meets its oracles.

Codes are compared for exact equality: quantizing is one IEEE division and comparisons against the map's
fp32 midpoints, which every backend can reproduce bit for bit. Dequantizing is one fp32 product (then a
cast), so it is exact too.
"""

from __future__ import annotations

import pytest
import torch
from effllm.kernels.blockwise import (
    dequantize_blockwise,
    dequantize_blockwise_ref,
    nearest_code_ref,
    num_blocks,
    quantize_blockwise,
    quantize_blockwise_ref,
)
from effllm.kernels.quant_maps import make_map, map_midpoints

SHAPES = [(1,), (7,), (255,), (256,), (257,), (4097,), (3, 1000)]
BLOCKSIZES = [64, 128, 256, 2048]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (kind, signed, bits) of the maps the core ships.
MAPS = [("dynamic", True, 8), ("dynamic", False, 8), ("dynamic", True, 4), ("linear", True, 8),
        ("linear_nozero", False, 4)]

# How close (in float32 ulps of the midpoint) a value may be to an exact midpoint and still round either way.
NEAR_TIE_ULPS = 2
# SQNR (dB) of 8-bit dynamic blockwise quantization of 65536 standard normal values, blocks of 256, measured with
# the reference: 39.3 signed, 45.3 unsigned on |x|; 4-bit signed dynamic 16.1, 8-bit linear 43.1. Floors sit
# a little below, so any change that costs precision fails.
SQNR_FLOOR_DB = {("dynamic", True, 8): 38.5, ("dynamic", False, 8): 44.5, ("dynamic", True, 4): 15.5,
                 ("linear", True, 8): 42.5}


def _data(shape, dtype=torch.float32, device="cpu", seed=0, signed=True):
    """Normal values whose scale changes over six decades along the tensor, so blocks have different absmax."""
    generator = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    x = torch.randn(numel, generator=generator) * torch.logspace(-3, 3, numel)
    x = x if signed else x.abs()
    return x.reshape(shape).to(dtype=dtype, device=device)


def _check_against_reference(x, qmap, blocksize, out_dtype):
    codes, absmax = quantize_blockwise(x, qmap, blocksize)
    ref_codes, ref_absmax = quantize_blockwise_ref(x, qmap, blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == (x.numel(),)
    assert absmax.dtype == torch.float32 and absmax.shape == (num_blocks(x.numel(), blocksize),)
    assert torch.equal(codes, ref_codes), f"{int((codes != ref_codes).sum())} codes differ from the reference"
    assert torch.equal(absmax, ref_absmax)
    values = dequantize_blockwise(codes, absmax, qmap, blocksize, out_dtype)
    assert values.dtype == out_dtype and values.shape == (x.numel(),)
    torch.testing.assert_close(values, dequantize_blockwise_ref(codes, absmax, qmap, blocksize, out_dtype),
                               rtol=0, atol=0)


# --- every backend against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_matches_reference(backend, shape, blocksize):
    _, device = backend
    qmap = make_map("dynamic", True, 8, device)
    _check_against_reference(_data(shape, device=device), qmap, blocksize, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7,), (257,), (3, 1000)], ids=str)
def test_backend_matches_reference_in_each_dtype(backend, shape, dtype):
    _, device = backend
    qmap = make_map("dynamic", True, 8, device)
    _check_against_reference(_data(shape, dtype, device), qmap, 256, dtype)


@pytest.mark.parametrize("kind,signed,bits", MAPS)
def test_backend_matches_reference_for_each_map(backend, kind, signed, bits):
    _, device = backend
    qmap = make_map(kind, signed, bits, device)
    _check_against_reference(_data((4097,), device=device, signed=signed), qmap, 128, torch.float32)


@pytest.mark.parametrize("blocksize,numel", [(100, 1001), (2, 9), (1, 5), (5000, 12001)])
def test_backend_matches_reference_for_unusual_blocksizes(backend, blocksize, numel):
    """Blocks that are not a power of two, tiny blocks, and blocks longer than one kernel tile."""
    _, device = backend
    qmap = make_map("dynamic", True, 8, device)
    _check_against_reference(_data((numel,), device=device), qmap, blocksize, torch.float32)


def test_zero_blocks_quantize_to_zero(backend):
    _, device = backend
    blocksize = 64
    x = _data((5 * blocksize,), device=device)
    x[blocksize : 3 * blocksize] = 0  # two whole blocks of zeros
    for kind, signed in [("dynamic", True), ("linear_nozero", False)]:  # the second map has no 0 entry
        qmap = make_map(kind, signed, 8 if kind == "dynamic" else 4, device)
        xs = x if signed else x.abs()
        codes, absmax = quantize_blockwise(xs, qmap, blocksize)
        assert torch.equal(codes, quantize_blockwise_ref(xs, qmap, blocksize)[0])
        assert absmax[1] == 0 and absmax[2] == 0 and torch.all(absmax[[0, 3, 4]] > 0)
        values = dequantize_blockwise(codes, absmax, qmap, blocksize)
        assert torch.all(values[blocksize : 3 * blocksize] == 0)


def test_empty_tensor(backend):
    _, device = backend
    qmap = make_map("dynamic", True, 8, device)
    codes, absmax = quantize_blockwise(torch.empty(0, device=device), qmap, 256)
    assert codes.shape == (0,) and absmax.shape == (0,)
    assert dequantize_blockwise(codes, absmax, qmap, 256).shape == (0,)


def test_invalid_arguments_raise(backend):
    _, device = backend
    x = torch.randn(10, device=device)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise(x, make_map("dynamic", True, 8, device), 0)
    with pytest.raises(ValueError, match="map"):
        quantize_blockwise(x, torch.linspace(-1, 1, 512, device=device), 256)


# --- the reference against independent oracles ------------------------------------------------------------


def _sqnr_db(x: torch.Tensor, approx: torch.Tensor) -> float:
    x, approx = x.double(), approx.double()
    return float(10 * torch.log10(x.pow(2).sum() / (x - approx).pow(2).sum()))


@pytest.mark.parametrize("kind,signed,bits", list(SQNR_FLOOR_DB))
def test_reference_sqnr_floor(kind, signed, bits):
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    x = x if signed else x.abs()
    qmap = make_map(kind, signed, bits)
    codes, absmax = quantize_blockwise_ref(x, qmap, 256)
    assert _sqnr_db(x, dequantize_blockwise_ref(codes, absmax, qmap, 256)) >= SQNR_FLOOR_DB[(kind, signed, bits)]


def test_reference_sqnr_grows_with_bits_and_smaller_blocks():
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(1))

    def sqnr(bits, blocksize):
        qmap = make_map("dynamic", True, bits)
        return _sqnr_db(x, dequantize_blockwise_ref(*quantize_blockwise_ref(x, qmap, blocksize), qmap, blocksize))

    assert sqnr(4, 256) < sqnr(6, 256) < sqnr(8, 256)
    assert sqnr(8, 2048) < sqnr(8, 256) < sqnr(8, 64)


@pytest.mark.parametrize("kind,signed,bits", MAPS)
def test_reference_code_is_brute_force_nearest(kind, signed, bits):
    """bucketize over midpoints == argmin |x - map| computed in float64 (ties to the lower index)."""
    qmap = make_map(kind, signed, bits)
    generator = torch.Generator().manual_seed(2)
    low = -1.0 if signed else 0.0
    x = low + (1 - low) * torch.rand(6000, generator=generator)
    x = torch.cat([x, x[:1500] * 1e-4, x[:1500] * 1e-7])  # the dense small-magnitude end of the dynamic map
    distance = (x.double()[:, None] - qmap.double()[None, :]).abs()
    oracle = distance.argmin(dim=1)  # first minimum: the lower code on an exact tie
    codes = nearest_code_ref(x, qmap).long()
    # The reference compares with midpoints rounded to fp32; a value within an ulp of the exact midpoint may
    # legitimately go either way. Everything else must agree.
    exact_mid = (qmap.double()[1:] + qmap.double()[:-1]) / 2
    tie_width = NEAR_TIE_ULPS * torch.finfo(torch.float32).eps * exact_mid.abs()
    near_tie = ((x.double()[:, None] - exact_mid[None, :]).abs() <= tie_width[None, :]).any(1)
    assert int(near_tie.sum()) < x.numel() // 1000
    # Compare the entries the codes stand for: a repeated entry (the linear map's -1) has two equally good codes.
    assert torch.equal(qmap[codes[~near_tie]], qmap[oracle[~near_tie]])
    # The same value as its entry always gets that entry's code (the first, for a repeated entry).
    entries = nearest_code_ref(qmap, qmap).long()
    assert torch.equal(qmap[entries], qmap)


@pytest.mark.parametrize("kind,signed,bits", [("dynamic", True, 8), ("linear", True, 4)])
def test_reference_exact_midpoints_take_the_lower_code(kind, signed, bits):
    qmap = make_map(kind, signed, bits)
    mid = map_midpoints(qmap)
    distinct = qmap[1:] > qmap[:-1]
    lower = torch.arange(qmap.numel() - 1)[distinct]
    assert torch.equal(nearest_code_ref(mid[distinct], qmap).long(), lower)
    above = torch.nextafter(mid[distinct], torch.full_like(mid[distinct], 2.0))
    assert torch.equal(nearest_code_ref(above, qmap).long(), lower + 1)


@pytest.mark.parametrize("kind,signed,bits", MAPS)
def test_reference_round_trip(kind, signed, bits):
    blocksize = 128
    qmap = make_map(kind, signed, bits)
    x = _data((50 * blocksize + 3,), signed=signed, seed=3)
    codes, absmax = quantize_blockwise_ref(x, qmap, blocksize)
    values = dequantize_blockwise_ref(codes, absmax, qmap, blocksize)

    def per_block(t):  # [numel] -> [nblocks, blocksize], zero-padded
        return torch.nn.functional.pad(t, (0, absmax.numel() * blocksize - t.numel())).view(-1, blocksize)

    # Absmax is each block's largest magnitude.
    assert torch.equal(absmax, per_block(x).abs().amax(1))
    # Within the map's range, each value moves by at most half the gap around its code, in units of absmax.
    element_absmax = absmax.repeat_interleave(blocksize)[: x.numel()]
    normalized = x / element_absmax
    gaps = qmap.diff()
    half_gap = torch.maximum(torch.cat([gaps[:1], gaps]), torch.cat([gaps, gaps[-1:]]))[codes.long()] / 2
    inside = (normalized >= qmap.min()) & (normalized <= qmap.max())
    assert float(inside.float().mean()) > 0.8
    error_bound = half_gap * element_absmax * (1 + 1e-6)
    assert torch.all(((x - values).abs() <= error_bound)[inside])
    # Requantizing the reconstruction gives back the same codes, in blocks whose absmax it keeps.
    same_absmax = per_block(values).abs().amax(1) == absmax
    assert bool(same_absmax.any())
    again, _ = quantize_blockwise_ref(values, qmap, blocksize)
    kept = same_absmax.repeat_interleave(blocksize)[: x.numel()]
    assert torch.equal(again[kept], codes[kept])
