"""One fused optimizer update for 32-bit, 8-bit and 4-bit states, keyed by algorithm.

Per parameter: dequantize the states (blockwise, see ``blockwise``), update parameter and states in fp32,
requantize the states with fresh block absmaxes. ``state1`` is the first moment / momentum (signed map) and
``state2`` the second moment (unsigned map); an algorithm that keeps one state leaves the other ``None``.

State storage by ``bits``: 32 -> fp32 tensors of ``param.numel()`` elements, ``absmax`` ``None``;
8 -> uint8 codes, one per element; 4 -> uint8 bytes, two codes each (``packing``). ``absmax`` is fp32
[nblocks].

Elements whose gradient is NaN or Inf are skipped: their parameter and state values stay as they were, so
one bad element cannot corrupt the absmax, hence the state, of its whole block.

``optim_update_ref`` is the specification (written to match ``torch.optim`` exactly at 32 bits);
``optim_update_many`` updates a list of parameters with the fastest backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import backend_for
from .blockwise import absmax_to_scale, nearest_code_ref, num_blocks
from .packing import pack_bits_ref, unpack_bits_ref

ALGORITHMS = ("adam", "adamw", "lion", "sgd", "rmsprop")
# Which states each algorithm keeps: (first moment, second moment).
STATES = {
    "adam": (True, True),
    "adamw": (True, True),
    "lion": (True, False),
    "sgd": (True, False),
    "rmsprop": (False, True),
}
STATE_BITS = (32, 8, 4)


@dataclass(frozen=True)
class Hyper:
    """The scalars of one update. ``step`` counts from 1. ``beta1`` is SGD's momentum and ``beta2``
    RMSprop's alpha. ``dampening`` and ``nesterov`` are SGD's. ``maximize`` steps along the gradient
    instead of against it (torch.optim's ``maximize=True``: the update sees ``-grad``)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    step: int = 1
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False


def kernel_scalars(h: Hyper) -> dict[str, float]:
    """The scalars the fused kernels (C and Triton) take, derived from ``h`` in Python floats as the reference
    derives them: decay factor, Adam's step size and bias correction, and the ``1 - beta`` forms."""
    return dict(
        lr=float(h.lr), beta1=float(h.beta1), beta2=float(h.beta2), eps=float(h.eps),
        weight_decay=float(h.weight_decay), one_minus_beta1=1 - h.beta1, one_minus_beta2=1 - h.beta2,
        one_minus_dampening=1 - h.dampening, decay_factor=1 - h.lr * h.weight_decay,
        step_size=h.lr / (1 - h.beta1**h.step) if h.beta1 != 1 else 0.0,
        bias_correction2_sqrt=(1 - h.beta2**h.step) ** 0.5,
    )


def _dequantize_state(state, absmax, qmap, bits, blocksize, numel):
    if bits == 32:
        return state.reshape(-1).float()
    codes = state.reshape(-1) if bits == 8 else unpack_bits_ref(state, bits, numel)
    values = qmap.float()[codes.long()]
    padded = torch.nn.functional.pad(values, (0, num_blocks(numel, blocksize) * blocksize - numel))
    return (padded.view(-1, blocksize) * absmax[:, None]).reshape(-1)[:numel]


def _store_state(new, state, absmax, qmap, bits, blocksize):
    """Write fp32 ``new`` [numel] back into ``state`` (and ``absmax``) in place."""
    if bits == 32:
        state.reshape(-1).copy_(new)
        return
    numel = new.numel()
    padded = torch.nn.functional.pad(new, (0, num_blocks(numel, blocksize) * blocksize - numel))
    blocks = padded.view(-1, blocksize)
    block_absmax = blocks.abs().amax(dim=1)
    codes = nearest_code_ref((blocks / absmax_to_scale(block_absmax)[:, None]).reshape(-1)[:numel], qmap)
    state.reshape(-1).copy_(codes if bits == 8 else pack_bits_ref(codes, bits))
    absmax.copy_(block_absmax)


def optim_update_ref(
    algo: str,
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor | None,
    state2: torch.Tensor | None,
    absmax1: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    qmap1: torch.Tensor | None,
    qmap2: torch.Tensor | None,
    hyper: Hyper,
    bits: int = 8,
    blocksize: int = 256,
) -> None:
    """Update ``param`` and its states in place (see the module docstring)."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown optimizer algorithm {algo!r}; use one of {', '.join(ALGORITHMS)}")
    numel = param.numel()
    # Maps may be passed from any device (the kernels copy them too).
    qmap1, qmap2 = (None if q is None else q.to(param.device) for q in (qmap1, qmap2))
    p_old = param.detach().reshape(-1).float()
    g = grad.reshape(-1).float()
    finite = torch.isfinite(g)
    g = torch.where(finite, g, torch.zeros_like(g))
    h = hyper
    if h.maximize:
        g = -g
    m_old = _dequantize_state(state1, absmax1, qmap1, bits, blocksize, numel) if state1 is not None else None
    v_old = _dequantize_state(state2, absmax2, qmap2, bits, blocksize, numel) if state2 is not None else None
    m = v = None
    p = p_old

    if algo in ("adam", "adamw"):
        if algo == "adam" and h.weight_decay:
            g = g + h.weight_decay * p
        if algo == "adamw" and h.weight_decay:
            p = p * (1 - h.lr * h.weight_decay)
        m = m_old.lerp(g, 1 - h.beta1)
        v = v_old * h.beta2 + (1 - h.beta2) * g * g
        bias_correction1 = 1 - h.beta1**h.step
        bias_correction2_sqrt = (1 - h.beta2**h.step) ** 0.5
        denom = v.sqrt() / bias_correction2_sqrt + h.eps
        p = p - (h.lr / bias_correction1) * (m / denom)
    elif algo == "lion":
        direction = (m_old * h.beta1 + g * (1 - h.beta1)).sign()
        p = p * (1 - h.lr * h.weight_decay) - h.lr * direction
        m = m_old.lerp(g, 1 - h.beta2)
    elif algo == "sgd":
        if h.weight_decay:
            g = g + h.weight_decay * p
        if m_old is not None:
            m = g.clone() if h.step == 1 else m_old * h.beta1 + (1 - h.dampening) * g
            g = g + h.beta1 * m if h.nesterov else m
        p = p - h.lr * g
    elif algo == "rmsprop":
        if h.weight_decay:
            g = g + h.weight_decay * p
        v = v_old * h.beta2 + (1 - h.beta2) * g * g
        p = p - h.lr * g / (v.sqrt() + h.eps)

    # copy_ into the parameter itself (not a reshape of it), which may be a copy when it is non-contiguous
    param.detach().copy_(torch.where(finite, p, p_old).view(param.shape))
    if m is not None:
        _store_state(torch.where(finite, m, m_old), state1, absmax1, qmap1, bits, blocksize)
    if v is not None:
        _store_state(torch.where(finite, v, v_old), state2, absmax2, qmap2, bits, blocksize)


@dataclass
class ParamSlot:
    """One parameter's tensors for ``optim_update_many``."""

    param: torch.Tensor
    grad: torch.Tensor
    state1: torch.Tensor | None
    state2: torch.Tensor | None
    absmax1: torch.Tensor | None
    absmax2: torch.Tensor | None


def optim_update_many(
    algo: str,
    slots: list[ParamSlot],
    qmap1: torch.Tensor | None,
    qmap2: torch.Tensor | None,
    hyper: Hyper,
    bits: int,
    blocksize: int,
) -> None:
    """Update every slot (all on one device, same ``bits``/``blocksize``) with as few launches as practical."""
    if not slots:
        return
    backend = backend_for(slots[0].param)
    if backend == "triton":
        from ._optim_update_triton import optim_update_many_triton

        return optim_update_many_triton(algo, slots, qmap1, qmap2, hyper, bits, blocksize)
    if backend == "cpu":
        from ._optim_update_cpu import optim_update_many_cpu

        return optim_update_many_cpu(algo, slots, qmap1, qmap2, hyper, bits, blocksize)
    for s in slots:
        optim_update_ref(algo, s.param, s.grad, s.state1, s.state2, s.absmax1, s.absmax2, qmap1, qmap2, hyper,
                         bits, blocksize)


class UpdatePlan:
    """``optim_update_many`` over the same parameters and states step after step, prepared once: a backend
    may do its per-parameter work (checks, address tables) here rather than at every launch. Gradients are
    passed to each launch, since they may be new tensors at every step (``zero_grad(set_to_none=True)``),
    and the plan keeps no reference to them, so that they are freed when the caller drops them."""

    def __init__(self, algo: str, slots: list[ParamSlot], qmap1, qmap2, bits: int, blocksize: int):
        self.algo, self.qmap1, self.qmap2 = algo, qmap1, qmap2
        self.bits, self.blocksize = bits, blocksize
        # Everything of the slots but their gradients.
        self.slots = [dataclasses.replace(slot, grad=None) for slot in slots]

    def accepts_grad(self, index: int, grad: torch.Tensor) -> bool:
        """Whether launches can take ``grad`` for slot ``index``; if not, plan again."""
        return True

    def launch(self, hyper: Hyper, grads: list[torch.Tensor]) -> None:
        """One update of every slot, with ``grads`` (in slot order) as their gradients."""
        slots = [dataclasses.replace(slot, grad=grad) for slot, grad in zip(self.slots, grads)]
        optim_update_many(self.algo, slots, self.qmap1, self.qmap2, hyper, self.bits, self.blocksize)


def plan_update_many(algo: str, slots: list[ParamSlot], qmap1, qmap2, bits: int, blocksize: int) -> UpdatePlan:
    """An ``UpdatePlan`` for ``slots`` (all on one device, same ``bits``/``blocksize``) on the fastest backend."""
    backend = backend_for(slots[0].param) if slots else "torch"
    if backend == "cpu":
        from ._optim_update_cpu import plan_update_many_cpu

        return plan_update_many_cpu(algo, slots, qmap1, qmap2, bits, blocksize)
    if backend == "triton":
        from ._optim_update_triton import TritonUpdatePlan

        return TritonUpdatePlan(algo, slots, qmap1, qmap2, bits, blocksize)
    return UpdatePlan(algo, slots, qmap1, qmap2, bits, blocksize)
