import pytest
import torch

from effllm.quant.weight_quant import (
    WeightQuantSpec,
    dequantize_weight,
    fake_quant_activation,
    fake_quant_weight,
    minmax_scales,
    quantize_weight,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16, 48])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_within_half_step(bits, group_size, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(7, 96)
    spec = WeightQuantSpec(bits, group_size, symmetric)
    scale, zero = minmax_scales(w, spec)
    q = quantize_weight(w, scale, zero, spec)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    w_hat = dequantize_weight(q, scale, zero, spec)
    step = scale.repeat_interleave(96 // scale.shape[1], dim=1)
    # Min-max ranges cover every value, so rounding moves each by at most half a step (plus the zero's rounding).
    assert torch.all((w - w_hat).abs() <= step * (0.5 + 1e-4) + (0 if symmetric else step * 0.5))
    assert torch.equal(fake_quant_weight(w, spec), w_hat)


def test_more_bits_and_smaller_groups_are_more_accurate():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.logspace(-1, 1, 128)  # uneven columns, as in LLM weights
    def err(spec):
        return (fake_quant_weight(w, spec) - w).pow(2).mean().item()
    assert err(WeightQuantSpec(3)) > err(WeightQuantSpec(4)) > err(WeightQuantSpec(8))
    assert err(WeightQuantSpec(4)) > err(WeightQuantSpec(4, 32))


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide the input dimension 100"):
        minmax_scales(torch.randn(4, 100), WeightQuantSpec(4, 64))
    with pytest.raises(ValueError, match="weight bits"):
        WeightQuantSpec(9)


def test_straight_through_gradient():
    w = torch.randn(4, 32, requires_grad=True)
    fake_quant_weight(w, WeightQuantSpec(4, 16)).sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))


def test_per_token_activation_quant():
    x = torch.randn(2, 5, 64) * torch.tensor([1.0, 100.0]).view(2, 1, 1)
    y = fake_quant_activation(x, 8)
    per_token_step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((x - y).abs() <= per_token_step * 0.5 + 1e-6)
    with pytest.raises(ValueError, match="activation bits"):
        fake_quant_activation(x, 3)
