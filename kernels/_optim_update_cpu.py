"""The fused optimizer update with the C kernels (``csrc/optim_update.c``), for CPU tensors.

One C call updates every parameter of a bucket: the slots become an array of pointers and sizes, and the
kernel splits all their blocks across ``torch.get_num_threads()`` OpenMP threads. A slot the kernel cannot
take as it is (a dtype other than fp32/bf16/fp16, a gradient of another dtype, non-contiguous or mis-sized
states) is updated by ``optim_update_ref``; a non-contiguous parameter is updated through a contiguous copy.
An optimizer stepping the same parameters again and again builds that array once (``plan_update_many_cpu``)
and then only swaps in new gradient addresses: a step of a few parameters is then one C call.

Results equal ``optim_update_ref`` operation by operation (same order, each rounded to fp32, lerp as torch's
fused multiply-add). Measured against the reference, one step at a time from the same inputs, over 50 steps
of 262144 parameters for every algorithm at 8 and 4 bits: no code differed, and parameters differed by at
most one ulp, because torch's vectorised CPU ``sqrt`` is not always correctly rounded and the kernel's is
(relative difference up to 2e-7 for Adam, 4e-6 for RMSprop where the step divides by sqrt(v) + eps). A code
could in principle differ by one where such an ulp moves a state across a decision boundary.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

import torch

from . import cpu_build
from ._cpu_abi import DTYPE_CODES, SLOT_GRAD, SLOT_NUMEL, SLOT_WORDS, Hyper, ParamSlot, check
from ._cpu_code_maps import prepare_map
from .blockwise import num_blocks
from .optim_update import ALGORITHMS, STATES, UpdatePlan, kernel_scalars, optim_update_ref
from .packing import packed_numel

# csrc/optim_update.c: the ALGO_* enum.
ALGORITHM_CODES = {name: code for code, name in enumerate(("adam", "adamw", "lion", "sgd", "rmsprop"))}
_CACHED_HYPERS = 16  # a step's buckets, and param groups with other hyper-parameters
# Below this many elements per thread, waking more threads costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 1 << 15


@functools.lru_cache(maxsize=_CACHED_HYPERS)
def hyper_struct(hyper) -> Hyper:
    """The step's scalars as fp32, each computed in Python floats first as the reference computes it. Cached:
    the buckets of a step share them (the returned structure is read, never written)."""
    return Hyper(**kernel_scalars(hyper), has_weight_decay=bool(hyper.weight_decay), first_step=hyper.step == 1,
                 nesterov=bool(hyper.nesterov), maximize=bool(hyper.maximize))


def _state_words(state, absmax, numel: int, bits: int, blocksize: int) -> tuple[int, int] | None:
    """(state address, absmax address) for the kernel (0 for none), or None when it cannot take the state
    as it is. Sizes are checked here because the kernel writes through these addresses."""
    if state is None:
        return (0, 0) if absmax is None else None
    if not state.is_cpu or not state.is_contiguous():
        return None
    if bits == 32:
        return (state.data_ptr(), 0) if state.dtype is torch.float32 and state.numel() == numel else None
    stored = numel if bits == 8 else packed_numel(numel, bits)
    if (state.dtype is not torch.uint8 or state.numel() != stored or absmax is None or not absmax.is_cpu
            or absmax.dtype is not torch.float32 or not absmax.is_contiguous()
            or absmax.numel() < num_blocks(numel, blocksize)):
        return None
    return state.data_ptr(), absmax.data_ptr()


def _kernel_words(slot, needs_first: bool, needs_second: bool, maps: tuple[bool, bool], bits: int,
                  blocksize: int) -> list[int] | None:
    """The slot as SLOT_WORDS words (ParamSlot's layout) for the kernel, taking its tensors where they lie,
    or None when the kernel cannot take them so (see the module docstring). ``maps``: whether each state
    has its map."""
    param, grad = slot.param, slot.grad
    dtype_code = DTYPE_CODES.get(param.dtype)
    if (dtype_code is None or not _takes_grad(param, grad) or not param.is_contiguous()
            or (needs_first and slot.state1 is None) or (needs_second and slot.state2 is None)
            or (bits != 32 and ((slot.state1 is not None and not maps[0])
                                or (slot.state2 is not None and not maps[1])))):
        return None
    numel = param.numel()
    first = _state_words(slot.state1, slot.absmax1, numel, bits, blocksize)
    second = _state_words(slot.state2, slot.absmax2, numel, bits, blocksize)
    if first is None or second is None:
        return None
    return [param.data_ptr(), grad.data_ptr(), first[0], second[0], first[1], second[1], numel, dtype_code]


def _takes_grad(param: torch.Tensor, grad: torch.Tensor) -> bool:
    return (grad.dtype is param.dtype and grad.numel() == param.numel() and param.is_cpu and grad.is_cpu
            and grad.is_contiguous())


def _needed_states(algo: str) -> tuple[bool, bool]:
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown optimizer algorithm {algo!r}; use one of {', '.join(ALGORITHMS)}")
    needs_first, needs_second = STATES[algo]
    return needs_first and algo != "sgd", needs_second  # SGD without momentum keeps no buffer


class _KernelCall:
    """One C call over a fixed array of slots; only gradient addresses and the step's scalars change."""

    def __init__(self, algo: str, words: list[int], qmap1, qmap2, bits: int, blocksize: int):
        self.algo, self.bits, self.blocksize = algo, bits, blocksize
        self.array = (ctypes.c_int64 * len(words))(*words)
        self.count = len(words) // SLOT_WORDS
        # The prepared maps are cached per map (and stay referenced there) for as long as the maps live.
        self.map1 = ctypes.byref(prepare_map(qmap1).struct) if bits != 32 and qmap1 is not None else None
        self.map2 = ctypes.byref(prepare_map(qmap2).struct) if bits != 32 and qmap2 is not None else None
        self.most_threads = max(1, sum(words[SLOT_NUMEL::SLOT_WORDS]) // MIN_ELEMENTS_PER_THREAD)
        self.slots = ctypes.cast(self.array, ctypes.POINTER(ParamSlot))

    def __call__(self, hyper) -> None:
        threads = min(torch.get_num_threads(), self.most_threads)
        status = cpu_build.library().effllm_optim_update(
            ALGORITHM_CODES[self.algo], self.bits, self.blocksize, threads, self.slots, self.count, self.map1,
            self.map2, ctypes.byref(hyper_struct(hyper)))
        check(status, f"optim_update ({self.algo}, {self.bits}-bit)")


def optim_update_many_cpu(algo, slots, qmap1, qmap2, hyper, bits: int, blocksize: int) -> None:
    """Same contract as ``optim_update_many``, for CPU tensors."""
    needs_first, needs_second = _needed_states(algo)
    maps = (qmap1 is not None, qmap2 is not None)
    words: list[int] = []  # SLOT_WORDS per slot, laid out as ParamSlot
    by_reference, write_back, keep_alive = [], [], []
    for slot in slots:
        work = slot  # non-contiguous tensors go through contiguous copies (the parameter's copied back after)
        if slot.param.is_cpu and not slot.param.is_contiguous():
            work = dataclasses.replace(work, param=slot.param.detach().contiguous())
        if slot.grad.is_cpu and not slot.grad.is_contiguous():
            work = dataclasses.replace(work, grad=slot.grad.contiguous())
        slot_words = _kernel_words(work, needs_first, needs_second, maps, bits, blocksize)
        if slot_words is None:
            by_reference.append(slot)
            continue
        words += slot_words
        keep_alive.append(work)  # the copies must outlive the call
        if work.param is not slot.param:
            write_back.append((slot.param, work.param))
    if words:
        _KernelCall(algo, words, qmap1, qmap2, bits, blocksize)(hyper)
        for param, work in write_back:
            param.detach().copy_(work)

    for s in by_reference:
        optim_update_ref(algo, s.param, s.grad, s.state1, s.state2, s.absmax1, s.absmax2, qmap1, qmap2, hyper,
                         bits, blocksize)


class CpuUpdatePlan(UpdatePlan):
    """An ``UpdatePlan`` whose slot array is built once: a launch writes the gradients' addresses into it
    and makes one C call."""

    def __init__(self, algo, slots, qmap1, qmap2, bits, blocksize, words: list[int]):
        super().__init__(algo, slots, qmap1, qmap2, bits, blocksize)
        self.call = _KernelCall(algo, words, qmap1, qmap2, bits, blocksize)

    def accepts_grad(self, index: int, grad: torch.Tensor) -> bool:
        return _takes_grad(self.slots[index].param, grad)

    def launch(self, hyper, grads: list[torch.Tensor]) -> None:
        array = self.call.array
        for index, grad in enumerate(grads):
            array[index * SLOT_WORDS + SLOT_GRAD] = grad.data_ptr()
        self.call(hyper)


def plan_update_many_cpu(algo, slots, qmap1, qmap2, bits: int, blocksize: int) -> UpdatePlan:
    """A ``CpuUpdatePlan`` when the kernel takes every slot as it lies, else a plan that launches
    ``optim_update_many_cpu`` each step."""
    needs_first, needs_second = _needed_states(algo)
    maps = (qmap1 is not None, qmap2 is not None)
    words: list[int] = []
    for slot in slots:
        slot_words = _kernel_words(slot, needs_first, needs_second, maps, bits, blocksize)
        if slot_words is None:
            return UpdatePlan(algo, slots, qmap1, qmap2, bits, blocksize)
        words += slot_words
    return CpuUpdatePlan(algo, slots, qmap1, qmap2, bits, blocksize, words)
