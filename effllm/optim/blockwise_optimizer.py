"""``BlockwiseOptimizer``: the one base of every optimizer whose states are blockwise-quantized.

A subclass names its algorithm (a key of ``effllm.kernels.optim_update.ALGORITHMS``) and maps its
param-group options to the update's scalars; everything else (state layout, 32/8/4-bit choice per
parameter, multi-tensor launch, state_dict) lives here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from effllm.kernels.blockwise import num_blocks
from effllm.kernels.optim_update import STATE_BITS, STATES, Hyper, ParamSlot, plan_update_many
from effllm.kernels.packing import packed_numel
from effllm.kernels.quant_maps import make_map

from .dtensor import local_tensor
from .overrides import overrides_of
from .step_plan import Bucket, Entry, GroupPlan, count_steps, plan_entry

DEFAULT_BLOCKSIZE = {8: 256, 4: 128}
# Map kinds of (first moment, second moment) per state width. 4-bit follows Li et al.: the second moment
# uses a zero-free linear map, since a zero code turns 1/sqrt(v) into a huge step.
STATE_MAPS = {8: ("dynamic", "dynamic"), 4: ("dynamic", "linear_nozero")}


def _check_group_options(options: dict) -> None:
    """ValueError naming the option, for options that would otherwise fail (or be ignored) at the first step."""
    if options.get("state_bits", 8) not in STATE_BITS:
        raise ValueError(f"state_bits must be one of {STATE_BITS}, got {options['state_bits']}")
    blocksize = options.get("blocksize")
    if blocksize is not None and (not isinstance(blocksize, int) or blocksize < 1):
        raise ValueError(f"blocksize must be a positive integer or None, got {blocksize!r}")
    if options.get("weight_decay", 0.0) < 0:
        raise ValueError(f"invalid weight_decay {options['weight_decay']}: it must be >= 0")


def reject_unsupported_torch_options(optimizer: str, *, amsgrad: bool = False, capturable: bool = False,
                                     differentiable: bool = False) -> None:
    """torch.optim's arguments carry over unchanged: ``foreach`` and ``fused`` only choose torch's implementation
    (effllm always runs its one fused kernel) and are accepted and ignored by the subclasses; these three ask
    for behaviour the quantized states cannot give, so a true value is a clear error rather than ignored."""
    unsupported = {
        "amsgrad": (amsgrad, "it keeps a third state (the running maximum of the second moment)"),
        "capturable": (capturable, "steps are not captured in CUDA graphs"),
        "differentiable": (differentiable, "the fused update is not differentiable"),
    }
    for name, (value, why) in unsupported.items():
        if value:
            raise ValueError(f"{optimizer} does not support {name}=True ({why}); pass {name}=False")


class BlockwiseOptimizer(Optimizer):
    """Base class. Group options shared by all subclasses:

    * ``state_bits``: 32, 8 or 4: width of each state element.
    * ``min_8bit_size``: parameters with fewer elements keep 32-bit state (quantizing tiny tensors saves
      nothing and costs accuracy).
    * ``blocksize``: elements per quantization block (default 256 at 8 bits, 128 at 4 bits).
    """

    algorithm: str = ""

    def __init__(self, params: Iterable, defaults: dict):
        bits = defaults.get("state_bits", 8)
        if bits not in STATE_BITS:
            raise ValueError(f"state_bits must be one of {STATE_BITS}, got {bits}")
        if defaults.get("lr", 0.0) < 0:
            raise ValueError(f"invalid learning rate {defaults['lr']}: it must be >= 0")
        defaults.setdefault("min_8bit_size", 4096)
        defaults.setdefault("blocksize", None)
        super().__init__(params, defaults)
        self._init_caches()

    def _init_caches(self) -> None:
        self._maps: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._plans: dict[int, GroupPlan] = {}  # param group index -> its launches, kept between steps

    def __setstate__(self, state: dict) -> None:
        # pickle and deepcopy restore only torch's attributes (defaults, state, param_groups)
        super().__setstate__(state)
        self._init_caches()

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, but a group's options are checked here rather than at its first step."""
        _check_group_options({**self.defaults, **param_group})
        super().add_param_group(param_group)

    # --- subclass interface -------------------------------------------------------------------------
    def hyper(self, group: dict, step: int) -> Hyper:
        raise NotImplementedError

    def has_state(self, group: dict) -> tuple[bool, bool]:
        """Which of (first moment, second moment) this group keeps."""
        return STATES[self.algorithm_for(group)]

    def algorithm_for(self, group: dict) -> str:
        """The update this group runs (a key of ``ALGORITHMS``)."""
        return self.algorithm

    # --- state layout -------------------------------------------------------------------------------
    def _layout(self, param: torch.Tensor, group: dict) -> tuple[int, int]:
        """(state bits, blocksize) for ``param``: overrides, then group options, then defaults."""
        options = {**group, **overrides_of(param)}
        bits = options["state_bits"]
        if bits not in STATE_BITS:
            raise ValueError(f"state_bits must be one of {STATE_BITS}, got {bits}")
        if param.numel() < options["min_8bit_size"]:
            bits = 32
        blocksize = options["blocksize"] or DEFAULT_BLOCKSIZE.get(bits, 0)
        return bits, blocksize

    def _maps_for(self, bits: int, device: torch.device):
        key = (bits, device)
        if key not in self._maps:
            if bits == 32:
                self._maps[key] = (None, None)
            else:
                kind1, kind2 = STATE_MAPS[bits]
                self._maps[key] = (make_map(kind1, True, bits, device), make_map(kind2, False, bits, device))
        return self._maps[key]

    def _new_state(self, param: torch.Tensor, bits: int, blocksize: int, signed: bool) -> dict:
        if bits == 32:
            return {"": torch.zeros(param.shape, dtype=torch.float32, device=param.device)}
        qmap = self._maps_for(bits, param.device)[0 if signed else 1]
        zero_code = int(torch.argmin(qmap.abs()))
        codes = torch.full((packed_numel(param.numel(), bits),), 0, dtype=torch.uint8, device=param.device)
        if zero_code:
            codes.fill_(zero_code if bits == 8 else zero_code | (zero_code << 4))
        absmax = torch.zeros(num_blocks(param.numel(), blocksize), dtype=torch.float32, device=param.device)
        return {"": codes, "absmax": absmax}

    def _init_state(self, param: torch.Tensor, group: dict, state: dict) -> None:
        # The layout follows the whole parameter (the same on every rank); the storage, a DTensor's local shard.
        bits, blocksize = self._layout(param, group)
        state["step"] = torch.tensor(0.0)
        state["state_bits"] = bits
        state["blocksize"] = blocksize
        for index, (keep, signed) in enumerate(zip(self.has_state(group), (True, False)), start=1):
            if keep:
                for suffix, tensor in self._new_state(local_tensor(param), bits, blocksize, signed).items():
                    state[f"absmax{index}" if suffix else f"state{index}"] = tensor

    # --- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        launched = []  # buckets launched: their step counters are incremented at once below
        for index, group in enumerate(self.param_groups):
            plan = self._plans.get(index)
            current = plan is not None and plan.algorithm == self.algorithm_for(group)
            grads = plan.gradients(group, self.state) if current else None
            if grads is None:
                plan = self._plans[index] = self._plan_group(group)
                grads = plan.gradients(group, self.state)
            plan.launch(functools.partial(self.hyper, group), grads)
            launched += plan.buckets
        count_steps(launched)
        return loss

    def _plan_group(self, group: dict) -> GroupPlan:
        """The launches of one group's step: its parameters with gradients, bucketed by device, state layout
        and step number (initialising the states of parameters seen for the first time)."""
        entries, buckets = [], {}
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                entries.append(Entry(param))
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[param]
            if not state:
                self._init_state(param, group, state)
            step = int(state["step"]) + 1  # read only when planning: a plan counts on from it
            local = local_tensor(param)  # FSDP2: each rank updates its shard, blocks are per shard
            key = (local.device, state["state_bits"], state["blocksize"], step)
            slots, bucket = buckets.setdefault(key, ([], Bucket(None, step)))
            slots.append(ParamSlot(local, local_tensor(grad), state.get("state1"), state.get("state2"),
                                   state.get("absmax1"), state.get("absmax2")))
            bucket.add_counter(state["step"])
            entries.append(plan_entry(param, grad, state, bucket, len(slots) - 1))
        algorithm = self.algorithm_for(group)
        for (device, bits, blocksize, _), (slots, bucket) in buckets.items():
            qmap1, qmap2 = self._maps_for(bits, device)
            bucket.launch_plan = plan_update_many(algorithm, slots, qmap1, qmap2, bits, blocksize)
        return GroupPlan(group, entries, [bucket for _, bucket in buckets.values()], algorithm)

    # --- state_dict ---------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but states keep their saved dtypes (torch would
        cast uint8 codes and fp32 absmax to the parameter's dtype): bit-exact round trips, any device."""
        saved_states = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id not in saved_states:
                continue
            for key, value in saved_states[saved_id].items():
                if torch.is_tensor(value) and key != "step":
                    self.state[param][key] = value.to(device=param.device, copy=True)

    def state_bytes(self) -> int:
        """Bytes held by optimizer state tensors (codes, absmax, fp32 states), not counting ``step``."""
        total = 0
        for state in self.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    total += value.numel() * value.element_size()
        return total
