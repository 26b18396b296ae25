import copy

import pytest
import torch
from ptq_models import make_tiny_llama
from torch import nn

from effllm.ptq.gptq import GPTQ, gptq_quantize
from effllm.ptq.hessian import HessianAccumulator, collect_hessians, shared_input_groups
from effllm.ptq.rtn import RTN
from effllm.ptq.runner import quantize_blocks
from effllm.quant.fake_quant_linear import FakeQuantLinear, wrap_linears
from effllm.quant.quant_linear import QuantLinear
from effllm.quant.weight_quant import WeightQuantSpec, fake_quant_activation, minmax_scales

TOKENS, FEATURES, OUTPUTS = 512, 128, 48
LOG10_COLUMN_SCALE_RANGE = (-2.0, 1.0)  # "very uneven" inputs: column scales spread over three decades
CODE_MISMATCH_TOLERANCE = 0.01  # fraction of codes float rounding may flip (a tie, then its knock-on effects)


def correlated_inputs(seed: int, uneven: bool = False, features: int = FEATURES) -> torch.Tensor:
    """X = Z A with a random mixing matrix A: the Hessian XᵀX is far from diagonal."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, features, generator=generator) @ torch.randn(features, features, generator=generator)
    if uneven:
        scales = torch.logspace(*LOG10_COLUMN_SCALE_RANGE, features)
        x = x * scales[torch.randperm(features, generator=generator)]
    return x


def random_weight(seed: int, features: int = FEATURES) -> torch.Tensor:
    return torch.randn(OUTPUTS, features, generator=torch.Generator().manual_seed(1000 + seed))


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    accumulator = HessianAccumulator(x.shape[-1])
    accumulator.add(x)
    return accumulator.hessian()


def output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    return (x @ weight.T - x @ quantized.T).pow(2).sum().item()


def fake_linear(weight: torch.Tensor, spec: WeightQuantSpec, act_bits: int | None = None) -> FakeQuantLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return FakeQuantLinear(linear, spec, act_bits)


def rtn_error(x: torch.Tensor, weight: torch.Tensor, spec: WeightQuantSpec) -> float:
    return output_error(x, weight, fake_linear(weight, spec).quantized_weight().detach())


def explicit_inverse_gptq(weight, hessian, spec, percdamp, act_order):
    """Oracle: the paper's column-by-column update with an explicit H⁻¹ downdated after every column, in fp64,
    without Cholesky or lazy blocks. Dynamic group scales (no act-order) come from the fully updated weight."""
    w = weight.double().clone()
    h = hessian.double() + percdamp * hessian.diagonal().mean().double() * torch.eye(hessian.shape[0])
    hinv = torch.linalg.inv(h)
    group_size = spec.group_size or w.shape[1]
    static = act_order or spec.group_size is None
    scale, zero = minmax_scales(weight, spec)
    scale, zero = scale.double(), zero.double()
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order else range(w.shape[1])
    for column in [int(c) for c in order]:
        group = column // group_size
        if not static and column % group_size == 0:
            group_scale, group_zero = minmax_scales(w[:, column : column + group_size].float(),
                                                    WeightQuantSpec(spec.bits, None, spec.symmetric))
            scale[:, group], zero[:, group] = group_scale[:, 0].double(), group_zero[:, 0].double()
        s, z = scale[:, group], zero[:, group]
        quantized = (torch.clamp(torch.round(w[:, column] / s) + z, 0, spec.max_code) - z) * s
        error = (w[:, column] - quantized) / hinv[column, column]
        w -= error[:, None] * hinv[column][None, :]  # processed columns have zero rows in the downdated H⁻¹
        w[:, column] = quantized
        hinv -= torch.outer(hinv[:, column], hinv[column]) / hinv[column, column]
    return w.float()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_on_correlated_inputs(bits, group_size, act_order):
    spec = WeightQuantSpec(bits, group_size)
    for seed in range(2):
        x, weight = correlated_inputs(seed), random_weight(seed)
        fake = fake_linear(weight, spec)
        GPTQ(act_order=act_order).quantize_linear(fake, hessian_of(x))
        gptq = output_error(x, weight, fake.quantized_weight().detach())
        rtn = rtn_error(x, weight, spec)
        assert gptq < 0.8 * rtn, (seed, gptq / rtn)


@pytest.mark.parametrize("group_size,act_order", [(None, False), (32, False), (None, True), (32, True)])
def test_lazy_cholesky_form_matches_explicit_inverse_oracle(group_size, act_order):
    spec = WeightQuantSpec(3, group_size)
    x, weight = correlated_inputs(0, uneven=act_order), random_weight(0)
    # blocksize 24 does not align with groups of 32: dynamic scales must see the pending lazy update.
    result = gptq_quantize(weight, hessian_of(x), spec, percdamp=0.01, blocksize=24, act_order=act_order)
    oracle = explicit_inverse_gptq(weight, hessian_of(x), spec, 0.01, act_order)
    # Same codes give the same dequantized values up to fp32-vs-fp64 rounding; another code is a step away.
    mismatch = (~torch.isclose(result.weight, oracle, rtol=1e-5, atol=1e-6)).float().mean().item()
    assert mismatch < CODE_MISMATCH_TOLERANCE, mismatch
    ours, theirs = output_error(x, weight, result.weight), output_error(x, weight, oracle)
    assert ours == pytest.approx(theirs, rel=0.01)


@pytest.mark.parametrize("act_order", [False, True])
def test_blocksize_changes_codes_only_by_float_noise(act_order):
    spec = WeightQuantSpec(3, 32)
    x, weight = correlated_inputs(1, uneven=act_order), random_weight(1)
    reference = gptq_quantize(weight, hessian_of(x), spec, blocksize=128, act_order=act_order)
    for blocksize in (32, 7):
        other = gptq_quantize(weight, hessian_of(x), spec, blocksize=blocksize, act_order=act_order)
        mismatch = (other.codes != reference.codes).float().mean().item()
        assert mismatch < CODE_MISMATCH_TOLERANCE, (blocksize, mismatch)
        assert output_error(x, weight, other.weight) == pytest.approx(output_error(x, weight, reference.weight),
                                                                      rel=0.01)


def test_dampening_changes_nothing_essential():
    spec = WeightQuantSpec(3, None)
    x, weight = correlated_inputs(2), random_weight(2)
    rtn = rtn_error(x, weight, spec)
    errors = [output_error(x, weight, gptq_quantize(weight, hessian_of(x), spec, percdamp=p).weight)
              for p in (0.001, 0.01, 0.1)]
    assert max(errors) < 0.8 * rtn
    assert max(errors) < 1.25 * min(errors), errors


@pytest.mark.parametrize("group_size", [None, 32])
def test_act_order_helps_on_very_uneven_input_columns(group_size):
    spec = WeightQuantSpec(3, group_size)
    totals = {False: 0.0, True: 0.0}
    for seed in range(3):
        x, weight = correlated_inputs(seed, uneven=True), random_weight(seed)
        errors = {order: output_error(x, weight, gptq_quantize(weight, hessian_of(x), spec, act_order=order).weight)
                  for order in (False, True)}
        assert errors[True] <= 1.02 * errors[False], (seed, errors)
        totals = {order: totals[order] + errors[order] for order in totals}
    assert totals[True] < 0.9 * totals[False], totals


def test_act_order_implies_static_groups_and_dynamic_groups_follow_the_updates():
    spec = WeightQuantSpec(4, 32)
    x, weight = correlated_inputs(3), random_weight(3)
    original_scale, original_zero = minmax_scales(weight, spec)
    for kwargs in (dict(act_order=True), dict(static_groups=True), dict(act_order=True, static_groups=True)):
        result = gptq_quantize(weight, hessian_of(x), spec, **kwargs)
        torch.testing.assert_close(result.scale, original_scale, rtol=0, atol=0)
        torch.testing.assert_close(result.zero, original_zero, rtol=0, atol=0)
    dynamic = gptq_quantize(weight, hessian_of(x), spec)
    # The first group sees no error update before it; the later ones are scaled from the updated weight.
    torch.testing.assert_close(dynamic.scale[:, 0], original_scale[:, 0], rtol=0, atol=0)
    assert not torch.allclose(dynamic.scale[:, 1:], original_scale[:, 1:])


def test_dead_inputs_and_singular_hessian():
    spec = WeightQuantSpec(4, 32)
    x, weight = correlated_inputs(4), random_weight(4)
    dead = torch.tensor([0, 5, 77])
    x[:, dead] = 0
    result = gptq_quantize(weight, hessian_of(x), spec)
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, dead] == 0).all()  # an input that is always zero gets no weight
    assert output_error(x, weight, result.weight) < 0.8 * rtn_error(x, weight, spec)
    # Fewer tokens than features and no dampening: H is singular, the dampening is raised until it factors.
    few = x[: FEATURES // 2]
    undamped = gptq_quantize(weight, hessian_of(few), spec, percdamp=0.0)
    assert torch.isfinite(undamped.weight).all()
    assert output_error(few, weight, undamped.weight) < rtn_error(few, weight, spec)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size,act_order,act_bits", [(None, False, None), (32, False, 8), (32, True, None)])
def test_codes_reproduce_exactly_through_fake_quant_and_freeze(symmetric, group_size, act_order, act_bits):
    spec = WeightQuantSpec(3, group_size, symmetric)
    x, weight = correlated_inputs(5), random_weight(5)
    fake = fake_linear(weight, spec, act_bits)
    result = GPTQ(act_order=act_order).quantize_linear(fake, hessian_of(x))
    assert torch.equal(fake.codes(), result.codes)
    assert torch.equal(fake.quantized_weight().detach(), result.weight)
    frozen = fake.freeze()
    assert isinstance(frozen, QuantLinear) and torch.equal(frozen.codes(), result.codes)
    with torch.no_grad():
        assert torch.equal(fake(x), frozen(x))


@pytest.mark.parametrize("dtype,bits", [(torch.float16, 8), (torch.bfloat16, 7)])
def test_codes_reproduce_with_half_precision_weights(dtype, bits):
    # The widest codes each dtype holds exactly (see the gptq module docstring); the scale stays fp32.
    linear = nn.Linear(FEATURES, OUTPUTS)
    with torch.no_grad():
        linear.weight.copy_(random_weight(5))
    fake = FakeQuantLinear(linear.to(dtype), WeightQuantSpec(bits, 32))
    result = GPTQ().quantize_linear(fake, hessian_of(correlated_inputs(5)))
    assert fake.weight.dtype == dtype and torch.equal(fake.codes(), result.codes)


def test_linears_sharing_an_input_are_grouped_in_execution_order(tiny_llama):
    block = tiny_llama.model.layers[0]
    wrapped = wrap_linears(block, WeightQuantSpec(4))
    names = {module: name for name, module in wrapped.items()}
    hidden = torch.randn(2, 8, 32)
    position_embeddings = tiny_llama.model.rotary_emb(hidden, torch.arange(8)[None])
    groups = shared_input_groups(block, hidden, {"position_embeddings": position_embeddings})
    assert [[names[m] for m in group] for group in groups] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_stacked_group_equals_linear_by_linear():
    spec = WeightQuantSpec(3, 32)
    x = correlated_inputs(6)
    weights = [random_weight(seed) for seed in (6, 7, 8)]
    hessian = hessian_of(x)
    stacked = [fake_linear(w, spec) for w in weights]
    solver = GPTQ(act_order=False)  # dynamic groups (with searched ranges): the most row-dependent state
    solver.quantize_group(stacked, hessian)
    for weight, fake in zip(weights, stacked):
        alone = solver.solve(weight, hessian, spec)
        assert (fake.codes() != alone.codes).float().mean() < CODE_MISMATCH_TOLERANCE


def test_hessian_is_of_the_activation_quantized_input():
    x = correlated_inputs(7)[None]  # [1, tokens, features]
    fake = fake_linear(random_weight(7), WeightQuantSpec(4), act_bits=4)
    (hessian,) = collect_hessians(nn.Sequential(fake), x, {}, [fake])
    quantized_input = fake_quant_activation(x, 4)[0]
    torch.testing.assert_close(hessian, 2 * quantized_input.T @ quantized_input / TOKENS)
    assert not torch.allclose(hessian, hessian_of(x[0]))


def test_config_is_validated():
    with pytest.raises(ValueError, match="percdamp"):
        GPTQ(percdamp=-0.1)
    with pytest.raises(ValueError, match="blocksize"):
        GPTQ(blocksize=0)
    config = GPTQ(percdamp=0.05, blocksize=64, act_order=False)
    assert GPTQ(**config.to_dict()) == config


def test_window_of_two_blocks_equals_block_by_block(calib_ids):
    spec = WeightQuantSpec(3, 16)
    models = [make_tiny_llama(layers=4, seed=3) for _ in range(2)]
    quantize_blocks(models[0], calib_ids, spec, GPTQ(), progress=False)
    quantize_blocks(models[1], calib_ids, spec, GPTQ(window=2), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(models[1](calib_ids).logits, models[0](calib_ids).logits)


def test_runner_gptq_logits_closer_to_full_precision_than_rtn():
    spec = WeightQuantSpec(3, 16)
    variants = {"default": GPTQ(), "no_act_order": GPTQ(act_order=False), "not_sequential": GPTQ(sequential=False)}
    for seed in range(3):
        full_precision = make_tiny_llama(layers=2, seed=seed)
        generator = torch.Generator().manual_seed(100 + seed)
        calibration = torch.randint(0, 64, (8, 32), generator=generator)
        held_out = torch.randint(0, 64, (8, 32), generator=generator)
        with torch.no_grad():
            reference = full_precision(held_out).logits
        errors = {}
        for name, method in {"rtn": RTN(), **variants}.items():
            model = copy.deepcopy(full_precision)
            quantize_blocks(model, calibration, spec, method, progress=False)
            assert sum(isinstance(m, QuantLinear) for m in model.model.layers.modules()) == 2 * 7
            with torch.no_grad():
                errors[name] = nn.functional.mse_loss(model(held_out).logits, reference).item()
        assert all(errors[name] < errors["rtn"] for name in variants), (seed, errors)


@pytest.mark.parametrize("act_order", [False, True])
def test_given_ranges_are_kept_and_rounded_from_reproduces_the_codes(act_order):
    x, weight = correlated_inputs(7), random_weight(7)
    spec = WeightQuantSpec(3, 32)
    scale, zero = minmax_scales(weight * 0.8, spec)  # narrower ranges, as an outlier truncation would choose
    result = gptq_quantize(weight, hessian_of(x), spec, act_order=act_order, scale_zero=(scale, zero))
    assert torch.equal(result.scale, scale) and torch.equal(result.zero, zero)
    groups = result.rounded_from.reshape(OUTPUTS, -1, 32) / scale[..., None]
    codes = torch.clamp(torch.round(groups) + zero[..., None], 0, spec.max_code).reshape(OUTPUTS, -1)
    assert (codes.to(torch.uint8) != result.codes).float().mean() <= CODE_MISMATCH_TOLERANCE
    # the error feedback still pays: better than rounding to nearest on the same ranges
    nearest = torch.clamp(torch.round(weight.reshape(OUTPUTS, -1, 32) / scale[..., None]) + zero[..., None], 0,
                          spec.max_code)
    rtn = ((nearest - zero[..., None]) * scale[..., None]).reshape(weight.shape)
    assert output_error(x, weight, result.weight) < output_error(x, weight, rtn)
    with pytest.raises(ValueError, match="scale_zero must be two"):
        gptq_quantize(weight, hessian_of(x), spec, scale_zero=(scale[:, :1], zero[:, :1]))


@pytest.mark.parametrize("act_order", [False, True])
def test_searched_ranges_lower_the_output_error_at_two_bits(act_order):
    """Heavy-tailed weights (a few outliers per group): clipped ranges beat min-max ones under GPTQ too."""
    spec = WeightQuantSpec(2, 32)
    errors = {}
    for ranges in ("minmax", "mse", "hessian"):
        total = 0.0
        for seed in range(2):
            x = correlated_inputs(seed, uneven=True)
            weight = random_weight(seed) / torch.randn(OUTPUTS, FEATURES,
                                                       generator=torch.Generator().manual_seed(seed)).abs().sqrt()
            fake = fake_linear(weight, spec)
            GPTQ(act_order=act_order, ranges=ranges).quantize_linear(fake, hessian_of(x))
            total += output_error(x, weight, fake.quantized_weight().detach())
        errors[ranges] = total
    assert errors["mse"] < 0.9 * errors["minmax"], errors
    assert errors["hessian"] < 0.9 * errors["minmax"], errors


def test_ranges_option_is_validated():
    with pytest.raises(ValueError, match="ranges"):
        GPTQ(ranges="percentile")
    with pytest.raises(ValueError, match="ranges"):
        gptq_quantize(random_weight(0), hessian_of(correlated_inputs(0)), WeightQuantSpec(4, 32), ranges="max")
