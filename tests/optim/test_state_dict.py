"""``state_dict()`` / ``load_state_dict()``: bit-exact round trips (training resumed from a saved state is
bit-identical to uninterrupted training), ``torch.load(weights_only=True)``, saved dtypes kept for bf16
parameters, and loading onto another device."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from effllm.optim import Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit, SGD8bit

STEPS_BEFORE_SAVE = 4
STEPS_AFTER_SAVE = 4

OPTIMIZERS = {
    "adamw": lambda ps, bits: AdamW8bit(ps, lr=1e-2, weight_decay=0.1, state_bits=bits),
    "adam": lambda ps, bits: Adam8bit(ps, lr=1e-2, weight_decay=0.1, state_bits=bits),
    "lion": lambda ps, bits: Lion8bit(ps, lr=1e-3, state_bits=bits),
    "sgd": lambda ps, bits: SGD8bit(ps, lr=1e-2, momentum=0.9, nesterov=True, state_bits=bits),
    "rmsprop": lambda ps, bits: RMSprop8bit(ps, lr=1e-3, state_bits=bits),
}


def _model(dtype=torch.float32, device="cpu") -> nn.Module:
    torch.manual_seed(0)
    # 8192-element weights get quantized state; biases and the norm keep 32-bit state.
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 64))
    return model.to(device=device, dtype=dtype)


def _param_groups(model: nn.Module) -> list[dict]:
    """Two groups, so group order and per-group options must survive the round trip."""
    params = list(model.parameters())
    return [{"params": params[:3]}, {"params": params[3:], "lr": 5e-3}]


def _train(model, optimizer, steps: int, first_step: int) -> None:
    for step in range(first_step, first_step + steps):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(16, 64, generator=generator).to(device=next(model.parameters()).device,
                                                             dtype=next(model.parameters()).dtype)
        optimizer.zero_grad()
        model(inputs).float().square().mean().backward()
        optimizer.step()


def _save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(data: bytes, map_location=None):
    return torch.load(io.BytesIO(data), weights_only=True, map_location=map_location)


def _resume_matches_uninterrupted(make_optimizer, dtype=torch.float32):
    """Train, save (through torch.save / torch.load(weights_only=True)), resume in a fresh model and
    optimizer; returns (uninterrupted model, resumed model, resumed optimizer)."""
    model = _model(dtype)
    optimizer = make_optimizer(_param_groups(model))
    _train(model, optimizer, STEPS_BEFORE_SAVE, first_step=0)
    saved_model = _save(model.state_dict())
    saved_optimizer = _save(optimizer.state_dict())
    _train(model, optimizer, STEPS_AFTER_SAVE, first_step=STEPS_BEFORE_SAVE)

    resumed = _model(dtype)
    resumed.load_state_dict(_load(saved_model))
    resumed_optimizer = make_optimizer(_param_groups(resumed))
    resumed_optimizer.load_state_dict(_load(saved_optimizer))
    _train(resumed, resumed_optimizer, STEPS_AFTER_SAVE, first_step=STEPS_BEFORE_SAVE)
    return model, optimizer, resumed, resumed_optimizer


def _assert_bit_identical(model_a, optimizer_a, model_b, optimizer_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    states_a, states_b = optimizer_a.state_dict()["state"], optimizer_b.state_dict()["state"]
    assert states_a.keys() == states_b.keys()
    for index in states_a:
        for key, value in states_a[index].items():
            other = states_b[index][key]
            if torch.is_tensor(value):
                assert value.dtype == other.dtype and torch.equal(value, other), (index, key)
            else:
                assert value == other, (index, key)


@pytest.mark.parametrize("bits", [8, 4, 32])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resumed_training_is_bit_identical(name, bits):
    _assert_bit_identical(*_resume_matches_uninterrupted(lambda groups: OPTIMIZERS[name](groups, bits)))


def test_state_dict_holds_only_tensors_and_plain_values():
    model = _model()
    optimizer = AdamW8bit(_param_groups(model))
    _train(model, optimizer, 1, first_step=0)
    state_dict = optimizer.state_dict()
    assert [g["lr"] for g in state_dict["param_groups"]] == [1e-3, 5e-3]
    assert all(g["state_bits"] == 8 for g in state_dict["param_groups"])
    allowed = (torch.Tensor, int, float, bool, str, tuple, type(None))
    for state in state_dict["state"].values():
        assert all(isinstance(v, allowed) for v in state.values())
    dtypes = {key: value.dtype for key, value in state_dict["state"][0].items() if torch.is_tensor(value)}
    assert dtypes == {"step": torch.float32, "state1": torch.uint8, "state2": torch.uint8,
                      "absmax1": torch.float32, "absmax2": torch.float32}


def test_load_state_dict_copies_rather_than_aliases():
    model = _model()
    optimizer = AdamW8bit(model.parameters())
    _train(model, optimizer, 1, first_step=0)
    state_dict = copy.deepcopy(optimizer.state_dict())
    other = AdamW8bit(model.parameters())
    other.load_state_dict(state_dict)
    _train(model, other, 1, first_step=1)
    assert state_dict["state"][0]["state1"].data_ptr() != other.state[model[0].weight]["state1"].data_ptr()


@pytest.mark.parametrize("bits", [8, 4, 32])
def test_bf16_params_keep_saved_state_dtypes(bits):
    """torch's ``Optimizer.load_state_dict`` casts floating states to the parameter dtype: fp32 absmax and
    fp32 moments would become bf16. The blockwise optimizer must keep them as saved."""
    model, optimizer, resumed, resumed_optimizer = _resume_matches_uninterrupted(
        lambda groups: AdamW8bit(groups, state_bits=bits), dtype=torch.bfloat16
    )
    for param in resumed.parameters():
        assert param.dtype == torch.bfloat16
        for key, value in resumed_optimizer.state[param].items():
            if key.startswith("state"):
                if key == "state_bits":
                    continue
                assert value.dtype == (torch.float32 if resumed_optimizer.state[param]["state_bits"] == 32
                                       else torch.uint8), key
            elif key.startswith("absmax"):
                assert value.dtype == torch.float32, key
    _assert_bit_identical(model, optimizer, resumed, resumed_optimizer)


def test_saved_layout_wins_over_the_new_optimizer_options():
    """A state saved with 8-bit states keeps them when loaded into an optimizer asked for 32-bit."""
    model = _model()
    optimizer = AdamW8bit(model.parameters(), state_bits=8)
    _train(model, optimizer, 2, first_step=0)
    other = AdamW8bit(model.parameters(), state_bits=32)
    other.load_state_dict(_load(_save(optimizer.state_dict())))
    assert other.param_groups[0]["state_bits"] == 8  # param groups are restored too, as in torch
    _train(model, other, 1, first_step=2)
    assert other.state[model[0].weight]["state1"].dtype == torch.uint8


def test_map_location_cpu_to_cpu():
    model = _model()
    optimizer = AdamW8bit(model.parameters())
    _train(model, optimizer, 2, first_step=0)
    loaded = _load(_save(optimizer.state_dict()), map_location="cpu")
    other = AdamW8bit(model.parameters())
    other.load_state_dict(loaded)
    for param in model.parameters():
        for key, value in optimizer.state[param].items():
            if torch.is_tensor(value):
                assert torch.equal(value, other.state[param][key]), key


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_state_saved_on_cpu_loads_on_cuda_and_back(bits):
    """Train on CPU, save, resume on CUDA: the states move to each parameter's device with their dtypes
    (step stays a CPU tensor, as torch keeps it); a CUDA state loads back onto CPU parameters."""
    model = _model()
    optimizer = AdamW8bit(model.parameters(), state_bits=bits)
    _train(model, optimizer, 2, first_step=0)
    saved = _save(optimizer.state_dict())

    cuda_model = copy.deepcopy(model).cuda()
    cuda_optimizer = AdamW8bit(cuda_model.parameters(), state_bits=bits)
    cuda_optimizer.load_state_dict(_load(saved))
    for cpu_param, cuda_param in zip(model.parameters(), cuda_model.parameters()):
        for key, value in optimizer.state[cpu_param].items():
            moved = cuda_optimizer.state[cuda_param][key]
            if torch.is_tensor(value) and key != "step":
                assert moved.device.type == "cuda" and moved.dtype == value.dtype, key
                assert torch.equal(moved.cpu(), value), key
    _train(cuda_model, cuda_optimizer, 2, first_step=2)
    _train(model, optimizer, 2, first_step=2)
    for cpu_param, cuda_param in zip(model.parameters(), cuda_model.parameters()):
        # Different kernels and matmuls on the two devices: close, not bit-identical. An Adam step moves a
        # parameter by about lr (1e-3) at most, so two steps from the same state differ by less than 4 lr.
        torch.testing.assert_close(cuda_param.cpu(), cpu_param, atol=4e-3, rtol=0)

    back = AdamW8bit(model.parameters(), state_bits=bits)
    back.load_state_dict(_load(_save(cuda_optimizer.state_dict()), map_location="cpu"))
    for param in model.parameters():
        assert all(v.device.type == "cpu" for v in back.state[param].values() if torch.is_tensor(v))
