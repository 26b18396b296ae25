"""The fused optimizer update with the C kernels (``csrc/optim_update.c``), for CPU tensors.

One C call updates every parameter of a bucket: the slots become an array of pointers and sizes, and the
kernel splits all their blocks across ``torch.get_num_threads()`` OpenMP threads. A slot the kernel cannot
take as it is (a dtype other than fp32/bf16/fp16, a gradient of another dtype, non-contiguous or mis-sized
states) is updated by ``optim_update_ref``; a non-contiguous parameter is updated through a contiguous copy.

Results equal ``optim_update_ref``: parameters to float rounding, codes identical except where a different
rounding order moves a value across a decision boundary by one ulp (rare; the tests bound it).
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_build
from ._cpu_abi import DTYPE_CODES, Hyper, ParamSlot, check
from ._cpu_code_maps import prepare_map
from .blockwise import num_blocks
from .optim_update import ALGORITHMS, STATES, optim_update_ref
from .packing import packed_numel

# csrc/optim_update.c: the ALGO_* enum.
ALGORITHM_CODES = {name: code for code, name in enumerate(("adam", "adamw", "lion", "sgd", "rmsprop"))}
# Below this many elements per thread, waking more threads costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 1 << 15


def hyper_struct(hyper) -> Hyper:
    """The step's scalars as fp32, each computed in Python floats first as the reference computes it."""
    h = hyper
    return Hyper(
        lr=h.lr,
        beta1=h.beta1,
        beta2=h.beta2,
        one_minus_beta1=1 - h.beta1,
        one_minus_beta2=1 - h.beta2,
        eps=h.eps,
        weight_decay=h.weight_decay,
        decay_factor=1 - h.lr * h.weight_decay,
        step_size=h.lr / (1 - h.beta1**h.step) if h.beta1 != 1 else 0.0,
        bias_correction2_sqrt=(1 - h.beta2**h.step) ** 0.5,
        one_minus_dampening=1 - h.dampening,
        has_weight_decay=bool(h.weight_decay),
        first_step=h.step == 1,
        nesterov=bool(h.nesterov),
    )


def _state_fits(state, absmax, numel: int, bits: int, blocksize: int) -> bool:
    if state is None:
        return absmax is None
    if state.device.type != "cpu" or not state.is_contiguous():
        return False
    if bits == 32:
        return state.dtype == torch.float32 and state.numel() == numel
    stored = numel if bits == 8 else packed_numel(numel, bits)
    return (state.dtype == torch.uint8 and state.numel() == stored and absmax is not None
            and absmax.dtype == torch.float32 and absmax.is_contiguous()
            and absmax.numel() >= num_blocks(numel, blocksize))


def _kernel_takes(algo: str, slot, bits: int, blocksize: int, qmap1, qmap2) -> bool:
    """Whether the C kernel can update this slot (else the reference does)."""
    param, grad = slot.param, slot.grad
    if bits != 32 and (slot.state1 is not None and qmap1 is None or slot.state2 is not None and qmap2 is None):
        return False
    if param.device.type != "cpu" or param.dtype not in DTYPE_CODES or grad.dtype != param.dtype:
        return False
    if grad.device.type != "cpu" or grad.numel() != param.numel():
        return False
    needs_first, needs_second = STATES[algo]
    if needs_second and slot.state2 is None or (needs_first and algo != "sgd" and slot.state1 is None):
        return False
    numel = param.numel()
    return (_state_fits(slot.state1, slot.absmax1, numel, bits, blocksize)
            and _state_fits(slot.state2, slot.absmax2, numel, bits, blocksize))


def _address(tensor: torch.Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


def optim_update_many_cpu(algo, slots, qmap1, qmap2, hyper, bits: int, blocksize: int) -> None:
    """Same contract as ``optim_update_many``, for CPU tensors."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown optimizer algorithm {algo!r}; use one of {', '.join(ALGORITHMS)}")
    native, by_reference = [], []
    for slot in slots:
        (native if _kernel_takes(algo, slot, bits, blocksize, qmap1, qmap2) else by_reference).append(slot)

    if native:
        structs = (ParamSlot * len(native))()
        keep_alive, write_back = [], []
        for struct, slot in zip(structs, native):
            param = slot.param.detach()
            if not param.is_contiguous():
                work = param.contiguous()
                write_back.append((param, work))
                param = work
            grad = slot.grad.detach().contiguous()
            keep_alive.append(grad)
            struct.param, struct.grad = param.data_ptr(), grad.data_ptr()
            struct.state1, struct.state2 = _address(slot.state1), _address(slot.state2)
            struct.absmax1 = _address(slot.absmax1) if bits != 32 else None
            struct.absmax2 = _address(slot.absmax2) if bits != 32 else None
            struct.numel, struct.dtype = param.numel(), DTYPE_CODES[param.dtype]
        map1 = ctypes.byref(prepare_map(qmap1).struct) if bits != 32 and qmap1 is not None else None
        map2 = ctypes.byref(prepare_map(qmap2).struct) if bits != 32 and qmap2 is not None else None
        total = sum(struct.numel for struct in structs)
        threads = max(1, min(torch.get_num_threads(), total // MIN_ELEMENTS_PER_THREAD))
        status = cpu_build.library().effllm_optim_update(
            ALGORITHM_CODES[algo], bits, blocksize, threads, structs, len(native), map1, map2,
            ctypes.byref(hyper_struct(hyper)))
        check(status, f"optim_update ({algo}, {bits}-bit)")
        for param, work in write_back:
            param.copy_(work)

    for s in by_reference:
        optim_update_ref(algo, s.param, s.grad, s.state1, s.state2, s.absmax1, s.absmax2, qmap1, qmap2, hyper,
                         bits, blocksize)
