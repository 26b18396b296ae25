"""QuantLinear's forward runs the packed-weight matmul (effllm.kernels.qmatmul) and equals dequantize-then-linear;
its cached kernel plan follows the buffers and never reaches a saved file."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from effllm.kernels import cpu_kernels_available

from effllm.quant.quant_linear import QuantLinear
from effllm.quant.weight_quant import WeightQuantSpec, fake_quant_activation, minmax_scales, quantize_weight

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not cpu_kernels_available(), reason="no C compiler"))]
# Relative to |x| @ |W|.T: the kernels sum the same fp32 products in another order.
SUM_TOLERANCE = 2e-6


def quant_linear(spec: WeightQuantSpec, in_features: int = 64, out_features: int = 24, bias: bool = True,
                 act_bits: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> QuantLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    scale, zero = minmax_scales(weight, spec)
    codes = quantize_weight(weight, scale, zero, spec)
    bias_values = torch.randn(out_features, generator=generator) if bias else None
    return QuantLinear.from_codes(codes, scale, zero, bias_values, spec, act_bits, dtype)


def dequantize_then_linear(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if layer.act_bits:
        x = fake_quant_activation(x, layer.act_bits)
    return torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)


def assert_matches_dequantize_then_linear(layer: QuantLinear, x: torch.Tensor) -> None:
    with torch.no_grad():
        out, expected = layer(x), dequantize_then_linear(layer, x)
        bound = SUM_TOLERANCE * (x.abs() @ layer.dequantized_weight().abs().T + layer.bias.abs()) + 1e-30
    assert out.shape == expected.shape and ((out - expected).abs() <= bound).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("spec", [WeightQuantSpec(4, 32), WeightQuantSpec(3, 16, True), WeightQuantSpec(2, None),
                                  WeightQuantSpec(8, 64)], ids=lambda spec: f"w{spec.bits}g{spec.group_size}")
def test_forward_equals_dequantize_then_linear(monkeypatch, backend, rows, spec):
    monkeypatch.setenv("EFFLLM_KERNEL", backend)
    layer = quant_linear(spec)
    assert_matches_dequantize_then_linear(layer, torch.randn(2, rows, 64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_with_activation_quantization(monkeypatch, backend):
    monkeypatch.setenv("EFFLLM_KERNEL", backend)
    assert_matches_dequantize_then_linear(quant_linear(WeightQuantSpec(4, 32), act_bits=8), torch.randn(3, 64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_follows_loaded_weights(monkeypatch, backend):
    monkeypatch.setenv("EFFLLM_KERNEL", backend)
    spec = WeightQuantSpec(4, 32)
    # bf16 scales: the CPU plan keeps an fp32 copy of them, which a stale plan would go on using.
    layer, other = quant_linear(spec, seed=0, dtype=torch.bfloat16), quant_linear(spec, seed=1, dtype=torch.bfloat16)
    x = torch.randn(1, 64)
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(other.state_dict())  # copies into the same buffers
        after = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, other(x).detach(), rtol=0, atol=0)


def test_plan_is_not_saved_and_survives_copies():
    layer = quant_linear(WeightQuantSpec(3, 16))
    x = torch.randn(2, 64)
    with torch.no_grad():
        expected = layer(x)  # builds the plan
        assert set(layer.state_dict()) == {"qweight", "scales", "zeros", "bias"}
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


def test_layer_made_in_inference_mode():
    with torch.inference_mode():
        layer = quant_linear(WeightQuantSpec(4, 32))
        assert_matches_dequantize_then_linear(layer, torch.randn(1, 64))


def test_gradients_reach_the_input_and_bias():
    layer = quant_linear(WeightQuantSpec(4, 32))
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(dim=0).expand(3, 64))
    torch.testing.assert_close(layer.bias.grad, torch.full_like(layer.bias, 3.0))


def test_bfloat16_layer_keeps_dtype():
    layer = quant_linear(WeightQuantSpec(4, 32)).to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        expected = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-2)
