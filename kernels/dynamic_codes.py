"""Codes of the dynamic map computed rather than searched for, for the GPU kernels.

The dynamic map (``quant_maps.dynamic_map``) is a sign, a decimal exponent (the "level") and a linear fraction:
level ``L`` holds ``bins(L)`` evenly spaced values ``scale(L) * (0.1 + (k + 0.5) * 0.9 / bins(L))``. The
nearest code of a value (``torch.bucketize`` over the map's midpoints) therefore needs no search. A value's
position (``k + 0.5`` at the k-th value of a level, plus the codes below it) is a linear function of its
magnitude within each level; the lines meet at the level thresholds, and each is five times as steep as the
next, so the position is simply the lowest of them. The position gives the code to within half a code, so the
code is ``candidate - 1`` or ``candidate``, and one comparison with the midpoint between those two decides.
On a GPU this replaces the binary search's eight dependent gathers from a 255-entry table (about eight cache
lines per warp and step) by one gather from the midpoints; the per-level parameters are compile-time constants
of the kernel (``_dynamic_codes_triton.level_parameters``, equal to this table's entries).

``DynamicCodes.for_map`` returns the parameters only for a map equal to ``dynamic_map(signed, bits)`` whose
computed codes it has verified (``verify_encode``); any other map keeps the searched path. The kernels' float32
arithmetic is replayed here in torch, operation by operation, so the verification covers what they compute.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from .quant_maps import _DECADE_LOW, dynamic_map, linear_map, map_midpoints

MIN_BITS, MAX_BITS = 2, 8
# The maps whose codes are computed, as the kernels' ``COMPUTED`` constexpr numbers them (0: searched). An
# unsigned linear map is a single line: its position is computed as a dynamic map's is within one level.
SEARCHED, DYNAMIC, LINEAR, LINEAR_NOZERO = 0, 1, 2, 3
# Table layout (float32, one row per level, LEVELS_CAPACITY rows per column): level thresholds, slopes,
# offsets. A value's position in the map is value * slope - offset, within its level.
LEVELS_CAPACITY = MAX_BITS - 1
COL_THRESHOLD, COL_SLOPE, COL_OFFSET = 0, 1, 2
TABLE_SIZE = 3 * LEVELS_CAPACITY
_CACHED = 32


def levels_of(bits: int) -> int:
    return bits - 1


def bins_of(level: int, signed: bool) -> int:
    return 2**level if signed else 2 ** (level + 1)


def zero_code(bits: int, signed: bool) -> int:
    """The code of 0: the middle for signed maps, the first for unsigned ones."""
    return 2 ** (bits - 1) - 1 if signed else 0


@dataclass(frozen=True)
class DynamicCodes:
    """Parameters of the computed codes of ``dynamic_map(signed, bits)`` (``kind`` DYNAMIC), or of an unsigned
    ``linear_map(False, bits, include_zero)`` (LINEAR, LINEAR_NOZERO; one level): ``table`` (float32
    [TABLE_SIZE])."""

    signed: bool
    bits: int
    table: torch.Tensor
    kind: int = DYNAMIC

    @property
    def levels(self) -> int:
        return levels_of(self.bits) if self.kind == DYNAMIC else 1

    def to(self, device: torch.device | str) -> DynamicCodes:
        return DynamicCodes(self.signed, self.bits, self.table.to(device), self.kind)

    @staticmethod
    def for_map(qmap: torch.Tensor, device: torch.device | str | None = None) -> DynamicCodes | None:
        """The parameters, on ``device`` (default the map's), if ``qmap`` is a dynamic map or an unsigned linear
        map whose computed codes verify, else ``None``. Reads the map's values once per map tensor and device, not
        at every call (reading a GPU tensor waits for the device)."""
        return _for_map_cached(qmap, torch.device(device) if device is not None else qmap.device)


@functools.lru_cache(maxsize=_CACHED)
def _build(signed: bool, bits: int) -> DynamicCodes | None:
    levels = levels_of(bits)
    table = torch.zeros(TABLE_SIZE, dtype=torch.float32)
    zero = zero_code(bits, signed)
    below = 0  # values of the levels under this one (one sign)
    for level in range(levels):
        bins = bins_of(level, signed)
        scale = 10.0 ** (level - levels + 1)  # as quant_maps._dynamic_map_cpu
        width = (1.0 - _DECADE_LOW) / bins
        # Position: code of the level's first value plus (value / scale - 0.1) / width, which is k + 0.5 at the
        # level's k-th value: between two midpoints it lies between their codes.
        table[COL_THRESHOLD * LEVELS_CAPACITY + level] = _DECADE_LOW * scale  # the level starts here
        table[COL_SLOPE * LEVELS_CAPACITY + level] = 1.0 / (scale * width)
        table[COL_OFFSET * LEVELS_CAPACITY + level] = _DECADE_LOW / width - (zero + 1 + below)
        below += bins
    codes = DynamicCodes(signed, bits, table)
    return codes if verify_encode(codes, dynamic_map(signed, bits)) else None


@functools.lru_cache(maxsize=_CACHED)
def _build_linear(bits: int, include_zero: bool) -> DynamicCodes | None:
    """The one line of ``linear_map(False, bits, include_zero)``: values ``k / (2**bits - 1)``, or ``(k + 1) /
    2**bits`` without zero, so the position ``k + 0.5`` at the k-th value is ``value * slope - offset``."""
    table = torch.zeros(TABLE_SIZE, dtype=torch.float32)
    slope = 2**bits - 1 if include_zero else 2**bits
    table[COL_SLOPE * LEVELS_CAPACITY] = slope
    table[COL_OFFSET * LEVELS_CAPACITY] = -0.5 if include_zero else 0.5
    codes = DynamicCodes(False, bits, table, LINEAR if include_zero else LINEAR_NOZERO)
    return codes if verify_encode(codes, linear_map(False, bits, include_zero)) else None


# (id(map tensor), device) -> (weak reference, version counter, parameters on that device or None).
_BY_IDENTITY: dict[tuple[int, torch.device], tuple[weakref.ref, int, DynamicCodes | None]] = {}


def _for_map_cached(qmap: torch.Tensor, device: torch.device) -> DynamicCodes | None:
    key = (id(qmap), device)
    entry = _BY_IDENTITY.get(key)
    if entry is not None and entry[0]() is qmap and entry[1] == qmap._version:
        return entry[2]
    found = None
    size = qmap.numel()
    if qmap.dim() == 1 and size >= 2**MIN_BITS and size & (size - 1) == 0 and size <= 2**MAX_BITS:
        bits = size.bit_length() - 1
        values = qmap.detach().to("cpu", torch.float32)
        signed = bool(values[0] < 0)
        built = None
        if torch.equal(values, dynamic_map(signed, bits)):
            built = _build(signed, bits)
        elif not signed and torch.equal(values, linear_map(False, bits, True)):
            built = _build_linear(bits, True)
        elif not signed and torch.equal(values, linear_map(False, bits, False)):
            built = _build_linear(bits, False)
        found = built.to(device) if built is not None else None
    if len(_BY_IDENTITY) >= _CACHED:
        _BY_IDENTITY.clear()
    _BY_IDENTITY[key] = (weakref.ref(qmap), qmap._version, found)
    return found


# --- the kernels' arithmetic, replayed in torch ----------------------------------------------------------------


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` of float32 tensors rounded once to float32, as a GPU's fused multiply-add (torch has none).
    The product is exact in float64 (48 significant bits). The sum is rounded to float64 round-to-odd (towards
    zero, then the last bit set if anything was lost), which float64's 29 spare bits then round to float32 exactly
    as a single rounding would."""
    product = a.double() * b.double()
    addend = c.double().expand_as(product)
    total = product + addend
    # TwoSum: the float64 sum's rounding error, exactly.
    virtual = total - product
    error = ((product - (total - virtual)) + (addend - virtual)).nan_to_num(0.0)  # infinite sums are exact
    towards_zero = torch.where((error != 0) & ((error < 0) != (total < 0)), total.nextafter(torch.zeros_like(total)),
                               total)
    odd = torch.where(error != 0, (towards_zero.view(torch.int64) | 1).view(torch.float64), total)
    return odd.float()


def estimate_ref(codes: DynamicCodes, x: torch.Tensor) -> torch.Tensor:
    """The candidate code ``r`` of float32 ``x`` (the nearest code is ``r - 1`` or ``r``), as the kernels compute
    it: the position plus one half, the lowest of the levels' lines ``fma(|x|, slope, 0.5 - offset)`` (mirrored
    for negative values), clamped, truncated."""
    top = 2**codes.bits - 1
    magnitude = x.abs() if codes.signed else x
    table = codes.table
    half = torch.tensor(0.5)
    rounded = None
    for level in range(codes.levels):
        line = fma32(magnitude, table[COL_SLOPE * LEVELS_CAPACITY + level],
                     half - table[COL_OFFSET * LEVELS_CAPACITY + level])
        rounded = line if rounded is None else torch.minimum(rounded, line)
    if codes.signed:
        rounded = torch.where(x < 0, (top + 1) - rounded, rounded)
    rounded = torch.fmin(rounded, torch.tensor(top + 0.5)).clamp(min=0.0)  # fmin ignores NaN: the top code
    return rounded.to(torch.int64).clamp(min=1)


def encode_ref(codes: DynamicCodes, x: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """The nearest code of float32 ``x`` as the kernels compute it, given the map's ``midpoints`` (should equal
    ``torch.bucketize(x, midpoints)``: ``verify_encode`` checks it)."""
    candidate = estimate_ref(codes, x)
    return torch.where(x <= midpoints[candidate - 1], candidate - 1, candidate)  # a NaN keeps the top code


def probes(qmap: torch.Tensor, codes: DynamicCodes, seed: int = 0) -> torch.Tensor:
    """Every value where the encoding could go wrong (midpoints, map entries and level thresholds with their
    float32 neighbours), special values, and random values of every scale; on the CPU, wherever the map and the
    codes' table live."""
    generator = torch.Generator().manual_seed(seed)
    qmap, thresholds = qmap.cpu(), codes.table[: codes.levels].cpu()
    anchors = torch.cat([map_midpoints(qmap), qmap, thresholds, -thresholds])
    up, down = torch.full_like(anchors, float("inf")), torch.full_like(anchors, -float("inf"))
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.2e-38, -1.2e-38,
                            float("inf"), -float("inf"), float("nan")])
    magnitudes = 10 ** (torch.rand(100_000, generator=generator) * -12)
    signs = torch.where(torch.rand(100_000, generator=generator) < 0.5, -1.0, 1.0)
    uniform = torch.rand(100_000, generator=generator) * 2 - 1
    return torch.cat([anchors, anchors.nextafter(up), anchors.nextafter(down), special, magnitudes * signs, uniform])


def verify_encode(codes: DynamicCodes, qmap: torch.Tensor) -> bool:
    """Whether the computed code equals ``torch.bucketize`` over the midpoints at every probe. The candidate is
    monotone in the value (each line is, and so are their minimum, the mirror and the clamps), and a right code
    means the candidate is the true code or the next: agreement on both sides of every midpoint means agreement
    everywhere in between."""
    x, midpoints = probes(qmap, codes), map_midpoints(qmap)
    return torch.equal(encode_ref(codes, x, midpoints), torch.bucketize(x, midpoints))
