"""The Triton update plan (``TritonUpdatePlan``): prepared once, it gives the unplanned launch's results with
new gradient tensors at every step, refuses gradients it cannot take (so the optimizer plans again), and
leaves non-contiguous tensors to the unplanned path."""

from __future__ import annotations

import dataclasses

import torch
from effllm.kernels.optim_update import Hyper, ParamSlot, optim_update_many, plan_update_many
from effllm.kernels.quant_maps import dynamic_map


def _slots(device: str, shapes=((300,), (4097,), (3, 5)), dtypes=(torch.float32, torch.bfloat16, torch.float32)):
    generator = torch.Generator().manual_seed(0)
    slots = []
    for shape, dtype in zip(shapes, dtypes):
        numel = torch.Size(shape).numel()
        blocks = -(-numel // 256)
        slots.append(ParamSlot(
            torch.randn(shape, generator=generator).to(device, dtype), torch.randn(shape, generator=generator).to(
                device, dtype),
            torch.randint(0, 256, (numel,), generator=generator, dtype=torch.uint8).to(device),
            torch.randint(0, 256, (numel,), generator=generator, dtype=torch.uint8).to(device),
            (torch.rand(blocks, generator=generator) * 0.1).to(device),
            (torch.rand(blocks, generator=generator) * 1e-3).to(device)))
    return slots


def _clone(slots):
    return [ParamSlot(*(t.clone() for t in dataclasses.astuple(slot))) for slot in slots]


def _grads(slots, step: int):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s.param.shape, generator=generator).to(s.param.device, s.grad.dtype) for s in slots]


def test_plan_matches_unplanned_launches_with_new_gradients(triton_device, monkeypatch):
    device = triton_device
    monkeypatch.setenv("EFFLLM_KERNEL", "triton")
    maps = (dynamic_map(True, 8, device), dynamic_map(False, 8, device))
    planned, unplanned = _slots(device), _slots(device)
    plan = plan_update_many("adamw", planned, *maps, 8, 256)
    assert type(plan).__name__ == "TritonUpdatePlan" and plan.planned
    for step in range(1, 4):
        grads = _grads(planned, step)  # new tensors every step, as after zero_grad(set_to_none=True)
        assert all(plan.accepts_grad(index, grad) for index, grad in enumerate(grads))
        hyper = Hyper(lr=1e-2, weight_decay=0.1, step=step)
        plan.launch(hyper, grads)
        optim_update_many("adamw", [dataclasses.replace(s, grad=g.clone()) for s, g in zip(unplanned, grads)],
                          *maps, hyper, 8, 256)
    for a, b in zip(planned, unplanned):
        for name in ("param", "state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_plan_refuses_gradients_it_cannot_take(triton_device, monkeypatch):
    device = triton_device
    monkeypatch.setenv("EFFLLM_KERNEL", "triton")
    slots = _slots(device)
    plan = plan_update_many("adamw", slots, dynamic_map(True, 8, device), dynamic_map(False, 8, device), 8, 256)
    grad = slots[0].grad
    assert plan.accepts_grad(0, grad.clone())
    assert not plan.accepts_grad(0, grad.to(torch.float16))  # another dtype: another bucket
    assert not plan.accepts_grad(0, grad[:-1])  # another size
    assert not plan.accepts_grad(2, torch.randn(5, 3, device=device).t())  # not contiguous


def test_non_contiguous_tensors_take_the_unplanned_path(triton_device, monkeypatch):
    device = triton_device
    monkeypatch.setenv("EFFLLM_KERNEL", "triton")
    maps = (dynamic_map(True, 8, device), dynamic_map(False, 8, device))
    slots = _slots(device)
    base = torch.randn(5, 3, device=device)
    slots[2] = dataclasses.replace(slots[2], param=base.t(), grad=torch.randn(3, 5, device=device))
    reference = _clone(slots)
    plan = plan_update_many("adamw", slots, *maps, 8, 256)
    assert not plan.planned
    hyper = Hyper(lr=1e-2, step=1)
    plan.launch(hyper, [s.grad for s in slots])
    optim_update_many("adamw", reference, *maps, hyper, 8, 256)
    assert torch.equal(base.t(), reference[2].param) and torch.equal(slots[0].param, reference[0].param)
