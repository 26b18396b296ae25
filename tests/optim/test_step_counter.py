"""The step number each update uses (bias correction) follows ``state["step"]`` through reloads and resets.

``BlockwiseOptimizer`` reads step tensors only when it plans a group and counts on from there; these
tests pin down that a plan never outlives the counter it counts on from.
"""

import copy

import torch

from effllm.optim import AdamW8bit


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 80, generator=gen)), torch.nn.Parameter(torch.randn(80, generator=gen))]


def _step(optimizer, params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()


def _torch_and_ours(params):
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return (torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1),
            AdamW8bit(params, lr=1e-2, weight_decay=0.1, state_bits=32), theirs)


def test_step_tensor_counts_updates_and_skips_params_without_grad():
    params = _params()
    optimizer = AdamW8bit(params, lr=1e-2, state_bits=32)
    for seed in range(3):
        _step(optimizer, params, seed)
    params[1].grad = None
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    assert float(optimizer.state[params[0]]["step"]) == 4
    assert float(optimizer.state[params[1]]["step"]) == 3


def test_reloaded_state_continues_from_its_saved_step_like_torch():
    params = _params()
    reference, ours, theirs = _torch_and_ours(params)
    for seed in range(3):
        _step(reference, theirs, seed)
        _step(ours, params, seed)
    saved = copy.deepcopy(ours.state_dict())
    for seed in range(3, 6):  # advance past the saved point, then go back to it
        _step(ours, params, seed)
    restored = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    ours = AdamW8bit(restored, lr=1e-2, weight_decay=0.1, state_bits=32)
    ours.load_state_dict(saved)
    for seed in range(3, 6):
        _step(reference, theirs, seed)
        _step(ours, restored, seed)
    assert float(ours.state[restored[0]]["step"]) == 6
    for mine, torchs in zip(restored, theirs):
        torch.testing.assert_close(mine, torchs, rtol=1e-6, atol=1e-7)


def test_cleared_state_restarts_at_step_one():
    params = _params()
    optimizer = AdamW8bit(params, lr=1e-2, state_bits=32)
    for seed in range(4):
        _step(optimizer, params, seed)
    optimizer.state[params[0]].clear()  # as a subspace refresh that resets the moments does
    _step(optimizer, params, 9)
    assert float(optimizer.state[params[0]]["step"]) == 1


def test_deepcopied_optimizer_counts_on_its_own():
    params = _params()
    optimizer = AdamW8bit(params, lr=1e-2)
    _step(optimizer, params, 0)
    twin = copy.deepcopy(optimizer)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    _step(twin, twin_params, 1)
    _step(twin, twin_params, 2)
    _step(optimizer, params, 1)
    assert float(twin.state[twin_params[0]]["step"]) == 3
    assert float(optimizer.state[params[0]]["step"]) == 2
