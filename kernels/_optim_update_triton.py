"""Triton kernel of the fused optimizer update (the spec is ``optim_update.optim_update_ref``).

One launch updates every parameter of a bucket that shares the parameter and gradient dtypes: a table of
data pointers (one row per parameter) and a table of work items (one row per program: which parameter,
which first block) replace one launch per tensor. Each program owns ``ROWS`` whole quantization blocks
(several small blocks per program; one block when blocks are large): it loads and dequantizes the states,
updates parameter and states in fp32, takes each block's new absmax, requantizes and stores. Nothing on the
host waits for the device. Requantizing to the 8-bit dynamic maps computes each code (``dynamic_codes``)
instead of the binary search that serves other maps; with small programs (``QUANTIZED_ELEMENTS_PER_PROGRAM``)
that made the 8-bit step 3x faster on an H200 (docs/optim.md).

Arithmetic follows the reference operation by operation (IEEE ``div_rn``/``sqrt_rn``, one ``fma`` where
``torch.lerp`` uses one, no other contraction), so results match it to the last bit or within an ulp. Divisions by
a value shared by a whole row or launch (a block's absmax, Adam's bias correction) are a reciprocal and one exact
correction (``_exact_quotient``), which rounds as the division does.

Imported lazily by ``optim_update``: importing effllm never imports Triton.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._blockwise_triton import (
    ELEMENTS_PER_PROGRAM,
    MAX_TILE,
    map_code,
    map_code_constexprs,
    num_warps_for,
    on_device,
    rows_for,
    tile_for,
    to_storage_dtype,
)
from .blockwise import num_blocks
from .dynamic_codes import SEARCHED
from .optim_update import ALGORITHMS, STATE_BITS, STATES, Hyper, ParamSlot, UpdatePlan, kernel_scalars, optim_update_ref
from .packing import packed_numel
from .quant_maps import map_midpoints

# Algorithm ids as the kernel sees them (compile-time constants).
ADAM: tl.constexpr = tl.constexpr(ALGORITHMS.index("adam"))
ADAMW: tl.constexpr = tl.constexpr(ALGORITHMS.index("adamw"))
LION: tl.constexpr = tl.constexpr(ALGORITHMS.index("lion"))
SGD: tl.constexpr = tl.constexpr(ALGORITHMS.index("sgd"))
RMSPROP: tl.constexpr = tl.constexpr(ALGORITHMS.index("rmsprop"))

# Columns of the per-parameter table (int64): data pointers, the element count, then the launch bases.
COL_PARAM: tl.constexpr = tl.constexpr(0)
COL_GRAD: tl.constexpr = tl.constexpr(1)
COL_STATE1: tl.constexpr = tl.constexpr(2)
COL_STATE2: tl.constexpr = tl.constexpr(3)
COL_ABSMAX1: tl.constexpr = tl.constexpr(4)
COL_ABSMAX2: tl.constexpr = tl.constexpr(5)
COL_NUMEL: tl.constexpr = tl.constexpr(6)
# The parameter's base in each launch (whole programs, the others): its programs there start at its block
# (program - base) * ROWS. Kept in the row, where the program reads it with the pointers, rather than in a
# table of its own: 15 fewer instructions per element at 256-element programs of 4 warps (compiled for sm_90).
COL_WHOLE_BASE: tl.constexpr = tl.constexpr(7)
COL_PARTIAL_BASE: tl.constexpr = tl.constexpr(8)
DATA_COLS = 4  # param, grad, state1, state2: the pointers whose data is read and written element by element
TABLE_COLS: tl.constexpr = tl.constexpr(9)

INF: tl.constexpr = tl.constexpr(float("inf"))
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
LOW_NIBBLE: tl.constexpr = tl.constexpr(0xF)
NIBBLE_BITS: tl.constexpr = tl.constexpr(4)
# _normalized: rows with a smaller absmax are multiplied by RESCALE (both exact powers of two) before dividing.
TINY_SCALE: tl.constexpr = tl.constexpr(2.0**-60)
RESCALE: tl.constexpr = tl.constexpr(2.0**64)
# torch.lerp switches formula at this weight (each side exact for weights near its end).
LERP_SWITCH = 0.5

# Two lanes at least: the kernel views a tile as byte pairs (TILE // 2), even when no state is packed.
MIN_TILE = 2
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Elements, warps and registers per program when states are quantized (whole blocks; one block when blocks are
# larger). Timed on an H100 (256Mi elements, 8-bit AdamW, benchmarks/optim_gpu_variants.py, docs/optim.md):
# 256 elements in one warp under a cap of 64 registers per thread 1.77 ms (81% of the bandwidth bound), in one
# warp uncapped (76 registers, fewer warps resident) 1.94, in two warps 2.76, in four warps 2.43; 512 in four warps
# 2.96. The cap costs a few spilled registers (to L1) and buys 32 resident warps per SM instead of 25.
QUANTIZED_ELEMENTS_PER_PROGRAM = 256
QUANTIZED_WARPS = 1
# Programs of larger blocks get more warps, so that a thread holds at most this many elements (up to 8 warps).
QUANTIZED_ELEMENTS_PER_THREAD = 8
# Registers per thread ptxas may use for those programs (its --maxrregcount; None: its own choice).
QUANTIZED_MAX_REGISTERS: int | None = 64
# Bytes every data pointer of a bucket must be a multiple of for the kernel's vectorised path (one 128-bit access).
ALIGNMENT_BYTES = 16
ALIGNMENT: tl.constexpr = tl.constexpr(ALIGNMENT_BYTES)
# Whether aligned buckets tell the compiler so (tl.multiple_of). Off until a GPU has timed it: compiled offline for
# sm_90 at the default layout, Triton 3.6 turns the hints into shared-memory layout conversions (246 instructions
# per element against 199.5 without), and Triton 3.9 gains nothing from them there (192.5 against 191.5);
# benchmarks/optim_gpu_variants.py times both (docs/optim.md).
ALIGNMENT_HINTS = False
# Overrides the four settings above for quantized states, for tuning on a GPU without editing this file:
# ELEMENTS/WARPS[/REGISTERS][+hints], e.g. 256/1/64 (benchmarks/gpu_check.sh times the fastest variant with it).
LAYOUT_VARIABLE = "EFFLLM_TRITON_OPTIM_LAYOUT"
_LAYOUT_SYNTAX = re.compile(r"(\d+)/(\d+)(?:/(\d+))?(\+hints)?")


@dataclass(frozen=True)
class LayoutOverride:
    """A layout for quantized states set from ``LAYOUT_VARIABLE``: elements and warps per program, the register
    cap (None: the compiler's choice) and whether aligned buckets get the alignment hints."""

    elements: int
    warps: int
    max_registers: int | None
    hints: bool

    @staticmethod
    @functools.lru_cache(maxsize=8)  # read at every launch: parse each text once
    def parse(text: str) -> LayoutOverride:
        match = _LAYOUT_SYNTAX.fullmatch(text.strip())
        override = None
        if match:
            elements, warps = int(match[1]), int(match[2])
            registers = int(match[3]) if match[3] else None
            override = LayoutOverride(elements, warps, registers, bool(match[4]))
        if override is None or not override.valid():
            raise ValueError(f"{LAYOUT_VARIABLE}={text!r} is not ELEMENTS/WARPS[/REGISTERS][+hints] with a power of "
                             f"two of elements from {MIN_TILE} to {MAX_TILE}, 1 to 32 warps (a power of two) and 24 "
                             f"to 255 registers, e.g. 256/4 or 256/1/64+hints; unset it for the default layout")
        return override

    def valid(self) -> bool:
        def power_of_two(n: int) -> bool:
            return n > 0 and n & (n - 1) == 0

        return (power_of_two(self.elements) and MIN_TILE <= self.elements <= MAX_TILE and power_of_two(self.warps)
                and self.warps <= 32 and (self.max_registers is None or 24 <= self.max_registers <= 255))

    def label(self) -> str:
        registers = f"/{self.max_registers}" if self.max_registers else ""
        return f"{self.elements}/{self.warps}{registers}" + ("+hints" if self.hints else "")


def _layout_override() -> LayoutOverride | None:
    text = os.environ.get(LAYOUT_VARIABLE, "")
    return LayoutOverride.parse(text) if text.strip() else None


# Pointer/work tables kept per set of tensors, so a steady training loop builds and uploads them once.
TABLE_CACHE_SIZE = 64


@triton.jit
def _lerp(start, end, weight, FROM_START: tl.constexpr):
    """``torch.lerp(start, end, weight)`` with a scalar weight, rounding as torch does (one fma). ``FROM_START``
    is ``weight < LERP_SWITCH``, decided on the host (``_lerp_from_start``): one fma per element, not two."""
    diff = end - start
    if FROM_START:
        return tl.fma(weight, diff, start)
    else:
        return tl.fma(weight - 1.0, diff, end)


@triton.jit
def _exact_quotient(x, divisor, reciprocal):
    """``x / divisor`` rounded as IEEE division (``div_rn``) from ``reciprocal = div_rn(1, divisor)``, for a divisor
    shared by many elements: a product and one correction by fused multiply-add (Markstein), 4 instructions
    instead of a division's 10-odd. Requires ``x >= 0`` (or NaN), a normal positive ``divisor``, and the residual
    ``x - quotient * divisor`` (about ``x * 2**-24``) to stay a normal number, i.e. ``x >= 2**-102`` or 0: checked
    against IEEE division over every ``x`` significand of 32 exponents for 300 divisors (8e10 pairs, none
    differed). Where the residual is not finite (an infinite ``x`` makes it NaN, a quotient that overflows -inf)
    it becomes -FLT_MAX, whose correction leaves the infinite product as it is, as in the division: the maximum
    ignores NaN (PTX ``max``, and numpy's ``fmax`` under the interpreter)."""
    quotient = x * reciprocal
    residual = tl.fma(-quotient, divisor, x)
    return tl.fma(tl.maximum(residual, -FLT_MAX), reciprocal, quotient)


@triton.jit
def _normalized(x, scale):
    """``x / scale[:, None]`` (each row by its own positive scale) rounded as IEEE division, as in
    ``_exact_quotient``. A row whose scale is below TINY_SCALE (states decayed towards zero) is scaled up by
    RESCALE first, exactly, so that every quotient that can decide a code (2**-24 and above) has a normal
    residual; checked against IEEE division for scales from 2**-149 to 2**-38 (1.5e10 pairs, none differed).
    An infinite scale (a state that overflowed) has reciprocal 0: its residual is taken against 0 rather than
    infinity, which leaves the product ``x * 0``, that is ``x / inf``, without a check per element."""
    rescale = tl.where(scale < TINY_SCALE, RESCALE, 1.0)  # [ROWS]
    divisor = scale * rescale
    reciprocal = tl.math.div_rn(1.0, divisor)[:, None]
    finite_divisor = tl.where(divisor < INF, divisor, 0.0)[:, None]
    x = x * rescale[:, None]
    quotient = x * reciprocal
    return tl.fma(tl.fma(-quotient, finite_divisor, x), reciprocal, quotient)


@triton.jit
def _data_pointer(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """``address`` (int64, from the pointer table) as a pointer to ``DTYPE``; with ``ALIGNED`` (checked on the
    host) the compiler is told it is a multiple of ``ALIGNMENT`` bytes, so whole rows load and store as vectors."""
    pointer = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, ALIGNMENT)
    return pointer


@triton.jit
def _load_state(
    state_addr, absmax_addr, qmap_ptr,
    block, block_mask,  # [ROWS] int64 block index within the parameter, and whether it exists
    offs,  # [ROWS, TILE] element offsets
    mask,  # [ROWS, TILE]
    byte_offs, byte_mask,  # [ROWS, TILE // 2], used at 4 bits
    BITS: tl.constexpr, ALIGNED: tl.constexpr,
):
    """The fp32 state values [ROWS, TILE] (0 where masked)."""
    if BITS == 32:
        value = tl.load(_data_pointer(state_addr, tl.float32, ALIGNED) + offs, mask=mask, other=0.0)
    else:
        codes_ptr = _data_pointer(state_addr, tl.uint8, ALIGNED)
        if BITS == 8:
            code = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        else:
            packed = tl.load(codes_ptr + byte_offs, mask=byte_mask, other=0).to(tl.int32)  # [ROWS, TILE // 2]
            code = tl.interleave(packed & LOW_NIBBLE, packed >> NIBBLE_BITS)  # [ROWS, TILE], low nibble first
        absmax = tl.load(absmax_addr.to(tl.pointer_type(tl.float32)) + block, mask=block_mask, other=0.0)  # [ROWS]
        value = tl.load(qmap_ptr + code, mask=mask, other=0.0) * absmax[:, None]
    return value


@triton.jit
def _store_state(
    new,  # [ROWS, TILE] fp32
    state_addr, absmax_addr, mid_ptr, n_mid,
    block, block_mask,  # [ROWS]
    offs, mask,  # [ROWS, TILE]
    byte_offs, byte_mask,  # [ROWS, TILE // 2]
    BITS: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    COMPUTED: tl.constexpr, SIGNED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Write ``new`` back: fp32 as is, or requantized with each block's fresh absmax."""
    if BITS == 32:
        tl.store(_data_pointer(state_addr, tl.float32, ALIGNED) + offs, new, mask=mask)
    else:
        absmax = tl.max(tl.where(mask, tl.abs(new), 0.0), axis=1)  # [ROWS]
        scale = tl.where(absmax > 0, absmax, 1.0)  # an all-zero block divides by 1
        code = map_code(_normalized(new, scale), mid_ptr, n_mid,
                        BITS, SEARCH_STEPS, COMPUTED, SIGNED)
        code = tl.where(mask, code, 0)  # the spare nibble of an odd-sized tensor is 0, as in pack_bits_ref
        codes_ptr = _data_pointer(state_addr, tl.uint8, ALIGNED)
        if BITS == 8:
            tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
        else:
            low, high = tl.split(tl.reshape(code, (ROWS, TILE // 2, 2)))  # [ROWS, TILE // 2] each
            tl.store(codes_ptr + byte_offs, (low | (high << NIBBLE_BITS)).to(tl.uint8), mask=byte_mask)
        tl.store(absmax_addr.to(tl.pointer_type(tl.float32)) + block, absmax, mask=block_mask)


@triton.jit
def _work_item(table_ptr, work_ptr, ROWS: tl.constexpr, WHOLE: tl.constexpr):
    """This program's parameter (the address of its row in the pointer table) and first block: the work table
    names the parameter (int32), and the parameter's base in this launch, in its row, gives the block."""
    program = tl.program_id(0)
    row = table_ptr + tl.load(work_ptr + program) * TABLE_COLS
    base = tl.load(row + (COL_WHOLE_BASE if WHOLE else COL_PARTIAL_BASE))
    return row, (program - base) * ROWS


@triton.jit
def _optim_update_kernel(
    table_ptr,  # int64 [nparams, TABLE_COLS]
    work_ptr,  # int32 [nprograms]: each program's parameter (program k of parameter i: block (k - base) * ROWS)
    qmap1_ptr, mid1_ptr, n_mid1,  # first-moment map [2**bits] and its midpoints [n_mid1], fp32
    qmap2_ptr, mid2_ptr, n_mid2,  # the same for the second moment
    lr, beta1, beta2, eps, weight_decay,
    one_minus_beta1, one_minus_beta2, one_minus_dampening,
    decay_factor,  # 1 - lr * weight_decay (decoupled decay)
    step_size,  # lr / (1 - beta1**step)
    bias_correction2_sqrt,  # sqrt(1 - beta2**step)
    bias_correction2_reciprocal,  # 1 / bias_correction2_sqrt, rounded once to fp32 (fp32_reciprocal)
    blocksize,
    ALGO: tl.constexpr, BITS: tl.constexpr,
    HAS_STATE1: tl.constexpr, HAS_STATE2: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, MAXIMIZE: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    ROWS: tl.constexpr, TILE: tl.constexpr, SEARCH1: tl.constexpr, SEARCH2: tl.constexpr,
    COMPUTED1: tl.constexpr, SIGNED1: tl.constexpr, COMPUTED2: tl.constexpr, SIGNED2: tl.constexpr,
    LERP_FROM_START: tl.constexpr,  # the moment's lerp weight (Adam's 1 - beta1, Lion's 1 - beta2) < LERP_SWITCH
    ALIGNED: tl.constexpr,  # every data pointer is a multiple of ALIGNMENT bytes
    WHOLE: tl.constexpr,  # every program's rows are whole blocks of TILE elements inside their tensor
):
    row, first_block = _work_item(table_ptr, work_ptr, ROWS, WHOLE)
    numel = tl.load(row + COL_NUMEL)
    block = first_block + tl.arange(0, ROWS)  # [ROWS]
    lanes = tl.arange(0, TILE)[None, :]  # [1, TILE]
    pairs = tl.arange(0, TILE // 2)[None, :]  # [1, TILE // 2]: byte j of a block holds elements 2j, 2j+1
    if WHOLE:
        # Masks that are constant along each row, so the compiler may turn a row's accesses into vectors.
        block_start = block[:, None] * TILE  # [ROWS, 1]
        block_mask = tl.full((ROWS,), 1, tl.int1)
        mask = tl.full((ROWS, TILE), 1, tl.int1)
        byte_mask = tl.full((ROWS, TILE // 2), 1, tl.int1)
    else:
        block_start = block[:, None] * blocksize
        block_mask = block * blocksize < numel
        mask = (lanes < blocksize) & (block_start + lanes < numel)
        byte_mask = (2 * pairs < blocksize) & (block_start + 2 * pairs < numel)
    offs = block_start + lanes  # [ROWS, TILE]
    byte_offs = block_start // 2 + pairs

    param_ptr = _data_pointer(tl.load(row + COL_PARAM), P_DTYPE, ALIGNED)
    grad_ptr = _data_pointer(tl.load(row + COL_GRAD), G_DTYPE, ALIGNED)
    p_old = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # False for NaN and +-Inf: those elements keep param and state (selected back below, each element on its own,
    # so what the update computes for them goes nowhere).
    finite = tl.abs(g) < INF
    if MAXIMIZE:
        g = -g
    p = p_old
    if HAS_STATE1:
        m_old = _load_state(tl.load(row + COL_STATE1), tl.load(row + COL_ABSMAX1), qmap1_ptr,
                            block, block_mask, offs, mask, byte_offs, byte_mask, BITS, ALIGNED)
        m = m_old
    if HAS_STATE2:
        v_old = _load_state(tl.load(row + COL_STATE2), tl.load(row + COL_ABSMAX2), qmap2_ptr,
                            block, block_mask, offs, mask, byte_offs, byte_mask, BITS, ALIGNED)
        v = v_old

    if ALGO == ADAM or ALGO == ADAMW:
        if WEIGHT_DECAY:
            if ALGO == ADAM:
                g = g + weight_decay * p  # L2, as torch.optim.Adam
            else:
                p = p * decay_factor  # decoupled, as torch.optim.AdamW
        m = _lerp(m_old, g, one_minus_beta1, LERP_FROM_START)
        v = v_old * beta2 + one_minus_beta2 * g * g
        # sqrt(v) is 0 or at least 2**-75, the divisor in (0, 1]: the conditions of _exact_quotient.
        denom = _exact_quotient(tl.math.sqrt_rn(v), bias_correction2_sqrt, bias_correction2_reciprocal) + eps
        p = p - step_size * tl.math.div_rn(m, denom)
    elif ALGO == LION:
        blend = m_old * beta1 + g * one_minus_beta1
        direction = tl.where(blend > 0, 1.0, tl.where(blend < 0, -1.0, 0.0))
        p = p * decay_factor - lr * direction
        m = _lerp(m_old, g, one_minus_beta2, LERP_FROM_START)
    elif ALGO == SGD:
        if WEIGHT_DECAY:
            g = g + weight_decay * p
        if HAS_STATE1:
            if FIRST_STEP:
                m = g  # torch.optim.SGD starts the buffer as the gradient itself
            else:
                m = m_old * beta1 + one_minus_dampening * g
            if NESTEROV:
                g = g + beta1 * m
            else:
                g = m
        p = p - lr * g
    elif ALGO == RMSPROP:
        if WEIGHT_DECAY:
            g = g + weight_decay * p
        v = v_old * beta2 + one_minus_beta2 * g * g
        p = p - tl.math.div_rn(lr * g, tl.math.sqrt_rn(v) + eps)

    p = tl.where(finite, p, p_old)
    tl.store(param_ptr + offs, to_storage_dtype(p, P_DTYPE), mask=mask)
    if HAS_STATE1:
        _store_state(tl.where(finite, m, m_old), tl.load(row + COL_STATE1), tl.load(row + COL_ABSMAX1),
                     mid1_ptr, n_mid1, block, block_mask, offs, mask, byte_offs, byte_mask,
                     BITS, ROWS, TILE, SEARCH1, COMPUTED1, SIGNED1, ALIGNED)
    if HAS_STATE2:
        _store_state(tl.where(finite, v, v_old), tl.load(row + COL_STATE2), tl.load(row + COL_ABSMAX2),
                     mid2_ptr, n_mid2, block, block_mask, offs, mask, byte_offs, byte_mask,
                     BITS, ROWS, TILE, SEARCH2, COMPUTED2, SIGNED2, ALIGNED)


# --- host side --------------------------------------------------------------------------------------------

_table_cache: OrderedDict[tuple, _LaunchTables] = OrderedDict()


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _check_slot(slot: ParamSlot, algo: str, bits: int, blocksize: int) -> None:
    """Shape and dtype checks on metadata only (no device synchronisation)."""
    numel = slot.param.numel()
    others = (slot.grad, slot.state1, slot.state2, slot.absmax1, slot.absmax2)
    if any(t is not None and t.device != slot.param.device for t in others):
        raise ValueError(f"gradient and states must be on the parameter's device ({slot.param.device})")
    if slot.grad.numel() != numel:
        raise ValueError(f"gradient has {slot.grad.numel()} elements, parameter {numel}")
    if slot.param.dtype not in TL_DTYPES or slot.grad.dtype not in TL_DTYPES:
        dtypes = f"{slot.param.dtype}/{slot.grad.dtype}"
        raise TypeError(f"parameters and gradients must be fp32, bf16 or fp16, got {dtypes}")
    keeps = STATES[algo]
    for index, (state, absmax, keep) in enumerate(
        ((slot.state1, slot.absmax1, keeps[0]), (slot.state2, slot.absmax2, keeps[1])), start=1
    ):
        if state is None:
            if keep and not (algo == "sgd" and index == 1):  # SGD without momentum keeps no buffer
                raise ValueError(f"{algo} needs state{index}")
            continue
        if not keep:
            raise ValueError(f"{algo} keeps no state{index}")
        if not state.is_contiguous():
            raise ValueError(f"state{index} must be contiguous")
        if bits == 32:
            if state.dtype != torch.float32 or state.numel() != numel:
                raise ValueError(f"32-bit state{index} must be fp32 with {numel} elements")
            continue
        expected = numel if bits == 8 else packed_numel(numel, bits)
        if state.dtype != torch.uint8 or state.numel() != expected:
            raise ValueError(f"{bits}-bit state{index} must be uint8 with {expected} elements")
        if absmax is None or absmax.dtype != torch.float32 or absmax.numel() != num_blocks(numel, blocksize):
            raise ValueError(f"absmax{index} must be fp32 with {num_blocks(numel, blocksize)} elements")


@dataclass(frozen=True)
class _Layout:
    """How the kernel cuts the work: rows of ``rows_len`` elements, ``rows`` of them per program, in ``num_warps``
    warps of at most ``max_registers`` registers per thread (None: the compiler's choice); with
    ``alignment_hints``, buckets whose pointers are aligned tell the compiler so."""

    rows_len: int
    tile: int
    rows: int
    num_warps: int
    max_registers: int | None = None
    alignment_hints: bool = False


def _layout(bits: int, blocksize: int) -> _Layout:
    # At 32 bits there are no quantization blocks: rows are just tiles of the flat tensors.
    rows_len = ELEMENTS_PER_PROGRAM if bits == 32 else blocksize
    tile = max(tile_for(rows_len), MIN_TILE)
    # Quantized states: small programs (one block in one warp, 8 elements per thread, registers capped so that
    # 32 warps stay resident per SM); on an H100 the 8-bit step took 1.77 ms so, 2.43 with the same block in 4
    # warps (the settings above). 32-bit states keep the larger programs of the other kernels.
    if bits == 32:
        rows = rows_for(tile)
        return _Layout(rows_len, tile, rows, num_warps_for(rows * tile), alignment_hints=ALIGNMENT_HINTS)
    override = _layout_override()
    if override is not None:
        return _Layout(rows_len, tile, max(1, override.elements // tile), override.warps, override.max_registers,
                       override.hints)
    rows = max(1, QUANTIZED_ELEMENTS_PER_PROGRAM // tile)
    warps = max(QUANTIZED_WARPS, min(8, rows * tile // (32 * QUANTIZED_ELEMENTS_PER_THREAD)))
    # The register cap was timed at 8 elements per thread; programs that hold more (blocks over 2048) go uncapped
    # rather than spill.
    capped = rows * tile <= 32 * warps * QUANTIZED_ELEMENTS_PER_THREAD
    return _Layout(rows_len, tile, rows, warps, QUANTIZED_MAX_REGISTERS if capped else None, ALIGNMENT_HINTS)


@dataclass(frozen=True)
class _LaunchTables:
    """What a bucket's launches read, on the device: the pointer table [nparams, TABLE_COLS] and two work tables
    (int32 [nprograms], each program's parameter: 4 bytes per program, 1/64 byte per element at 256-element
    programs), one for the programs whose rows are all whole blocks inside their tensor (the kernel's mask-free
    copy, launched with WHOLE) and one for the rest (a tensor's last program, or all of them when blocks are not
    a power of two long); and whether every data pointer (parameter, gradient, states) is a multiple of
    ALIGNMENT bytes, which the vectorised accesses need (fresh CUDA allocations are; a view at an odd offset may
    not be)."""

    pointers: torch.Tensor
    whole_work: torch.Tensor
    partial_work: torch.Tensor
    aligned: bool

    def first_blocks(self, whole: bool, rows: int) -> list[tuple[int, int]]:
        """(parameter, first block) of every program of one launch, on the host (for tests)."""
        work = (self.whole_work if whole else self.partial_work).cpu().long()
        bases = self.pointers.cpu()[work, (COL_WHOLE_BASE if whole else COL_PARTIAL_BASE).value]
        return list(zip(work.tolist(), ((torch.arange(work.numel()) - bases) * rows).tolist()))


def _work_table(first_program: Sequence[int], end_program: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A launch of programs ``first_program[i] <= j < end_program[i]`` of each parameter ``i`` (its ``j``-th
    program starts at block ``j * rows``), in parameter order: each program's parameter (int32 [nprograms]) and
    each parameter's base (int64 [nparams]; launch program ``k`` of parameter ``i`` is its program
    ``k - base[i]``). Vectorised: a large model has millions of programs."""
    first = torch.tensor(first_program, dtype=torch.int64)
    counts = torch.tensor(end_program, dtype=torch.int64) - first  # [nparams]
    params = torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int32), counts)  # [nprograms]
    start = torch.cumsum(counts, 0) - counts  # the launch's first program of each parameter
    return params, start - first


def _tables(tensors: Sequence[tuple], numels: Sequence[int], layout: _Layout, device: torch.device) -> _LaunchTables:
    """The launch tables of ``tensors`` (rows of param, grad, state1, state2, absmax1, absmax2), cached."""
    key = (device, layout, tuple(tuple(_address(t) for t in row) for row in tensors), tuple(numels))
    cached = _table_cache.get(key)
    if cached is not None:
        _table_cache.move_to_end(key)
        return cached
    aligned = all(_address(t) % ALIGNMENT_BYTES == 0 for row in tensors for t in row[:DATA_COLS])
    programs = [triton.cdiv(num_blocks(n, layout.rows_len), layout.rows) for n in numels]
    # Whole programs: rows of exactly TILE elements (blocks of a power-of-two size), all inside the tensor.
    whole = [n // (layout.tile * layout.rows) if layout.rows_len == layout.tile else 0 for n in numels]
    (whole_work, whole_bases), (partial_work, partial_bases) = _work_table([0] * len(numels), whole), _work_table(
        whole, programs)
    table = torch.tensor([[_address(t) for t in row] + [n] for row, n in zip(tensors, numels)], dtype=torch.int64)
    table = torch.cat([table, whole_bases[:, None], partial_bases[:, None]], dim=1)
    launch = [table, whole_work, partial_work]
    if device.type == "cuda":  # upload asynchronously from pinned memory: no wait on the device
        launch = [t.pin_memory() for t in launch]
    cached = _LaunchTables(*(t.to(device, non_blocking=True) for t in launch), aligned)
    _table_cache[key] = cached
    if len(_table_cache) > TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return cached


def _map_args(qmap: torch.Tensor | None, device: torch.device, placeholder: torch.Tensor) -> tuple[list, dict]:
    """The kernel's arguments for one state's map: (map, midpoints, number of midpoints) and its constexprs
    (search steps, whether codes are computed, signed); placeholders at 32 bits."""
    if qmap is None:
        return [placeholder, placeholder, 0], dict(SEARCH=0, COMPUTED=SEARCHED, SIGNED=False)
    table = qmap.to(device=device, dtype=torch.float32).contiguous()
    midpoints = map_midpoints(table).contiguous()
    code = map_code_constexprs(qmap, device)
    constexprs = dict(SEARCH=code["SEARCH_STEPS"], COMPUTED=code["COMPUTED"], SIGNED=code["SIGNED"])
    return [table, midpoints, midpoints.numel()], constexprs


def _fp32(value: float) -> float:
    """``value`` rounded to fp32, as a kernel receives a float argument."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _lerp_from_start(algo: str, h: Hyper) -> bool:
    """Which side of ``torch.lerp``'s formula the moment update takes, judged on the fp32 weight the kernel gets."""
    weight = 1 - h.beta2 if algo == "lion" else 1 - h.beta1
    return _fp32(weight) < LERP_SWITCH


def fp32_reciprocal(value: float) -> float:
    """``1 / value`` as IEEE fp32 division rounds it, ``value`` first rounded to fp32 as a kernel argument is.
    Rounding the double quotient to fp32 is exact here: the reciprocal of a 24-bit significand is never within a
    relative 2**-48 of a point halfway between two fp32 values, and the double's rounding moves it by at most
    2**-53."""
    return _fp32(1.0 / _fp32(value))


def _launch_constexprs(algo: str, bits: int, h: Hyper, layout: _Layout, maps: tuple, has_states: tuple[bool, bool],
                       p_dtype: torch.dtype, g_dtype: torch.dtype, aligned: bool) -> dict:
    """The kernel's compile-time arguments for a bucket's launches, all but ``WHOLE`` (which path a launch takes);
    also what ``offline_compile`` compiles."""
    (_, const1), (_, const2) = maps
    return dict(
        ALGO=ALGORITHMS.index(algo), BITS=bits, HAS_STATE1=has_states[0], HAS_STATE2=has_states[1],
        WEIGHT_DECAY=bool(h.weight_decay), NESTEROV=bool(h.nesterov), FIRST_STEP=h.step == 1,
        MAXIMIZE=bool(h.maximize), P_DTYPE=TL_DTYPES[p_dtype], G_DTYPE=TL_DTYPES[g_dtype],
        ROWS=layout.rows, TILE=layout.tile, SEARCH1=const1["SEARCH"], SEARCH2=const2["SEARCH"],
        COMPUTED1=const1["COMPUTED"], SIGNED1=const1["SIGNED"], COMPUTED2=const2["COMPUTED"],
        SIGNED2=const2["SIGNED"], LERP_FROM_START=_lerp_from_start(algo, h), ALIGNED=aligned)


def _launch(algo: str, bits: int, h: Hyper, layout: _Layout, tables: _LaunchTables, maps: tuple,
            has_states: tuple[bool, bool], p_dtype: torch.dtype, g_dtype: torch.dtype, device: torch.device) -> None:
    """The launches over the parameters of ``tables`` (whole programs, then the others); ``maps`` is
    ``_map_args`` of each state."""
    (args1, _), (args2, _) = maps
    # A register cap only when one is set: the default launch passes no option older Tritons might not know.
    options = {} if layout.max_registers is None else {"maxnreg": layout.max_registers}
    scalars = kernel_scalars(h)
    scalars["bias_correction2_reciprocal"] = fp32_reciprocal(scalars["bias_correction2_sqrt"])
    constexprs = _launch_constexprs(algo, bits, h, layout, maps, has_states, p_dtype, g_dtype,
                                    aligned=tables.aligned and layout.alignment_hints)
    with on_device(device):
        for work, whole in ((tables.whole_work, True), (tables.partial_work, False)):
            if work.shape[0] == 0:
                continue
            _optim_update_kernel[(work.shape[0],)](
                tables.pointers, work, *args1, *args2, **scalars, blocksize=layout.rows_len, **constexprs, WHOLE=whole,
                num_warps=layout.num_warps, enable_fp_fusion=False, **options,
            )


def _check_arguments(algo: str, bits: int, blocksize: int) -> None:
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown optimizer algorithm {algo!r}; use one of {', '.join(ALGORITHMS)}")
    if bits not in STATE_BITS:
        raise ValueError(f"state bits must be one of {STATE_BITS}, got {bits}")
    if bits != 32 and blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")


def _bucket_key(slot: ParamSlot) -> tuple:
    """Slots that can share a launch: (device, param dtype, grad dtype, no state1, no state2)."""
    return (slot.param.device, slot.param.dtype, slot.grad.dtype, slot.state1 is None, slot.state2 is None)


def _needs_reference(bits: int, blocksize: int) -> bool:
    # One program holds whole blocks of at most MAX_TILE elements, and two programs must never share a byte of
    # 4-bit codes. Such unusual layouts take the reference path (same results, slower).
    return bits != 32 and (blocksize > MAX_TILE or (bits == 4 and blocksize % 2))


def optim_update_many_triton(
    algo: str,
    slots: list[ParamSlot],
    qmap1: torch.Tensor | None,
    qmap2: torch.Tensor | None,
    hyper: Hyper,
    bits: int,
    blocksize: int,
) -> None:
    """Same contract as ``optim_update.optim_update_many``: one launch per (param dtype, grad dtype)."""
    _check_arguments(algo, bits, blocksize)
    if _needs_reference(bits, blocksize):
        for s in slots:
            optim_update_ref(algo, s.param, s.grad, s.state1, s.state2, s.absmax1, s.absmax2, qmap1, qmap2, hyper,
                             bits, blocksize)
        return
    slots = [s for s in slots if s.param.numel() > 0]
    if not slots:
        return
    for slot in slots:
        _check_slot(slot, algo, bits, blocksize)
    layout = _layout(bits, blocksize)
    buckets: dict[tuple, list[ParamSlot]] = {}
    for slot in slots:
        buckets.setdefault(_bucket_key(slot), []).append(slot)
    for (device, p_dtype, g_dtype, no_state1, no_state2), bucket in buckets.items():
        # The kernel writes through raw pointers: work on contiguous copies and write them back after.
        params = [s.param.detach() if s.param.is_contiguous() else s.param.detach().contiguous() for s in bucket]
        grads = [s.grad.contiguous() for s in bucket]
        tensors = [(p, g, s.state1, s.state2, s.absmax1, s.absmax2) for p, g, s in zip(params, grads, bucket)]
        tables = _tables(tensors, [p.numel() for p in params], layout, device)
        maps = (_map_args(qmap1 if not no_state1 else None, device, tables.pointers),
                _map_args(qmap2 if not no_state2 else None, device, tables.pointers))
        _launch(algo, bits, hyper, layout, tables, maps, (not no_state1, not no_state2), p_dtype, g_dtype, device)
        for slot, work_copy in zip(bucket, params):
            if work_copy.data_ptr() != slot.param.data_ptr():
                slot.param.detach().copy_(work_copy)


@dataclass(frozen=True)
class _PlannedBucket:
    """One launch of a plan: the slots (by index) that share dtypes, device and which states they keep."""

    indices: list[int]
    p_dtype: torch.dtype
    g_dtype: torch.dtype
    device: torch.device
    maps: tuple  # _map_args of each state
    has_states: tuple[bool, bool]


class TritonUpdatePlan(UpdatePlan):
    """``optim_update_many_triton`` over the same parameters step after step, with the per-parameter work done
    once: checks, buckets, launch layout, map arguments. Each launch only takes the gradients, whose addresses
    key the cached pointer tables (``_tables``; a steady loop reuses one upload). Parameters that are not
    contiguous, gradients that are not, and unusual block layouts take the unplanned path."""

    def __init__(self, algo: str, slots: list[ParamSlot], qmap1, qmap2, bits: int, blocksize: int):
        super().__init__(algo, slots, qmap1, qmap2, bits, blocksize)
        _check_arguments(algo, bits, blocksize)
        live = [(index, slot) for index, slot in enumerate(slots) if slot.param.numel() > 0]
        self.planned = not _needs_reference(bits, blocksize) and all(
            slot.param.is_contiguous() and slot.grad.is_contiguous() for _, slot in live)
        if not self.planned:
            return
        for _, slot in live:
            _check_slot(slot, algo, bits, blocksize)
        self.layout = _layout(bits, blocksize)
        self.grad_dtypes = [slot.grad.dtype for slot in slots]
        self.buckets: list[_PlannedBucket] = []
        by_key: dict[tuple, list[int]] = {}
        for index, slot in live:
            by_key.setdefault(_bucket_key(slot), []).append(index)
        for (device, p_dtype, g_dtype, no_state1, no_state2), indices in by_key.items():
            placeholder = torch.zeros(1, dtype=torch.int64, device=device)
            maps = (_map_args(qmap1 if not no_state1 else None, device, placeholder),
                    _map_args(qmap2 if not no_state2 else None, device, placeholder))
            self.buckets.append(_PlannedBucket(indices, p_dtype, g_dtype, device, maps, (not no_state1, not no_state2)))

    def accepts_grad(self, index: int, grad: torch.Tensor) -> bool:
        if not self.planned:
            return True
        slot = self.slots[index]
        return (grad.device == slot.param.device and grad.dtype == self.grad_dtypes[index]
                and grad.numel() == slot.param.numel() and grad.is_contiguous())

    def launch(self, hyper: Hyper, grads: list[torch.Tensor]) -> None:
        if not self.planned:
            return super().launch(hyper, grads)
        for bucket in self.buckets:
            slots = [self.slots[index] for index in bucket.indices]
            tensors = [(s.param.detach(), grads[index], s.state1, s.state2, s.absmax1, s.absmax2)
                       for index, s in zip(bucket.indices, slots)]
            tables = _tables(tensors, [s.param.numel() for s in slots], self.layout, bucket.device)
            _launch(self.algo, self.bits, hyper, self.layout, tables, bucket.maps, bucket.has_states,
                    bucket.p_dtype, bucket.g_dtype, bucket.device)
