"""Resume with effllm a run that bitsandbytes' 8-bit optimizers started: ``load_bitsandbytes_state_dict``.

bitsandbytes (tested with 0.50.2) saves, per parameter, an integer ``step`` and its states, nested under
``__bnb_optimizer_quant_state__`` (a flat layout is read too): ``state1``/``state2`` as uint8 codes of blocks of
256 on its dynamic maps ``qmap1``/``qmap2`` with fp32 ``absmax1``/``absmax2``, or as fp32 tensors for
parameters below ``min_8bit_size``. effllm's 8-bit maps are the same (bitsandbytes' entries differ by at most
one float32 ulp), so codes carry over untouched where effllm keeps the state in the same layout. Anywhere else
(another width or block size chosen for the effllm optimizer, a state that bitsandbytes keeps on another map,
such as RMSprop's square average on the signed map) the values are dequantized and stored in effllm's layout.
"""

from __future__ import annotations

import torch

from effllm.kernels.blockwise import dequantize_blockwise_ref, quantize_blockwise_ref
from effllm.kernels.packing import pack_bits_ref

from .blockwise_optimizer import BlockwiseOptimizer

NESTED_KEY = "__bnb_optimizer_quant_state__"
BNB_BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizers always quantize blocks of 256
# effllm state index of each bitsandbytes state, by algorithm (bitsandbytes keeps RMSprop's square average
# as its first state, effllm as its second, the slot of second moments).
STATE_INDEX = {"adam": {1: 1, 2: 2}, "adamw": {1: 1, 2: 2}, "lion": {1: 1}, "sgd": {1: 1}, "rmsprop": {1: 2}}
_MAX_ULPS = 1  # how far apart a bitsandbytes map entry may be from effllm's for its codes to carry over


def load_bitsandbytes_state_dict(optimizer: BlockwiseOptimizer, state_dict: dict) -> None:
    """Loads a bitsandbytes 8-bit optimizer's ``state_dict()`` into ``optimizer``, an effllm optimizer of the
    same algorithm built over the same parameters in the same order (as ``load_state_dict``). Hyper-parameters
    the two share (``lr``, ``betas``, ``eps``, ``weight_decay``, ...) are taken from the saved groups."""
    optimizer.load_state_dict(from_bitsandbytes_state_dict(optimizer, state_dict))


def from_bitsandbytes_state_dict(optimizer: BlockwiseOptimizer, state_dict: dict) -> dict:
    """The effllm ``state_dict`` equivalent to bitsandbytes' ``state_dict`` for ``optimizer`` (see above)."""
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or not isinstance(state_dict.get("state"), dict):
        raise ValueError("not an optimizer state_dict: expected 'state' and 'param_groups'")
    own = optimizer.state_dict()
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in own["param_groups"]]:
        raise ValueError("the saved param groups do not match the optimizer's: build it over the same parameters "
                         "in the same groups and order")
    groups, states = [], {}
    for saved_group, own_group, group in zip(saved_groups, own["param_groups"], optimizer.param_groups):
        groups.append({**own_group, **{k: v for k, v in saved_group.items() if k in own_group and k != "params"}})
        merged = {**group, **groups[-1], "params": group["params"]}
        for saved_id, own_id, param in zip(saved_group["params"], own_group["params"], group["params"]):
            if saved_id in state_dict["state"]:
                states[own_id] = _param_state(optimizer, merged, param, state_dict["state"][saved_id])
    return {"state": states, "param_groups": groups}


def _param_state(optimizer: BlockwiseOptimizer, group: dict, param: torch.Tensor, saved: dict) -> dict:
    saved = {**{k: v for k, v in saved.items() if k != NESTED_KEY}, **saved.get(NESTED_KEY, {})}
    algorithm = optimizer.algorithm_for(group)
    if any(key in saved for key in ("max1", "new_max1", "state3")):
        raise ValueError("only blockwise 8-bit states of Adam, AdamW, Lion, SGD and RMSprop can be loaded "
                         "(this one is tensor-wise or has a third state)")
    state: dict = {}
    optimizer._init_state(param, group, state)  # effllm's layout for this parameter, then filled in
    state["step"] = torch.tensor(float(saved.get("step", 0)))
    for bnb_index, index in STATE_INDEX[algorithm].items():
        if f"state{bnb_index}" not in saved:
            raise ValueError(f"the saved state has no state{bnb_index}: was it saved by bitsandbytes' "
                             f"{algorithm} optimizer?")
        if f"state{index}" in state:
            _fill(optimizer, state, index, saved, bnb_index, param)
    return state


def _fill(optimizer, state: dict, index: int, saved: dict, bnb_index: int, param: torch.Tensor) -> None:
    """effllm's state ``index`` from bitsandbytes' state ``bnb_index``: codes as they are when both layouts
    and maps agree, else the dequantized values in effllm's layout."""
    codes, absmax, qmap = (saved.get(f"{name}{bnb_index}") for name in ("state", "absmax", "qmap"))
    if codes.numel() != param.numel():
        raise ValueError(f"state{bnb_index} has {codes.numel()} elements, its parameter {param.numel()}")
    bits, blocksize = state["state_bits"], state["blocksize"]
    own_map = optimizer._maps_for(bits, param.device)[0 if index == 1 else 1] if bits != 32 else None
    quantized = codes.dtype == torch.uint8
    if quantized and (absmax is None or qmap is None):
        raise ValueError(f"the quantized state{bnb_index} has no absmax{bnb_index} or qmap{bnb_index}")
    if quantized and bits == 8 and blocksize == BNB_BLOCKSIZE and _same_map(qmap, own_map):
        state[f"state{index}"] = codes.reshape(-1).to(param.device, copy=True)
        state[f"absmax{index}"] = absmax.to(param.device, torch.float32, copy=True)
        return
    codes = codes.reshape(-1).to(param.device)
    values = (dequantize_blockwise_ref(codes, absmax.float().to(param.device), qmap.float().to(param.device),
                                       BNB_BLOCKSIZE) if quantized else codes.float())
    if bits == 32:
        state[f"state{index}"] = values.reshape(param.shape).clone()
        return
    new_codes, new_absmax = quantize_blockwise_ref(values, own_map, blocksize)
    state[f"state{index}"] = new_codes if bits == 8 else pack_bits_ref(new_codes, bits)
    state[f"absmax{index}"] = new_absmax


def _same_map(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """Whether every entry is within ``_MAX_ULPS`` float32 ulps of ours (same signs, same order)."""
    if theirs.numel() != ours.numel():
        return False
    theirs, ours = theirs.detach().to(ours.device, torch.float32), ours.float()
    same_sign = torch.signbit(theirs) == torch.signbit(ours)
    distance = (theirs.view(torch.int32).long() - ours.view(torch.int32).long()).abs()
    return bool(((theirs == ours) | (same_sign & (distance <= _MAX_ULPS))).all())
