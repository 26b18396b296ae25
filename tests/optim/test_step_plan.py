"""A group's launches are planned once and reused (``effllm/optim/step_plan.py``): whatever changes between
steps (new gradient tensors, a parameter without a gradient, a parameter's storage, a state tensor) must
reach the update exactly as if nothing had been planned, and the plan must not keep gradients alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from effllm.kernels import backend_for

from effllm.optim import AdamW8bit

BACKENDS = ["torch"] if backend_for(torch.empty(0)) == "torch" else ["torch", "auto"]


@pytest.fixture(params=BACKENDS, autouse=True)
def kernel_backend(request, monkeypatch):
    monkeypatch.setenv("EFFLLM_KERNEL", request.param)
    return request.param


def _pair(seed=0):
    """Our AdamW with 32-bit states (which follows torch.optim.AdamW to float rounding) and torch's, on
    identical parameters: a 4096-element matrix and a small vector."""
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(64, 64, generator=gen)), torch.nn.Parameter(torch.randn(50, generator=gen))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return (AdamW8bit(ours, lr=1e-2, weight_decay=0.1, state_bits=32, min_8bit_size=1), ours,
            torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1), theirs)


def _set_grads(params_a, params_b, seed, skip=(), transpose=False):
    gen = torch.Generator().manual_seed(seed)
    for index, (a, b) in enumerate(zip(params_a, params_b)):
        if index in skip:
            a.grad = b.grad = None
            continue
        grad = torch.randn(a.shape, generator=gen)
        if transpose and grad.dim() == 2:  # same values, non-contiguous layout
            a.grad = grad.t().contiguous().t()
        else:
            a.grad = grad.clone()
        b.grad = grad.clone()


def _assert_same(ours, theirs):
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)


def test_new_gradient_tensors_every_step_reuse_the_plan_and_match_torch():
    optimizer, ours, reference, theirs = _pair()
    plans = []
    for seed in range(5):
        _set_grads(ours, theirs, seed)  # new tensors each step, as zero_grad(set_to_none=True) leaves them
        optimizer.step()
        reference.step()
        plans.append(optimizer._plans[0])
    assert all(plan is plans[0] for plan in plans), "a new gradient tensor should not re-plan the group"
    _assert_same(ours, theirs)


def test_non_contiguous_gradient_and_missing_gradients_follow_torch():
    optimizer, ours, reference, theirs = _pair(1)
    schedule = [{}, {"transpose": True}, {"skip": (1,)}, {}, {"skip": (0,)}, {"transpose": True}, {}]
    for seed, options in enumerate(schedule):
        _set_grads(ours, theirs, seed, **options)
        optimizer.step()
        reference.step()
    _assert_same(ours, theirs)
    assert float(optimizer.state[ours[0]]["step"]) == 6 and float(optimizer.state[ours[1]]["step"]) == 6


def test_replaced_parameter_storage_is_the_one_updated():
    optimizer, ours, reference, theirs = _pair(2)
    for seed in range(4):
        if seed == 2:  # e.g. a weight re-materialised: same Parameter, new storage
            ours[0].data = ours[0].data.clone()
        _set_grads(ours, theirs, seed)
        optimizer.step()
        reference.step()
    _assert_same(ours, theirs)


def test_state_tensor_replaced_by_hand_is_the_one_read_and_written():
    gen = torch.Generator().manual_seed(3)
    param = torch.nn.Parameter(torch.randn(8192, generator=gen))
    optimizer = AdamW8bit([param], lr=1e-2)
    for _ in range(3):
        param.grad = torch.randn(8192, generator=gen)
        optimizer.step()
    old = optimizer.state[param]["state1"]
    old_codes = old.clone()
    replacement = torch.full_like(old, int(old_codes[0]))
    optimizer.state[param]["state1"] = replacement
    param.grad = torch.randn(8192, generator=gen)
    optimizer.step()
    assert torch.equal(old, old_codes), "the replaced state tensor must no longer be written"
    assert not torch.equal(replacement, torch.full_like(old, int(old_codes[0]))), "the new one must be"


def test_plan_keeps_no_gradient_alive():
    param = torch.nn.Parameter(torch.randn(5000))
    optimizer = AdamW8bit([param], lr=1e-2)
    for _ in range(2):  # planned with the first gradient, the second one swapped in
        grad = torch.randn(5000)
        param.grad = grad
        optimizer.step()
    freed = weakref.ref(grad)
    param.grad = None
    del grad
    gc.collect()
    assert freed() is None
    param.grad = torch.randn(5000)  # and a later gradient is still taken
    before = param.detach().clone()
    optimizer.step()
    assert not torch.equal(param, before)


def test_loading_a_state_dict_frees_the_replaced_states():
    """(torch's load_state_dict ends in __setstate__, which drops the plans with the other caches.)"""
    param = torch.nn.Parameter(torch.randn(5000))
    optimizer = AdamW8bit([param], lr=1e-2)
    param.grad = torch.randn(5000)
    optimizer.step()
    saved = optimizer.state_dict()
    old = weakref.ref(optimizer.state[param]["state1"])
    optimizer.load_state_dict(saved)
    del saved
    gc.collect()
    assert old() is None
