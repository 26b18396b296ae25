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


def test_step_tensors_of_either_default_dtype_count_as_torch_adds_one():
    """Counters are float32 (or float64 under torch.set_default_dtype) and are incremented in place, rounding as
    torch's ``+= 1`` does: past 2**24 a float32 counter stays where it is."""
    previous = torch.get_default_dtype()
    try:
        for dtype in (torch.float64, torch.float32):
            torch.set_default_dtype(dtype)
            params = [torch.nn.Parameter(torch.randn(64, 80, dtype=torch.float32))]
            params[0].grad = torch.ones(64, 80, dtype=torch.float32)
            optimizer = AdamW8bit(params, lr=1e-2)
            optimizer.step()
            counter = optimizer.state[params[0]]["step"]
            assert counter.dtype == dtype and float(counter) == 1
            counter.fill_(2.0**24)  # in place: the plan keeps counting through the same memory
            optimizer.step()
            assert torch.equal(counter, torch.tensor(2.0**24, dtype=dtype) + 1)
            assert (float(counter) == 2.0**24) == (dtype == torch.float32)
    finally:
        torch.set_default_dtype(previous)
