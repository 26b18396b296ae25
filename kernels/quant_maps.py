"""Quantization maps: sorted tables of the values a code can stand for, normalised to [-1, 1].

A blockwise quantizer divides each block by its absolute maximum and stores, for every value, the index of
the nearest entry of one of these maps. Maps are plain 1-D float32 tensors of ``2**bits`` sorted entries.
"""

from __future__ import annotations

import functools

import torch

# Decimal exponents of the dynamic map, as in "8-bit Optimizers via Block-wise Quantization":
# the largest decade is [0.1, 1], each smaller one a factor of 10 below it.
_DECADE_LOW = 0.1


@functools.cache
def _dynamic_map_cpu(signed: bool, bits: int) -> torch.Tensor:
    exponent_levels = bits - 1  # one decade per non-sign bit
    values = [0.0, 1.0]
    for level in range(exponent_levels):
        # Decade ``level`` spans [0.1, 1] * 10**(level - exponent_levels + 1), split into equal linear bins;
        # larger decades get more bins (the "tree": one indicator bit moves between exponent and fraction).
        bins = 2**level if signed else 2 ** (level + 1)
        scale = 10.0 ** (level - exponent_levels + 1)
        width = (1.0 - _DECADE_LOW) / bins
        for k in range(bins):
            center = scale * (_DECADE_LOW + (k + 0.5) * width)
            values.append(center)
            if signed:
                values.append(-center)
    table = torch.tensor(sorted(values), dtype=torch.float32)
    assert table.numel() == 2**bits, (signed, bits, table.numel())
    return table


def dynamic_map(signed: bool = True, bits: int = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """The dynamic (tree) quantization map: sign, decimal exponent and linear fraction.

    Signed maps hold 0, +1 and ``2**bits - 2`` values symmetric around 0 (no -1); unsigned maps hold
    0, 1 and ``2**bits - 2`` positive values. The entries of bitsandbytes' ``create_dynamic_map``, each to within
    two float32 ulps (bitsandbytes rounds to float32 midway, so some entries differ in the last bits).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"dynamic map bits must be in 2..8, got {bits}")
    # copy=True: callers get their own tensor, never the cached one (writing into it would corrupt the cache)
    return _dynamic_map_cpu(bool(signed), int(bits)).to(device or "cpu", copy=True)


@functools.cache
def _linear_map_cpu(signed: bool, bits: int, include_zero: bool) -> torch.Tensor:
    levels = 2**bits
    if signed:
        # Symmetric integer grid k / (2**(bits-1) - 1); the spare code repeats -1 so the map stays symmetric.
        top = 2 ** (bits - 1) - 1
        table = torch.arange(-top, top + 1, dtype=torch.float32) / top
        table = torch.cat([table[:1], table])
    elif include_zero:
        table = torch.arange(levels, dtype=torch.float32) / (levels - 1)
    else:
        # Zero-free grid (k + 1) / 2**bits: for second moments, where a zero code would blow up 1/sqrt(v)
        # ("Memory Efficient Optimizers with 4-bit States", Li et al.).
        table = (torch.arange(levels, dtype=torch.float32) + 1) / levels
    return table


def linear_map(
    signed: bool = True, bits: int = 8, include_zero: bool = True, device: torch.device | str | None = None
) -> torch.Tensor:
    """An evenly spaced map (integer quantization)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"linear map bits must be in 1..8, got {bits}")
    if signed and not include_zero:
        raise ValueError("a signed linear map always includes zero")
    return _linear_map_cpu(bool(signed), int(bits), bool(include_zero)).to(device or "cpu", copy=True)


MAP_KINDS = ("dynamic", "linear", "linear_nozero")


def make_map(kind: str, signed: bool, bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A map by name: ``dynamic``, ``linear`` or ``linear_nozero`` (unsigned only)."""
    if kind == "dynamic":
        return dynamic_map(signed, bits, device)
    if kind == "linear":
        return linear_map(signed, bits, True, device)
    if kind == "linear_nozero":
        return linear_map(False, bits, False, device)
    raise ValueError(f"unknown map kind {kind!r}; use one of {', '.join(MAP_KINDS)}")


def map_midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between neighbouring map entries (``len(qmap) - 1`` of them)."""
    return (qmap[1:] + qmap[:-1]) * 0.5
