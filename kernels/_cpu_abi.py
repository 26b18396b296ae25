"""The C kernels' interface as ctypes sees it: the structures of ``csrc/`` and each function's signature.

Every structure here mirrors a ``typedef struct`` in ``csrc/`` field for field; change both together.
"""

from __future__ import annotations

import ctypes

import torch

# csrc/dtypes.h: enum effllm_dtype.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Return codes of every kernel (the enums at the top of csrc/*.c).
OK = 0
ERRORS = {1: "out of memory", 2: "bad argument"}

_float_p = ctypes.POINTER(ctypes.c_float)


class CodeMap(ctypes.Structure):
    """csrc/codes.h: effllm_code_map."""

    _fields_ = [
        ("values", _float_p),
        ("midpoints", _float_p),
        ("cells", ctypes.POINTER(ctypes.c_uint32)),
        ("size", ctypes.c_int32),
        ("one_boundary_per_cell", ctypes.c_int32),
    ]


class ParamSlot(ctypes.Structure):
    """csrc/optim_update.c: effllm_param_slot."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("state1", ctypes.c_void_p),
        ("state2", ctypes.c_void_p),
        ("absmax1", ctypes.c_void_p),
        ("absmax2", ctypes.c_void_p),
        ("numel", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
    ]


# A ParamSlot is eight 64-bit words (six addresses, numel, dtype padded to 8 bytes), so a bucket's slots can
# be built as one flat list of ints, much faster than filling structure fields one by one.
SLOT_WORDS = 8
SLOT_GRAD = 1  # word index of the gradient's address
SLOT_NUMEL = 6  # word index of numel
assert ctypes.sizeof(ParamSlot) == SLOT_WORDS * 8 and ParamSlot.numel.offset == SLOT_NUMEL * 8
assert ParamSlot.dtype.offset == (SLOT_NUMEL + 1) * 8 and ParamSlot.grad.offset == SLOT_GRAD * 8


class Hyper(ctypes.Structure):
    """csrc/optim_update.c: effllm_hyper (fp32 scalars, rounded from Python floats as torch rounds them)."""

    _fields_ = [
        ("lr", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("one_minus_beta1", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("decay_factor", ctypes.c_float),
        ("step_size", ctypes.c_float),
        ("bias_correction2_sqrt", ctypes.c_float),
        ("one_minus_dampening", ctypes.c_float),
        ("has_weight_decay", ctypes.c_int32),
        ("first_step", ctypes.c_int32),
        ("nesterov", ctypes.c_int32),
        ("maximize", ctypes.c_int32),
    ]


_i32, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
_map_p = ctypes.POINTER(CodeMap)

# name -> argument types; every kernel returns an int status (OK or a key of ERRORS).
SIGNATURES = {
    # (x, dtype, numel, blocksize, map, codes, absmax, num_threads)
    "effllm_quantize_blockwise": [_ptr, _i32, _i64, _i64, _map_p, _ptr, _ptr, _i32],
    # (codes, absmax, numel, blocksize, map, out, dtype, num_threads)
    "effllm_dequantize_blockwise": [_ptr, _ptr, _i64, _i64, _map_p, _ptr, _i32, _i32],
    # (algo, bits, blocksize, num_threads, slots, num_slots, map1, map2, hyper)
    "effllm_optim_update": [_i32, _i32, _i64, _i32, ctypes.POINTER(ParamSlot), _i64, _map_p, _map_p,
                            ctypes.POINTER(Hyper)],
}


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Sets argtypes/restype of every kernel (a missing symbol raises AttributeError)."""
    for name, argtypes in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return library


def check(status: int, what: str) -> None:
    if status != OK:
        raise RuntimeError(f"C kernel {what} failed: {ERRORS.get(status, f'status {status}')}")
