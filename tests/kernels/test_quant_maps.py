"""Quantization maps: sizes, order, symmetry, and the dynamic map against bitsandbytes' own."""

from __future__ import annotations

import pytest
import torch
from effllm.kernels.quant_maps import MAP_KINDS, dynamic_map, linear_map, make_map, map_midpoints

DYNAMIC_BITS = range(2, 9)
LINEAR_BITS = range(1, 9)
MAX_ULPS_FROM_BITSANDBYTES = 2


@pytest.mark.parametrize("bits", DYNAMIC_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_size_order_and_range(bits, signed):
    qmap = dynamic_map(signed, bits)
    assert qmap.dtype == torch.float32 and qmap.shape == (2**bits,)
    assert torch.all(qmap[1:] > qmap[:-1]), "entries must be strictly increasing"
    assert qmap[-1] == 1.0 and 0.0 in qmap.tolist()
    assert qmap.min() >= (-1.0 if signed else 0.0)


@pytest.mark.parametrize("bits", DYNAMIC_BITS)
def test_signed_dynamic_map_is_symmetric_apart_from_one(bits):
    qmap = dynamic_map(True, bits)
    inner = qmap[:-1]  # everything but +1 (there is no -1: the spare code goes to +1)
    torch.testing.assert_close(inner, -inner.flip(0), rtol=0, atol=0)


def test_dynamic_map_spans_decades():
    # Seven decades of exponent below 1 for 8 bits: the smallest non-zero magnitude is in [1e-7, 1e-6].
    magnitudes = dynamic_map(True, 8).abs()
    smallest = magnitudes[magnitudes > 0].min().item()
    assert 1e-7 <= smallest < 1e-6


@pytest.mark.parametrize("bits", LINEAR_BITS)
def test_linear_maps_are_evenly_spaced(bits):
    signed = linear_map(True, bits)
    assert signed.shape == (2**bits,)
    top = 2 ** (bits - 1) - 1
    if top > 0:
        expected = torch.arange(-top, top + 1, dtype=torch.float32) / top
        torch.testing.assert_close(signed[1:], expected)  # code 0 repeats -1
        assert signed[0] == -1.0
    unsigned = linear_map(False, bits)
    torch.testing.assert_close(unsigned, torch.linspace(0, 1, 2**bits))
    nozero = linear_map(False, bits, include_zero=False)
    assert nozero.min() == 1.0 / 2**bits and nozero.max() == 1.0 and 0.0 not in nozero.tolist()
    torch.testing.assert_close(nozero.diff(), torch.full((2**bits - 1,), 1.0 / 2**bits))


def test_make_map_by_name_and_errors():
    assert torch.equal(make_map("dynamic", True, 8), dynamic_map(True, 8))
    assert torch.equal(make_map("linear", False, 4), linear_map(False, 4))
    assert torch.equal(make_map("linear_nozero", False, 4), linear_map(False, 4, include_zero=False))
    assert set(MAP_KINDS) == {"dynamic", "linear", "linear_nozero"}
    with pytest.raises(ValueError, match="unknown map kind"):
        make_map("tree", True, 8)
    with pytest.raises(ValueError):
        dynamic_map(True, 9)
    with pytest.raises(ValueError):
        linear_map(True, 4, include_zero=False)


def test_maps_are_not_shared_mutable_state():
    """The cache hands out copies per device call, so a caller writing into one cannot corrupt the next."""
    first = dynamic_map(True, 8, device="cpu")
    first_copy = first.clone()
    first.mul_(0)
    assert torch.equal(dynamic_map(True, 8), first_copy)


@pytest.mark.parametrize("kind,signed,bits", [("dynamic", True, 8), ("dynamic", False, 4), ("linear", True, 4)])
def test_midpoints_lie_between_neighbours(kind, signed, bits):
    qmap = make_map(kind, signed, bits)
    mid = map_midpoints(qmap)
    assert mid.shape == (qmap.numel() - 1,)
    assert torch.all(qmap[:-1] <= mid) and torch.all(mid <= qmap[1:])


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    """Same entries as ``bitsandbytes.functional.create_dynamic_map`` up to float32 rounding.

    bitsandbytes rounds each step of its construction to float32 while effllm rounds the exact value once,
    so some entries (72 signed, 100 unsigned) differ in the last bits: by at most MAX_ULPS_FROM_BITSANDBYTES
    (measured: 1 signed, 2 unsigned). The order of the entries, hence every code's meaning, is the same.
    """
    functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is in the dev extra")
    ours = dynamic_map(signed, 8)
    theirs = functional.create_dynamic_map(signed=signed).float().cpu()
    assert theirs.shape == ours.shape
    ulp = torch.nextafter(ours.abs(), torch.full_like(ours, 2.0)) - ours.abs()
    assert torch.all((theirs - ours).abs() <= MAX_ULPS_FROM_BITSANDBYTES * ulp)
    assert torch.equal(theirs.argsort(), ours.argsort())
