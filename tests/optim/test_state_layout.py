"""Which parameters get which state: ``min_8bit_size``, per-parameter and per-module overrides, param-group
``state_bits``, ``StableEmbedding``, and the bytes of state per parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effllm.optim import AdamW8bit, Lion8bit, StableEmbedding, override

MIN_8BIT_SIZE = 4096  # the documented default
ABSMAX_BYTES = 4  # one fp32 absmax per block


def _step_once(optimizer, params):
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()


def _bits_of(optimizer, param) -> int:
    state = optimizer.state[param]
    bits = state["state_bits"]
    expected_dtype = torch.float32 if bits == 32 else torch.uint8
    assert state["state1"].dtype == state["state2"].dtype == expected_dtype
    return bits


def test_tensors_below_min_8bit_size_keep_32bit_state():
    below = nn.Parameter(torch.randn(MIN_8BIT_SIZE - 1))
    at = nn.Parameter(torch.randn(64, MIN_8BIT_SIZE // 64))
    optimizer = AdamW8bit([below, at])
    _step_once(optimizer, [below, at])
    assert _bits_of(optimizer, below) == 32
    assert optimizer.state[below]["state1"].shape == below.shape
    assert "absmax1" not in optimizer.state[below]
    assert _bits_of(optimizer, at) == 8


def test_min_8bit_size_is_an_option():
    small = nn.Parameter(torch.randn(300))
    optimizer = AdamW8bit([small], min_8bit_size=256)
    _step_once(optimizer, [small])
    assert _bits_of(optimizer, small) == 8
    assert optimizer.state[small]["absmax1"].numel() == 2  # 300 elements: one full block of 256, one short


def _toy_model() -> nn.Module:
    return nn.Sequential(nn.Embedding(512, 16), nn.Linear(16, 512), nn.LayerNorm(512))


def test_module_override_keeps_its_parameters_in_32bit_state():
    model = _toy_model()
    override(model[0], state_bits=32)
    optimizer = AdamW8bit(model.parameters())
    _step_once(optimizer, list(model.parameters()))
    assert _bits_of(optimizer, model[0].weight) == 32  # 8192 elements, overridden
    assert _bits_of(optimizer, model[1].weight) == 8  # 8192 elements, not overridden
    assert _bits_of(optimizer, model[1].bias) == 32  # 512 elements, below min_8bit_size


def test_parameter_override_beats_the_param_group():
    model = _toy_model()
    override(model[1].weight, state_bits=4, blocksize=64)
    optimizer = AdamW8bit([{"params": model.parameters(), "state_bits": 32}])
    _step_once(optimizer, list(model.parameters()))
    assert _bits_of(optimizer, model[0].weight) == 32  # from the group
    state = optimizer.state[model[1].weight]
    assert state["state_bits"] == 4 and state["blocksize"] == 64
    assert state["state1"].numel() == model[1].weight.numel() // 2  # two 4-bit codes per byte
    assert state["absmax1"].numel() == model[1].weight.numel() // 64


def test_overrides_merge_and_hold_for_any_later_optimizer():
    (weight,) = [nn.Parameter(torch.randn(8192))]
    override(weight, state_bits=4)
    override(weight, blocksize=32)  # a second call adds to the first
    for optimizer in (AdamW8bit([weight]), Lion8bit([weight])):
        _step_once(optimizer, [weight])
        state = optimizer.state[weight]
        assert (state["state_bits"], state["blocksize"]) == (4, 32)


def test_param_group_state_bits_and_blocksize():
    first, second = nn.Parameter(torch.randn(8192)), nn.Parameter(torch.randn(8192))
    optimizer = AdamW8bit([{"params": [first], "state_bits": 4}, {"params": [second], "blocksize": 512}])
    _step_once(optimizer, [first, second])
    assert (optimizer.state[first]["state_bits"], optimizer.state[first]["blocksize"]) == (4, 128)
    assert (optimizer.state[second]["state_bits"], optimizer.state[second]["blocksize"]) == (8, 512)
    assert optimizer.state[second]["absmax2"].numel() == 8192 // 512


def test_stable_embedding_has_32bit_state_xavier_init_and_layer_norm():
    torch.manual_seed(0)
    vocab, dim = 1000, 32
    embedding = StableEmbedding(vocab, dim, padding_idx=0)
    xavier_bound = (6 / (vocab + dim)) ** 0.5
    assert embedding.weight.abs().max() <= xavier_bound
    assert not embedding.weight[0].any()  # padding row stays zero

    tokens = torch.randint(1, vocab, (4, 7))
    out = embedding(tokens)
    assert out.shape == (4, 7, dim)
    expected = nn.functional.layer_norm(embedding.weight[tokens], (dim,), eps=embedding.norm.eps)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.mean(-1), torch.zeros(4, 7), atol=1e-5, rtol=0)

    optimizer = AdamW8bit(embedding.parameters())
    out.square().mean().backward()
    optimizer.step()
    assert embedding.weight.numel() >= MIN_8BIT_SIZE  # so 32-bit comes from the override, not the size
    assert _bits_of(optimizer, embedding.weight) == 32
    assert set(dict(embedding.named_parameters())) == {"weight", "norm.weight", "norm.bias"}


# Bytes of state per parameter for a large tensor: codes + one fp32 absmax per block, for two moments.
EXPECTED_BYTES_PER_PARAM = {
    8: 2 * (1 + ABSMAX_BYTES / 256),  # 2.03125
    4: 2 * (0.5 + ABSMAX_BYTES / 128),  # 1.0625
    32: 2 * 4,
}


@pytest.mark.parametrize("bits", [8, 4, 32])
def test_state_bytes_per_parameter(bits):
    param = nn.Parameter(torch.zeros(1 << 20))
    optimizer = AdamW8bit([param], state_bits=bits)
    _step_once(optimizer, [param])
    per_param = optimizer.state_bytes() / param.numel()
    assert per_param == pytest.approx(EXPECTED_BYTES_PER_PARAM[bits])
    if bits == 8:
        assert per_param <= 2.04  # the target
    # and state_bytes counts what is really held
    held = sum(t.numel() * t.element_size() for k, t in optimizer.state[param].items()
               if torch.is_tensor(t) and k != "step")
    assert optimizer.state_bytes() == held


def test_one_state_optimizers_hold_half():
    param = nn.Parameter(torch.zeros(1 << 20))
    optimizer = Lion8bit([param])
    _step_once(optimizer, [param])
    assert optimizer.state_bytes() / param.numel() == pytest.approx(1 + ABSMAX_BYTES / 256)
    assert "state2" not in optimizer.state[param]
