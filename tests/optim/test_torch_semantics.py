"""effllm optimizers behave as ``torch.optim.Optimizer`` does: param groups, closures, LR schedulers,
``zero_grad``, ``add_param_group``, parameters without gradients, and argument checking."""

from __future__ import annotations

import warnings

import pytest
import torch

from effllm.optim import Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit, SGD8bit, override

LARGE = 4096 * 2  # above min_8bit_size: quantized state
SMALL = 100  # below min_8bit_size: 32-bit state
ATOL = 1e-5  # float tolerance against torch.optim (measured differences are ~1e-7)


def _params(*sizes, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(size, generator=generator)) for size in sizes]


def _set_grads(params, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)


def test_param_groups_keep_their_own_lr_and_state_bits():
    frozen, eight_bit, full = _params(LARGE, LARGE, LARGE)
    optimizer = AdamW8bit(
        [{"params": [frozen], "lr": 0.0}, {"params": [eight_bit]}, {"params": [full], "state_bits": 32}],
        lr=1e-2,
        weight_decay=0.0,
    )
    before = [p.detach().clone() for p in (frozen, eight_bit, full)]
    _set_grads([frozen, eight_bit, full], seed=1)
    optimizer.step()
    assert torch.equal(frozen, before[0])  # lr 0 in its group
    assert not torch.equal(eight_bit, before[1]) and not torch.equal(full, before[2])
    assert optimizer.state[eight_bit]["state1"].dtype == torch.uint8
    assert optimizer.state[full]["state1"].dtype == torch.float32
    assert optimizer.state[full]["state1"].shape == full.shape
    assert [group["state_bits"] for group in optimizer.param_groups] == [8, 8, 32]


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    (weight,) = _params(SMALL)
    target = torch.ones(SMALL)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = ((weight - target) ** 2).sum()
        loss.backward()
        return loss

    optimizer = Adam8bit([weight], lr=0.1)
    first = optimizer.step(closure)
    for _ in range(20):
        last = optimizer.step(closure)
    assert calls == [True] * 21
    assert torch.is_tensor(first) and float(last.detach()) < float(first.detach())
    assert optimizer.step() is None  # no closure, no loss


def test_closure_step_equals_torch_closure_step():
    target = torch.linspace(-1, 1, SMALL)

    def train(optimizer_class, **kwargs):
        (weight,) = _params(SMALL)
        optimizer = optimizer_class([weight], **kwargs)

        def closure():
            optimizer.zero_grad()
            loss = ((weight - target) ** 4).sum()
            loss.backward()
            return loss

        losses = [float(optimizer.step(closure).detach()) for _ in range(10)]
        return weight.detach(), losses

    expected, expected_losses = train(torch.optim.Adam, lr=0.05)
    actual, actual_losses = train(Adam8bit, lr=0.05, state_bits=32)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)
    assert actual_losses == pytest.approx(expected_losses, rel=1e-5)


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.3),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    # OneCycleLR also cycles Adam's beta1 through the param group's "betas".
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_scheduler_drives_the_update_like_torch(name):
    def train(make_optimizer):
        params = _params(LARGE, SMALL)
        optimizer = make_optimizer(params)
        scheduler = SCHEDULERS[name](optimizer)
        lrs = []
        for step in range(12):
            _set_grads(params, seed=step)
            optimizer.step()
            scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
        return [p.detach() for p in params], lrs

    with warnings.catch_warnings():
        # e.g. "lr_scheduler.step() before optimizer.step()": would mean step() is not seen as wrapped
        warnings.simplefilter("error")
        expected, expected_lrs = train(lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.1))
        actual, actual_lrs = train(lambda ps: AdamW8bit(ps, lr=0.02, weight_decay=0.1, state_bits=32))
    assert actual_lrs == pytest.approx(expected_lrs)
    assert len(set(actual_lrs)) > 1  # the schedule really changed the learning rate
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_lr_set_to_zero_by_scheduler_stops_8bit_updates():
    (weight,) = _params(LARGE)
    optimizer = Adam8bit([weight], lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 2 else 0.0)
    for step in range(4):
        _set_grads([weight], seed=step)
        before = weight.detach().clone()
        optimizer.step()
        scheduler.step()
        assert torch.equal(weight, before) == (step >= 2)


def test_zero_grad_sets_to_none_by_default_or_zeros():
    params = _params(LARGE, SMALL)
    optimizer = Lion8bit(params)
    _set_grads(params, seed=0)
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


def test_add_param_group_fills_defaults_and_trains_the_new_group():
    first, second = _params(LARGE, LARGE)
    optimizer = SGD8bit([first], lr=0.1, momentum=0.9)
    optimizer.add_param_group({"params": [second], "lr": 0.01, "state_bits": 32})
    group = optimizer.param_groups[1]
    assert group["momentum"] == 0.9 and group["min_8bit_size"] == 4096 and group["lr"] == 0.01
    before = second.detach().clone()
    _set_grads([first, second], seed=3)
    expected_step = 0.01 * second.grad  # first SGD step: momentum buffer = gradient
    optimizer.step()
    torch.testing.assert_close(second.detach(), before - expected_step)
    assert optimizer.state[second]["state1"].dtype == torch.float32
    assert optimizer.state[first]["state1"].dtype == torch.uint8


def test_add_param_group_rejects_a_parameter_already_present():
    (weight,) = _params(SMALL)
    optimizer = AdamW8bit([weight])
    with pytest.raises(ValueError, match="more than one"):
        optimizer.add_param_group({"params": [weight]})


def test_parameters_without_gradient_are_skipped():
    with_grad, without_grad = _params(LARGE, LARGE)
    optimizer = AdamW8bit([with_grad, without_grad], lr=0.01, weight_decay=0.5)
    before = without_grad.detach().clone()
    for step in range(3):
        _set_grads([with_grad], seed=step)
        optimizer.step()
    assert torch.equal(without_grad, before)  # not even weight decay touched it
    assert without_grad not in optimizer.state
    assert optimizer.state[with_grad]["step"] == 3


INVALID = {
    "negative lr": (lambda p: AdamW8bit(p, lr=-1.0), "learning rate"),
    "beta1 >= 1": (lambda p: Adam8bit(p, betas=(1.0, 0.999)), "betas"),
    "beta2 < 0": (lambda p: AdamW8bit(p, betas=(0.9, -0.1)), "betas"),
    "negative eps": (lambda p: Adam8bit(p, eps=-1e-8), "eps"),
    "negative weight decay": (lambda p: AdamW8bit(p, weight_decay=-0.1), "weight_decay"),
    "state bits 16": (lambda p: AdamW8bit(p, state_bits=16), "state_bits"),
    "state bits in a group": (lambda p: AdamW8bit([{"params": p, "state_bits": 2}]), "state_bits"),
    "zero blocksize": (lambda p: AdamW8bit(p, blocksize=0), "blocksize"),
    "negative momentum": (lambda p: SGD8bit(p, momentum=-0.5), "momentum"),
    "nesterov without momentum": (lambda p: SGD8bit(p, momentum=0.0, nesterov=True), "nesterov"),
    "nesterov with dampening": (lambda p: SGD8bit(p, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    "centered rmsprop": (lambda p: RMSprop8bit(p, centered=True), "centered"),
    "rmsprop alpha": (lambda p: RMSprop8bit(p, alpha=1.5), "alpha"),
    "lion betas": (lambda p: Lion8bit(p, betas=(0.9, 1.0)), "betas"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_arguments_raise_a_clear_value_error(case):
    make, mentioned = INVALID[case]
    with pytest.raises(ValueError, match=mentioned):
        make(_params(SMALL))


def test_invalid_override_raises_a_clear_value_error():
    (weight,) = _params(SMALL)
    with pytest.raises(ValueError, match="overridable"):
        override(weight, lr=0.1)
