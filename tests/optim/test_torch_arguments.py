"""torch.optim's arguments carry over: every keyword of the torch optimizer an effllm one replaces is accepted;
``maximize`` and ``decoupled_weight_decay`` change the update as in torch; implementation switches
(``foreach``, ``fused``) are accepted; options the quantized states cannot honour raise a clear error."""

from __future__ import annotations

import inspect

import pytest
import torch

from effllm.optim import Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit, SGD8bit

LARGE = 4096 * 2 + 3  # quantized state (an odd size: the C kernel's vector loop and its scalar tail)
SMALL = 100  # 32-bit state
ATOL = 1e-5  # float tolerance against torch.optim
ORACLE_STEPS = 10

# effllm class -> the torch.optim class whose signature it takes
REPLACES = {Adam8bit: torch.optim.Adam, AdamW8bit: torch.optim.AdamW, SGD8bit: torch.optim.SGD,
            RMSprop8bit: torch.optim.RMSprop}
ALL = [Adam8bit, AdamW8bit, Lion8bit, SGD8bit, RMSprop8bit]


def _params(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(size, generator=generator)) for size in (LARGE, SMALL)]


def _gradients(params, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator) for p in params]


def _options(cls) -> dict:
    """Weight decay on (so that its order against the sign flip matters)."""
    return dict(lr=1e-2, weight_decay=0.05) if cls is not Lion8bit else dict(lr=1e-3, weight_decay=0.05)


def _step_side_by_side(first, second, steps: int, negate_second: bool = False, before_step=None) -> None:
    """Steps two (optimizer, parameters) pairs with the same gradients (the second's negated if asked);
    ``before_step(step)`` runs before each step."""
    (optimizer_a, params_a), (optimizer_b, params_b) = first, second
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        for a, b, grad in zip(params_a, params_b, _gradients(params_a, seed=step)):
            a.grad, b.grad = grad, (-grad if negate_second else grad.clone())
        optimizer_a.step()
        optimizer_b.step()


@pytest.mark.parametrize("cls", list(REPLACES), ids=lambda cls: cls.__name__)
def test_every_torch_keyword_is_accepted_with_its_default(cls):
    torch_cls = REPLACES[cls]
    defaults = {name: parameter.default for name, parameter in inspect.signature(torch_cls.__init__).parameters.items()
                if name not in ("self", "params") and parameter.default is not inspect.Parameter.empty}
    if cls is SGD8bit:
        defaults["momentum"] = 0.9  # torch's default 0 keeps no buffer: nothing to quantize
    optimizer = cls(_params(), **defaults)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(LARGE)
    optimizer.step()


SWITCHES = [(cls, switch) for cls in REPLACES for switch in ("foreach", "fused")
            if switch in inspect.signature(REPLACES[cls].__init__).parameters]  # torch's RMSprop has no fused


@pytest.mark.parametrize("cls,switch", SWITCHES, ids=[f"{cls.__name__}-{switch}" for cls, switch in SWITCHES])
def test_implementation_switches_are_accepted(cls, switch):
    for value in (None, True, False):
        cls(_params(), **{switch: value})


@pytest.mark.parametrize("cls,option", [(Adam8bit, "amsgrad"), (AdamW8bit, "amsgrad"), (Adam8bit, "capturable"),
                                        (AdamW8bit, "differentiable"), (SGD8bit, "differentiable"),
                                        (RMSprop8bit, "capturable"), (RMSprop8bit, "differentiable")])
def test_unsupported_torch_options_raise_naming_the_option(cls, option):
    with pytest.raises(ValueError, match=f"{cls.__name__} does not support {option}=True.*pass {option}=False"):
        cls(_params(), **{option: True})


@pytest.mark.parametrize("state_bits", [8, 4, 32])
@pytest.mark.parametrize("cls", ALL, ids=lambda cls: cls.__name__)
def test_maximize_is_the_same_step_on_the_negated_gradient(cls, state_bits):
    """Bit for bit, over three steps, with quantized and 32-bit states."""
    maximizing, minimizing = _params(), _params()
    opt_max = cls(maximizing, maximize=True, state_bits=state_bits, **_options(cls))
    opt_min = cls(minimizing, state_bits=state_bits, **_options(cls))
    _step_side_by_side((opt_max, maximizing), (opt_min, minimizing), steps=3, negate_second=True)
    for p_max, p_min in zip(maximizing, minimizing):
        assert torch.equal(p_max, p_min)
        for key, value in opt_max.state[p_max].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_min.state[p_min][key])), key
    assert not torch.equal(maximizing[0], _params()[0])


@pytest.mark.parametrize("cls", list(REPLACES), ids=lambda cls: cls.__name__)
def test_maximize_matches_torch_with_32bit_states(cls):
    ours_params, torch_params = _params(), _params()
    extra = dict(momentum=0.9) if cls is SGD8bit else {}
    ours = cls(ours_params, maximize=True, state_bits=32, **_options(cls), **extra)
    reference = REPLACES[cls](torch_params, maximize=True, foreach=False, **_options(cls), **extra)
    _step_side_by_side((ours, ours_params), (reference, torch_params), steps=ORACLE_STEPS)
    for mine, theirs in zip(ours_params, torch_params):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=ATOL)


@pytest.mark.parametrize("state_bits", [8, 32])
def test_adam_with_decoupled_weight_decay_is_adamw(state_bits):
    decoupled, adamw = _params(), _params()
    opt_decoupled = Adam8bit(decoupled, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, state_bits=state_bits)
    opt_adamw = AdamW8bit(adamw, lr=1e-2, weight_decay=0.1, state_bits=state_bits)
    _step_side_by_side((opt_decoupled, decoupled), (opt_adamw, adamw), steps=3)
    assert all(torch.equal(a, b) for a, b in zip(decoupled, adamw))


def test_switching_decoupled_weight_decay_between_steps_takes_effect():
    """The step plan is made per algorithm: changing the group option re-plans instead of running the old one.
    torch.optim.Adam reads the option at every step too."""
    ours_params, torch_params = _params(), _params()
    ours = Adam8bit(ours_params, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, state_bits=32)
    reference = torch.optim.Adam(torch_params, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                                 foreach=False)

    def switch_at_step_two(step: int) -> None:
        if step == 2:
            ours.param_groups[0]["decoupled_weight_decay"] = False
            reference.param_groups[0]["decoupled_weight_decay"] = False

    _step_side_by_side((ours, ours_params), (reference, torch_params), steps=4, before_step=switch_at_step_two)
    for mine, theirs in zip(ours_params, torch_params):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=ATOL)


def test_maximize_survives_a_state_dict_round_trip_and_old_groups_default_to_minimize():
    params = _params()
    optimizer = AdamW8bit(params, maximize=True)
    saved = optimizer.state_dict()
    restored = AdamW8bit(_params())
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["maximize"] is True
    del saved["param_groups"][0]["maximize"]  # saved before the option existed
    old = AdamW8bit(_params())
    old.load_state_dict(saved)
    old.param_groups[0]["params"][0].grad = torch.ones(LARGE)
    old.step()
    assert bool((old.param_groups[0]["params"][0] < _params()[0]).all())  # minimised along +grad
