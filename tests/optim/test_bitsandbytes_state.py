"""A run started with bitsandbytes' 8-bit optimizers resumes with effllm's: ``load_bitsandbytes_state_dict``.

bitsandbytes (an optional dev dependency, installed by the dev extra and CI) trains for a few steps; its
``state_dict()`` goes through ``torch.save``/``torch.load(weights_only=True)`` into the effllm optimizer of the same
algorithm; then both continue from the same parameters with the same gradients.
"""

from __future__ import annotations

import io

import pytest
import torch
from effllm.kernels.blockwise import dequantize_blockwise_ref
from effllm.kernels.packing import unpack_bits_ref

from effllm.optim import (
    Adam8bit,
    AdamW8bit,
    Lion8bit,
    RMSprop8bit,
    SGD8bit,
    from_bitsandbytes_state_dict,
    load_bitsandbytes_state_dict,
)

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = [(64, 130), (4097,), (100,)]  # two quantized (odd-sized), one below min_8bit_size (fp32 state)
SMALL = 2
BNB_BLOCKSIZE = 256
STEPS_BEFORE, STEPS_AFTER = 8, 8
# name -> (effllm factory, bitsandbytes factory, {bitsandbytes state index: effllm state index})
PAIRS = {
    "adamw": (lambda ps, **kw: AdamW8bit(ps, lr=1e-3, weight_decay=0.1, **kw),
              lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.1), {1: 1, 2: 2}),
    "adam": (lambda ps, **kw: Adam8bit(ps, lr=1e-3, **kw),
             lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3), {1: 1, 2: 2}),
    "lion": (lambda ps, **kw: Lion8bit(ps, lr=1e-4, weight_decay=0.1, **kw),
             lambda ps: bnb.optim.Lion8bit(ps, lr=1e-4, weight_decay=0.1), {1: 1}),
    "sgd": (lambda ps, **kw: SGD8bit(ps, lr=1e-3, momentum=0.9, **kw),
            lambda ps: bnb.optim.SGD8bit(ps, lr=1e-3, momentum=0.9), {1: 1}),
    "rmsprop": (lambda ps, **kw: RMSprop8bit(ps, lr=1e-4, alpha=0.99, **kw),
                lambda ps: bnb.optim.RMSprop8bit(ps, lr=1e-4, alpha=0.99), {1: 2}),
}
# ||effllm - bitsandbytes|| over bitsandbytes' own displacement, per parameter, over the 8 steps after resuming.
# Measured: AdamW/Adam 0.0013-0.0016, Lion 0 (its sign updates agree), SGD 0.0011-0.0014, RMSprop 0.012 (its
# state requantized onto the unsigned map); an effllm optimizer that starts fresh instead is 0.58-1.2 away.
RESUME_BOUND = {"adamw": 0.01, "adam": 0.01, "lion": 0.01, "sgd": 0.01, "rmsprop": 0.04}


def _gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) * (1 + step % 3) for shape in SHAPES]


def _train(optimizer, params, steps) -> None:
    for step in steps:
        for param, grad in zip(params, _gradients(step)):
            param.grad = grad.clone()
        optimizer.step()


def _started_with_bitsandbytes(name: str):
    """bitsandbytes' optimizer after STEPS_BEFORE steps, its parameters, and its state_dict as saved to disk."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]
    optimizer = PAIRS[name][1](params)
    _train(optimizer, params, range(STEPS_BEFORE))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return optimizer, params, torch.load(buffer, weights_only=True)


def _bnb_state(optimizer, param) -> dict:
    state = dict(optimizer.state[param])
    return {**state, **state.pop("__bnb_optimizer_quant_state__", {})}


def _values(state: dict, index: int) -> torch.Tensor:
    """A state's values as fp32 (dequantized with its map when it is codes)."""
    codes = state[f"state{index}"]
    if codes.dtype == torch.float32:
        return codes.reshape(-1)
    return dequantize_blockwise_ref(codes.reshape(-1), state[f"absmax{index}"], state[f"qmap{index}"],
                                    BNB_BLOCKSIZE)


@pytest.mark.parametrize("name", list(PAIRS))
def test_resuming_from_bitsandbytes_continues_its_run(name):
    make_effllm, _, indices = PAIRS[name]
    bnb_optimizer, bnb_params, saved = _started_with_bitsandbytes(name)
    params = [torch.nn.Parameter(p.detach().clone()) for p in bnb_params]
    optimizer = make_effllm(params)
    load_bitsandbytes_state_dict(optimizer, saved)

    qmaps = optimizer._maps_for(8, torch.device("cpu"))
    for param, bnb_param in zip(params, bnb_params):
        state, theirs = optimizer.state[param], _bnb_state(bnb_optimizer, bnb_param)
        assert float(state["step"]) == STEPS_BEFORE
        for bnb_index, index in indices.items():
            ours = state[f"state{index}"]
            if theirs[f"state{bnb_index}"].dtype == torch.float32:  # the small tensor: fp32 in both
                assert torch.equal(ours, theirs[f"state{bnb_index}"])
            elif name != "rmsprop":  # same map, same blocks: the codes themselves carry over
                assert torch.equal(ours, theirs[f"state{bnb_index}"].reshape(-1))
                assert torch.equal(state[f"absmax{index}"], theirs[f"absmax{bnb_index}"])
            else:  # requantized from bitsandbytes' signed map onto effllm's unsigned one: within one code
                values = dequantize_blockwise_ref(ours, state[f"absmax{index}"], qmaps[1], BNB_BLOCKSIZE)
                expected = _values(theirs, bnb_index)
                largest_gap = float(qmaps[1].diff().max())
                block_absmax = state[f"absmax{index}"].repeat_interleave(BNB_BLOCKSIZE)[: values.numel()]
                assert bool(((values - expected).abs() <= largest_gap * block_absmax).all())

    before = [p.detach().clone() for p in bnb_params]
    _train(optimizer, params, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    _train(bnb_optimizer, bnb_params, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    for ours, theirs, start in zip(params, bnb_params, before):
        displacement = (theirs - start).detach().norm()
        assert float((ours - theirs).detach().norm() / displacement) < RESUME_BOUND[name]


def test_another_layout_is_requantized():
    """An effllm optimizer with 4-bit states (blocks of 128) takes the 8-bit state through its values."""
    bnb_optimizer, bnb_params, saved = _started_with_bitsandbytes("adamw")
    params = [torch.nn.Parameter(p.detach().clone()) for p in bnb_params]
    optimizer = AdamW8bit(params, lr=1e-3, weight_decay=0.1, state_bits=4)
    load_bitsandbytes_state_dict(optimizer, saved)
    state, theirs = optimizer.state[params[0]], _bnb_state(bnb_optimizer, bnb_params[0])
    assert state["state_bits"] == 4 and state["state1"].numel() == (params[0].numel() + 1) // 2
    codes = unpack_bits_ref(state["state1"], 4, params[0].numel())
    m = dequantize_blockwise_ref(codes, state["absmax1"], optimizer._maps_for(4, torch.device("cpu"))[0], 128)
    expected = _values(theirs, 1)
    assert float((m - expected).norm() / expected.norm()) < 0.15  # 4-bit quantization error of m
    _train(optimizer, params, range(STEPS_BEFORE, STEPS_BEFORE + 2))
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_saved_hyper_parameters_are_taken_and_effllm_options_kept():
    _, bnb_params, saved = _started_with_bitsandbytes("adamw")
    saved["param_groups"][0]["lr"] = 5e-4  # as a scheduler would have left it
    optimizer = AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in bnb_params], lr=1.0, min_8bit_size=1)
    converted = from_bitsandbytes_state_dict(optimizer, saved)
    group = converted["param_groups"][0]
    assert group["lr"] == 5e-4 and group["weight_decay"] == 0.1 and group["min_8bit_size"] == 1
    assert "t_alpha" not in group  # bitsandbytes' AdEMAMix options are not effllm's
    # min_8bit_size=1 here: the small tensor's fp32 state from bitsandbytes is quantized to 8 bits
    assert converted["state"][SMALL]["state1"].dtype == torch.uint8


def test_mismatched_or_foreign_state_dicts_are_refused():
    _, bnb_params, saved = _started_with_bitsandbytes("adamw")
    two_groups = AdamW8bit([{"params": [torch.nn.Parameter(p.detach().clone())]} for p in bnb_params])
    with pytest.raises(ValueError, match="do not match the optimizer's"):
        load_bitsandbytes_state_dict(two_groups, saved)
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        load_bitsandbytes_state_dict(AdamW8bit(bnb_params), {"weights": saved["state"]})
    _, lion_params, lion_saved = _started_with_bitsandbytes("lion")
    with pytest.raises(ValueError, match="has no state2"):  # a Lion state is not an AdamW one
        load_bitsandbytes_state_dict(AdamW8bit(lion_params), lion_saved)
