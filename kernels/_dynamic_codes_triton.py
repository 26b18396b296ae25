"""Triton side of ``dynamic_codes``: the nearest code of the dynamic map computed rather than searched for (the
spec is ``dynamic_codes.encode_ref``, itself checked against ``torch.bucketize``).

Kernels pass the map's midpoints and its ``bits``/``signed`` as constexprs. Each level's slope and offset are
compile-time constants (``level_parameters``, computed as ``dynamic_codes._build`` computes its table; a test
compares the two), so a level costs a fused multiply-add and a minimum per element and no memory reads; the one
gather from the midpoints replaces the eight dependent ones of ``_blockwise_triton.nearest_code``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import dynamic_codes
from .quant_maps import _DECADE_LOW

DECADE_LOW: tl.constexpr = tl.constexpr(_DECADE_LOW)
DYNAMIC: tl.constexpr = tl.constexpr(dynamic_codes.DYNAMIC)
LINEAR: tl.constexpr = tl.constexpr(dynamic_codes.LINEAR)


@triton.jit
def level_parameters(LEVEL: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr):
    """(threshold, slope, offset) of level ``LEVEL`` of ``dynamic_map(SIGNED, BITS)`` as fp32 scalars: the entries
    of ``DynamicCodes.table``, the same Python float arithmetic evaluated at compile time, then rounded to fp32."""
    bins: tl.constexpr = 2 ** (LEVEL + 1 - SIGNED)  # 2**level values per sign (signed), 2**(level + 1) unsigned
    below: tl.constexpr = 2 ** (LEVEL + 1 - SIGNED) - 2 ** (1 - SIGNED)  # values of the levels under this one
    zero: tl.constexpr = SIGNED * (2 ** (BITS - 1) - 1)  # the code of 0
    scale: tl.constexpr = 10.0 ** (LEVEL - (BITS - 1) + 1)
    width: tl.constexpr = (1.0 - DECADE_LOW) / bins
    threshold = tl.full((), DECADE_LOW * scale, tl.float32)
    slope = tl.full((), 1.0 / (scale * width), tl.float32)
    offset = tl.full((), DECADE_LOW / width - (zero + 1 + below), tl.float32)
    return threshold, slope, offset


@triton.jit
def linear_parameters(BITS: tl.constexpr, KIND: tl.constexpr):
    """(slope, offset) of the one line of ``linear_map(False, BITS, KIND == LINEAR)``, as ``dynamic_codes.
    _build_linear`` sets them."""
    if KIND == LINEAR:
        return tl.full((), 2**BITS - 1, tl.float32), tl.full((), -0.5, tl.float32)
    else:
        return tl.full((), 2**BITS, tl.float32), tl.full((), 0.5, tl.float32)


@triton.jit
def dynamic_encode(x, mid_ptr, BITS: tl.constexpr, SIGNED: tl.constexpr, KIND: tl.constexpr):
    """The nearest code (int32) of each fp32 ``x``, as ``torch.bucketize(x, midpoints)``, for a map of ``KIND``
    (``dynamic_codes.DYNAMIC``, ``LINEAR``, ``LINEAR_NOZERO``): the value's position in the map puts the code at
    ``candidate - 1`` or ``candidate``; the midpoint between them decides."""
    top = (1 << BITS) - 1
    if SIGNED:
        magnitude = tl.abs(x)
    else:
        magnitude = x
    # The position plus one half (truncation then rounds it) is the lowest of the levels' lines (dynamic_codes: each
    # line is steeper than the next and they meet where the levels do): a fused multiply-add and a minimum per
    # level, no comparisons or selects. A linear map is one line.
    if KIND == DYNAMIC:
        _, slope, offset = level_parameters(0, BITS, SIGNED)
        rounded = tl.fma(magnitude, slope, 0.5 - offset)
        for level in tl.static_range(1, BITS - 1):
            _, slope, offset = level_parameters(level, BITS, SIGNED)
            rounded = tl.minimum(rounded, tl.fma(magnitude, slope, 0.5 - offset))
    else:
        slope, offset = linear_parameters(BITS, KIND)
        rounded = tl.fma(magnitude, slope, 0.5 - offset)
    if SIGNED:
        rounded = tl.where(x < 0, (top + 1) - rounded, rounded)  # the mirror image: top - position, plus one half
    # The minimum ignores NaN (PTX ``min``, numpy's ``fmin`` under the interpreter): a NaN becomes the top code
    # here, and stays there below (x <= midpoint is false).
    rounded = tl.maximum(tl.minimum(rounded, top + 0.5), 0.0)
    candidate = tl.maximum(rounded.to(tl.int32), 1)
    return tl.where(x <= tl.load(mid_ptr + candidate - 1), candidate - 1, candidate)
