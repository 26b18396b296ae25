"""``GroupPlan``: one param group's launches, prepared at one step and checked cheaply at the next.

Working out a step's launches (which parameters have gradients, their states, which parameters share state
width, block size and step number, and each backend's per-parameter checks and address tables) costs tens
of microseconds per parameter in Python: for a model of a million parameters, a sixth of the update. A plan
keeps all of it, each bucket prepared by its backend (``plan_update_many``), and at the next step only checks
that it still describes the group: the same parameters, the same ones with gradients, the same state tensors
and step counters, the same parameter storage. Gradients may be new tensors at every step
(``zero_grad(set_to_none=True)``): a new one is checked once and handed to the launch; the plan holds only
weak references to them, so they are freed when the caller drops them. Anything else that changed makes the
optimizer plan the group again.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass, field

import torch

from effllm.kernels.optim_update import UpdatePlan

from .dtensor import local_tensor

# ctypes scalars over the memory of CPU step counters, by dtype: ``value += 1`` through one costs about 0.25 us,
# through a NumPy view 2 us, a dispatched ``add_`` 4 us, and ``_foreach_add_`` over 8 counters 20 to 200.
# A float32 counter sees the same rounding as torch's ``+= 1`` (the double sum is exact, then rounded once).
_COUNTER_SCALARS = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


@dataclass
class Bucket:
    """Parameters updated by one launch: they share device, state layout and step number."""

    launch_plan: UpdatePlan | None
    step: int  # the step number of the next launch
    # The parameters' state["step"] counters (torch's convention: tensors, no device sync): ctypes scalars over
    # the memory of CPU ones, made once (with their tensors, which keep that memory alive), and the others.
    counter_scalars: list = field(default_factory=list)
    counter_tensors: list[torch.Tensor] = field(default_factory=list)
    device_counters: list[torch.Tensor] = field(default_factory=list)

    def add_counter(self, counter: torch.Tensor) -> None:
        scalar = _COUNTER_SCALARS.get(counter.dtype)
        if counter.device.type == "cpu" and not counter.requires_grad and scalar is not None and counter.numel() == 1:
            self.counter_scalars.append(scalar.from_address(counter.data_ptr()))
            self.counter_tensors.append(counter)
        else:
            self.device_counters.append(counter)


def count_steps(buckets: list[Bucket]) -> None:
    """After their launches: the next step number of each bucket, and one more on each step counter."""
    device_counters = []
    for bucket in buckets:
        bucket.step += 1
        for scalar in bucket.counter_scalars:
            scalar.value += 1.0
        device_counters += bucket.device_counters
    if device_counters:
        torch._foreach_add_(device_counters, 1.0)


@dataclass
class Entry:
    """One parameter of the group as planned. ``bucket`` is None for a parameter that had no gradient."""

    param: torch.Tensor
    grad: weakref.ref | None = None  # the gradient last checked
    state: dict | None = None
    watched: tuple[tuple[str, torch.Tensor], ...] = ()  # the state's tensors, by key
    storage: int = 0  # address of the (local) parameter's data
    bucket: Bucket | None = None
    index: int = 0  # its slot in the bucket


@dataclass
class GroupPlan:
    group: dict
    entries: list[Entry]
    buckets: list[Bucket]
    algorithm: str  # the update the buckets were planned for (a group option may change it)

    def gradients(self, group: dict, states) -> dict[int, list[torch.Tensor]] | None:
        """The (local) gradients of each bucket (by ``id``) in slot order, or None when the plan no longer
        describes ``group`` with ``states`` (the optimizer's ``state``)."""
        params = group["params"]
        if group is not self.group or len(params) != len(self.entries):
            return None
        grads = {id(bucket): [] for bucket in self.buckets}
        for entry, param in zip(self.entries, params):
            grad = param.grad
            if param is not entry.param or (grad is None) != (entry.bucket is None):
                return None
            if grad is None:
                continue
            local = local_tensor(grad)
            if entry.grad() is not grad:
                if grad.is_sparse or not entry.bucket.launch_plan.accepts_grad(entry.index, local):
                    return None
                entry.grad = weakref.ref(grad)
            state = states.get(param)
            if state is not entry.state or local_tensor(param).data_ptr() != entry.storage:
                return None
            for key, tensor in entry.watched:
                if state.get(key) is not tensor:
                    return None
            grads[id(entry.bucket)].append(local)
        return grads

    def launch(self, hyper_for, grads: dict[int, list[torch.Tensor]]) -> None:
        """Launches every bucket; ``hyper_for(step)`` gives the update's scalars for a step number."""
        for bucket in self.buckets:
            bucket.launch_plan.launch(hyper_for(bucket.step), grads[id(bucket)])


def plan_entry(param: torch.Tensor, grad: torch.Tensor, state: dict, bucket: Bucket, index: int) -> Entry:
    return Entry(param, weakref.ref(grad), state,
                 tuple((key, value) for key, value in state.items() if torch.is_tensor(value)),
                 local_tensor(param).data_ptr(), bucket, index)
