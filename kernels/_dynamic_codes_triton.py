"""Triton side of ``dynamic_codes``: the nearest code of the dynamic map computed rather than searched for (the
spec is ``dynamic_codes.encode_ref``, itself checked against ``torch.bucketize``).

Kernels pass the ``DynamicCodes`` table, the map's midpoints and its ``bits``/``signed`` as constexprs. The
table's gathers read at most 7 entries (one cache line whatever the values); the one gather from the midpoints
replaces the eight dependent ones of ``_blockwise_triton.nearest_code``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dynamic_codes import COL_OFFSET, COL_SLOPE, COL_THRESHOLD, LEVELS_CAPACITY

_THRESHOLD: tl.constexpr = tl.constexpr(COL_THRESHOLD * LEVELS_CAPACITY)
_SLOPE: tl.constexpr = tl.constexpr(COL_SLOPE * LEVELS_CAPACITY)
_OFFSET: tl.constexpr = tl.constexpr(COL_OFFSET * LEVELS_CAPACITY)


@triton.jit
def dynamic_encode(x, table_ptr, mid_ptr, BITS: tl.constexpr, SIGNED: tl.constexpr):
    """The nearest code (int32) of each fp32 ``x``, as ``torch.bucketize(x, midpoints)``: the value's position
    within its level puts the code at ``candidate - 1`` or ``candidate``; the midpoint between them decides."""
    top = (1 << BITS) - 1
    if SIGNED:
        magnitude = tl.abs(x)
    else:
        magnitude = x
    level = tl.zeros(x.shape, dtype=tl.int32)
    for candidate_level in tl.static_range(1, BITS - 1):
        level += (magnitude >= tl.load(table_ptr + _THRESHOLD + candidate_level)).to(tl.int32)
    position = magnitude * tl.load(table_ptr + _SLOPE + level) - tl.load(table_ptr + _OFFSET + level)
    if SIGNED:
        position = tl.where(x < 0, top - position, position)
    position = tl.where(position == position, position, 0.0)  # NaN: any candidate, its code is set below
    position = tl.minimum(tl.maximum(position, 0.0), top * 1.0)
    candidate = tl.minimum(tl.maximum((position + 0.5).to(tl.int32), 1), top)
    code = tl.where(x <= tl.load(mid_ptr + candidate - 1), candidate - 1, candidate)
    return tl.where(x != x, top, code)
