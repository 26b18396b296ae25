import pytest
import torch

from effllm.quant.range_search import search_scales
from effllm.quant.weight_quant import WeightQuantSpec, dequantize_weight, minmax_scales, quantize_weight


def heavy_tailed_weight(seed: int, shape=(48, 96)) -> torch.Tensor:
    """Student-t weights: a few large values per group, as in trained transformers."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=generator)
    chi = torch.randn((3, *shape), generator=generator).pow(2).mean(dim=0)
    return normal / chi.sqrt()


def group_errors(w, scale, zero, spec, importance=None) -> torch.Tensor:
    error = (dequantize_weight(quantize_weight(w, scale, zero, spec), scale, zero, spec) - w).abs().pow(2.4)
    if importance is not None:
        error = error * importance
    return error.reshape(*scale.shape, -1).sum(dim=-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_no_group_worse_than_minmax_and_low_bits_much_better(bits, group_size, symmetric):
    spec = WeightQuantSpec(bits, group_size, symmetric)
    w = heavy_tailed_weight(bits)
    scale, zero = search_scales(w, spec)
    minmax = minmax_scales(w, spec)
    searched_error, minmax_error = group_errors(w, scale, zero, spec), group_errors(w, *minmax, spec)
    assert (searched_error <= minmax_error * (1 + 1e-6)).all()
    assert (scale <= minmax[0] * (1 + 1e-6)).all()  # only ever shrinks the range
    if bits <= 3:  # outliers waste much of a 4- or 8-level grid: clipping them pays off
        assert searched_error.sum() < {2: 0.8, 3: 0.95}[bits] * minmax_error.sum()
    codes = quantize_weight(w, scale, zero, spec)
    assert int(codes.max()) <= spec.max_code and torch.equal(zero, zero.round())


def test_importance_moves_the_ranges_towards_the_important_columns():
    spec = WeightQuantSpec(2, 32)
    w = heavy_tailed_weight(0)
    importance = torch.ones(w.shape[1])
    importance[::4] = 100.0
    plain = search_scales(w, spec)
    weighted = search_scales(w, spec, importance=importance)
    assert not torch.equal(plain[0], weighted[0])
    # each search is best on its own objective
    assert group_errors(w, *weighted, spec, importance).sum() < group_errors(w, *plain, spec, importance).sum()
    assert group_errors(w, *plain, spec).sum() <= group_errors(w, *weighted, spec).sum()


def test_zero_groups_and_bad_arguments():
    spec = WeightQuantSpec(3, 16)
    w = heavy_tailed_weight(1, (8, 32))
    w[:, :16] = 0
    scale, zero = search_scales(w, spec)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(dequantize_weight(quantize_weight(w, scale, zero, spec), scale, zero, spec)[:, :16],
                       torch.zeros(8, 16))
    with pytest.raises(ValueError, match="importance"):
        search_scales(w, spec, importance=torch.ones(5))
    with pytest.raises(ValueError, match="max_shrink"):
        search_scales(w, spec, max_shrink=1.0)


def test_a_given_start_is_never_made_worse():
    spec = WeightQuantSpec(2, 32)
    w = heavy_tailed_weight(2)
    searched = search_scales(w, spec)
    # a start that is the searched optimum for half the rows and a bad (tiny) range for the others
    start_scale = searched[0].clone()
    start_scale[::2] = start_scale[::2] * 0.05
    start = (start_scale, searched[1].clone())
    result = search_scales(w, spec, start=start)
    errors = group_errors(w, *result, spec)
    assert (errors <= group_errors(w, *start, spec) * (1 + 1e-6)).all()
    assert (errors <= group_errors(w, *searched, spec) * (1 + 1e-6)).all()
    assert (errors[::2] < group_errors(w, *start, spec)[::2]).all()  # the bad starts were replaced
