"""Per-map tables for the C kernels' nearest-code search (see ``csrc/codes.h``).

The top 16 bits of an fp32 value (sign, exponent, 7 mantissa bits) name a cell of 65536 values. For each
cell the table holds the code ``torch.bucketize`` gives the cell's lowest value and, in the upper 16 bits, the
low 16 bits of the decision boundary inside the cell (or a sentinel no value passes). One read and one
comparison then give the exact ``bucketize`` code for every value, provided no cell holds two boundaries;
that is checked here for each map (the 8- and 4-bit dynamic and linear maps pass), and a map that fails it is
served by walking the midpoints instead. Built once per distinct map and cached.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from dataclasses import dataclass

import torch

from ._cpu_abi import CodeMap
from .quant_maps import map_midpoints

MAP_CAPACITY = 256  # csrc/codes.h: values[] is always padded to this many entries
CELL_BITS = 16
CELLS = 1 << CELL_BITS
LOW_MASK = CELLS - 1
NEGATIVE_CELLS = CELLS // 2  # cells from here on hold negative values (sign bit set)
# A boundary no value of the cell passes: positive values pass when their low bits are above it, negative
# values when below it.
NO_BOUNDARY_POSITIVE = LOW_MASK
NO_BOUNDARY_NEGATIVE = 0
_CACHED_MAPS = 64


def _as_float(bit_patterns: torch.Tensor) -> torch.Tensor:
    """int64 tensor of 32-bit patterns -> the fp32 values they encode."""
    wrapped = torch.where(bit_patterns >= 2**31, bit_patterns - 2**32, bit_patterns)
    return wrapped.to(torch.int32).view(torch.float32)


def _bit_patterns(values: torch.Tensor) -> torch.Tensor:
    """fp32 tensor -> its 32-bit patterns as non-negative int64."""
    return values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


@dataclass
class CellTable:
    """``cells`` [65536] int32 (the C side reads uint32) and whether one comparison per cell is exact."""

    cells: torch.Tensor
    one_boundary_per_cell: bool


def build_cell_table(qmap: torch.Tensor) -> CellTable:
    """The cell table of a sorted fp32 map (see the module docstring)."""
    midpoints = map_midpoints(qmap.float())
    cell = torch.arange(CELLS, dtype=torch.int64)
    negative = cell >= NEGATIVE_CELLS
    first, last = cell << CELL_BITS, (cell << CELL_BITS) | LOW_MASK
    # Values grow with the bit pattern for positive cells and fall with it for negative ones.
    lowest, highest = _as_float(torch.where(negative, last, first)), _as_float(torch.where(negative, first, last))
    code_low = torch.bucketize(lowest, midpoints)
    boundaries_inside = torch.bucketize(highest, midpoints) - code_low
    # Cells holding NaNs (and +-inf) give every value the code of NaN: values divided by their block's absmax
    # never fall there unless they are NaN already.
    has_nan = lowest.isnan() | highest.isnan()
    code_low = torch.where(has_nan, torch.bucketize(torch.tensor([float("nan")]), midpoints), code_low)
    boundaries_inside = torch.where(has_nan, 0, boundaries_inside)

    one_boundary = bool(boundaries_inside.max() <= 1) if midpoints.numel() else True
    boundary_low = torch.where(negative, NO_BOUNDARY_NEGATIVE, NO_BOUNDARY_POSITIVE)
    if midpoints.numel():
        crossing = boundaries_inside == 1
        boundary = midpoints[code_low.clamp(max=midpoints.numel() - 1)]
        boundary_bits = _bit_patterns(boundary.contiguous())
        # A boundary at +-0 sits at the bottom of the positive zero cell whatever its sign bit.
        boundary_bits = torch.where(boundary == 0, first, boundary_bits)
        if bool((crossing & ((boundary_bits >> CELL_BITS) != cell)).any()):
            one_boundary = False
        boundary_low = torch.where(crossing, boundary_bits & LOW_MASK, boundary_low)
    packed = code_low | (boundary_low << CELL_BITS)
    return CellTable(_as_float(packed).view(torch.int32).contiguous(), one_boundary)


@dataclass
class PreparedMap:
    """A map as the C kernels take it; the tensors stay referenced for as long as the structure is used."""

    values: torch.Tensor  # [MAP_CAPACITY] fp32, zero-padded
    midpoints: torch.Tensor  # [max(size - 1, 1)] fp32
    table: CellTable
    sorted: bool
    struct: CodeMap


@functools.lru_cache(maxsize=_CACHED_MAPS)
def _prepare(entries: tuple[float, ...]) -> PreparedMap:
    qmap = torch.tensor(entries, dtype=torch.float32)
    is_sorted = bool((qmap[1:] >= qmap[:-1]).all())
    values = torch.zeros(MAP_CAPACITY, dtype=torch.float32)
    values[: qmap.numel()] = qmap
    midpoints = (map_midpoints(qmap) if qmap.numel() > 1 else torch.zeros(1)).contiguous()
    table = build_cell_table(qmap)
    struct = CodeMap(
        _pointer(values, CodeMap._fields_[0][1]),
        _pointer(midpoints, CodeMap._fields_[1][1]),
        _pointer(table.cells, CodeMap._fields_[2][1]),
        qmap.numel(),
        int(table.one_boundary_per_cell),
    )
    return PreparedMap(values, midpoints, table, is_sorted, struct)


def _pointer(tensor: torch.Tensor, pointer_type):
    return ctypes.cast(tensor.data_ptr(), pointer_type)


# id(map tensor) -> (weak reference to it, its version counter, prepared map): the optimizer passes the same
# map tensors every step, and reading 256 values back to find the content-keyed entry costs more than a step
# of a small parameter. The weak reference and version make a reused id or an edited map miss.
_BY_IDENTITY: dict[int, tuple[weakref.ref, int, PreparedMap]] = {}


def prepare_map(qmap: torch.Tensor) -> PreparedMap:
    """The prepared form of ``qmap`` (a 1-D map of at most 256 entries), built once per distinct map."""
    entry = _BY_IDENTITY.get(id(qmap))
    if entry is not None and entry[0]() is qmap and entry[1] == qmap._version:
        return entry[2]
    prepared = _prepare(tuple(qmap.detach().to("cpu", torch.float32).reshape(-1).tolist()))
    if len(_BY_IDENTITY) >= _CACHED_MAPS:
        _BY_IDENTITY.clear()
    _BY_IDENTITY[id(qmap)] = (weakref.ref(qmap), qmap._version, prepared)
    return prepared
