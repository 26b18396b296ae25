"""Triton kernels for blockwise quantize / dequantize (the spec is ``blockwise.quantize_blockwise_ref``).

Imported lazily by ``blockwise`` (and by ``_optim_update_triton``, which shares ``nearest_code``): importing
effllm never imports Triton. On CPU tensors these kernels run under the interpreter (``TRITON_INTERPRET=1``).

Exactness: the normalisation uses IEEE division (``div_rn``; Triton's ``/`` on fp32 is approximate on
NVIDIA GPUs) and the nearest code is found by comparing against the same fp32 midpoints the reference
uses, so codes equal the reference's bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._dynamic_codes_triton import dynamic_encode
from .blockwise import _check, num_blocks
from .dynamic_codes import SEARCHED, DynamicCodes
from .quant_maps import map_midpoints

# Largest tile one program holds in registers; longer blocks are walked in tiles of this size.
MAX_TILE = 4096
# Elements one program works on: small blocks are grouped, several to a program.
ELEMENTS_PER_PROGRAM = 2048
# Elements per program when dequantizing (an elementwise op: the block size does not matter).
DEQUANT_TILE = 1024
# The bits torch writes for a bf16 NaN.
BF16_QUIET_NAN: tl.constexpr = tl.constexpr(0x7FC0)


def search_steps(map_size: int) -> int:
    """Halving steps of the binary search over ``map_size - 1`` midpoints (8 for a 256-entry map)."""
    return max(0, map_size - 1).bit_length()


def num_warps_for(tile: int) -> int:
    """Enough warps that each thread holds a handful of elements of a ``tile``-element program."""
    elements_per_warp = 128
    return max(1, min(8, tile // elements_per_warp))


@triton.jit
def nearest_code(x, mid_ptr, n_mid, SEARCH_STEPS: tl.constexpr):
    """Index of the nearest map entry of each ``x``: the number of midpoints strictly below it
    (``torch.bucketize(x, midpoints, right=False)``, so a value exactly halfway takes the lower code).

    Branchless binary search over the sorted midpoints; probes past ``n_mid`` read as +inf, as if the
    table were padded to ``2**SEARCH_STEPS - 1`` entries. Returns int32, same shape as ``x``.
    """
    code = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(SEARCH_STEPS):
        stride = 1 << (SEARCH_STEPS - 1 - i)
        probe = code + (stride - 1)
        boundary = tl.load(mid_ptr + probe, mask=probe < n_mid, other=float("inf"))
        code = tl.where(boundary < x, code + stride, code)
    return code


def map_code_constexprs(qmap: torch.Tensor, device: torch.device) -> dict:
    """``map_code``'s compile-time arguments for ``qmap``: SEARCH_STEPS, COMPUTED (the map's kind where its codes
    are computed, else ``SEARCHED``), and the computed map's BITS and SIGNED. Every verified dynamic or unsigned
    linear map is computed, the 4-bit ones too, although their 16 entries fit in one cache line: the GPU update is
    bound by instruction issue, and a computed 4-bit code takes fewer instructions than the search's 4 dependent
    steps (4-bit Adam compiled for sm_90: 284 -> 242.5 instructions per element)."""
    codes = DynamicCodes.for_map(qmap, device)
    return dict(SEARCH_STEPS=search_steps(qmap.numel()), COMPUTED=codes.kind if codes is not None else SEARCHED,
                BITS=codes.bits if codes is not None else 0, SIGNED=codes is not None and codes.signed)


@triton.jit
def map_code(x, mid_ptr, n_mid,
             BITS: tl.constexpr, SEARCH_STEPS: tl.constexpr, COMPUTED: tl.constexpr, SIGNED: tl.constexpr):
    """The nearest map entry of each normalised value: computed for a verified dynamic or linear map
    (``COMPUTED``, the map's kind in ``dynamic_codes``; see ``map_code_constexprs``), else searched
    for (``COMPUTED`` 0)."""
    if COMPUTED:
        return dynamic_encode(x, mid_ptr, BITS, SIGNED, COMPUTED)
    else:
        return nearest_code(x, mid_ptr, n_mid, SEARCH_STEPS)


@triton.jit
def to_storage_dtype(x, DTYPE: tl.constexpr):
    """fp32 ``x`` cast to ``DTYPE``, rounding to nearest even like torch.

    bf16 is rounded by hand on the bits: the interpreter's fp32->bf16 cast truncates, and the same code on
    GPUs gives the same answer as the native conversion, so one path is tested everywhere.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        lowest_kept_bit = (bits >> 16) & 1
        rounded = (bits + 0x7FFF + lowest_kept_bit) >> 16
        rounded = tl.where(x != x, BF16_QUIET_NAN, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _quantize_blockwise_kernel(
    x_ptr,  # [numel] any float dtype
    codes_ptr,  # [numel] uint8
    absmax_ptr,  # [nblocks] fp32
    mid_ptr,  # [n_mid] fp32 sorted midpoints of the map
    n_mid,
    numel,
    nblocks,
    blocksize,
    ROWS: tl.constexpr,  # blocks per program
    TILE: tl.constexpr,  # power of two >= blocksize, or MAX_TILE for longer blocks
    SEARCH_STEPS: tl.constexpr,
    COMPUTED: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr,  # codes computed: the map's kind, or 0
):
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_start = block[:, None] * blocksize  # [ROWS, 1]
    lanes = tl.arange(0, TILE)[None, :]  # [1, TILE]

    # Pass 1: each block's absolute maximum (one tile unless blocksize > MAX_TILE).
    running_max = tl.zeros([ROWS, TILE], dtype=tl.float32)
    for tile_start in range(0, blocksize, TILE):
        in_block = tile_start + lanes
        offs = row_start + in_block  # [ROWS, TILE]
        mask = (in_block < blocksize) & (offs < numel)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        running_max = tl.maximum(running_max, tl.abs(x))
    absmax = tl.max(running_max, axis=1)  # [ROWS]
    scale = tl.where(absmax > 0, absmax, 1.0)[:, None]  # [ROWS, 1]; an all-zero block divides by 1

    # Pass 2: normalise and find each value's nearest map entry.
    for tile_start in range(0, blocksize, TILE):
        in_block = tile_start + lanes
        offs = row_start + in_block
        mask = (in_block < blocksize) & (offs < numel)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        code = map_code(tl.math.div_rn(x, scale), mid_ptr, n_mid, BITS, SEARCH_STEPS, COMPUTED, SIGNED)
        tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + block, absmax, mask=block < nblocks)


@triton.jit
def _dequantize_blockwise_kernel(
    codes_ptr,  # [numel] uint8
    absmax_ptr,  # [nblocks] fp32
    qmap_ptr,  # [map size] fp32
    out_ptr,  # [numel] output dtype
    numel,
    blocksize,
    TILE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)  # [TILE]
    mask = offs < numel
    code = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    value = tl.load(qmap_ptr + code, mask=mask, other=0.0)
    absmax = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0)
    tl.store(out_ptr + offs, to_storage_dtype(value * absmax, out_ptr.dtype.element_ty), mask=mask)


def on_device(device: torch.device):
    """Launch on ``device``'s GPU (Triton launches on the current CUDA device); nothing to do on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def tile_for(blocksize: int) -> int:
    """Power-of-two tile covering one block (masked beyond ``blocksize``), at most ``MAX_TILE``."""
    return min(triton.next_power_of_2(blocksize), MAX_TILE)


def rows_for(tile: int) -> int:
    """Blocks per program: small blocks are grouped so that each program has ~ELEMENTS_PER_PROGRAM."""
    return max(1, ELEMENTS_PER_PROGRAM // tile)


def quantize_blockwise_triton(
    x: torch.Tensor, qmap: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(codes, absmax)``: uint8 codes [numel] and fp32 absmax [nblocks]."""
    _check(x, qmap, blocksize)
    flat = x.reshape(-1).contiguous()
    numel = flat.numel()
    nblocks = num_blocks(numel, blocksize)
    codes = torch.empty(numel, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if nblocks == 0:
        return codes, absmax
    midpoints = map_midpoints(qmap.to(device=x.device, dtype=torch.float32)).contiguous()
    tile = tile_for(blocksize)
    rows = rows_for(tile)
    with on_device(x.device):
        _quantize_blockwise_kernel[(triton.cdiv(nblocks, rows),)](
            flat, codes, absmax, midpoints, midpoints.numel(), numel, nblocks, blocksize,
            ROWS=rows, TILE=tile, **map_code_constexprs(qmap, x.device), num_warps=num_warps_for(rows * tile),
        )
    return codes, absmax


def dequantize_blockwise_triton(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    qmap: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_triton``: a flat tensor of ``codes.numel()`` values of ``dtype``."""
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    flat = codes.reshape(-1).contiguous()
    numel = flat.numel()
    if absmax.numel() < num_blocks(numel, blocksize):
        raise ValueError(f"{absmax.numel()} absmax values cannot cover {numel} codes in blocks of {blocksize}")
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel == 0:
        return out
    table = qmap.to(device=codes.device, dtype=torch.float32).contiguous()
    scales = absmax.to(device=codes.device, dtype=torch.float32).contiguous()
    grid = (triton.cdiv(numel, DEQUANT_TILE),)
    with on_device(codes.device):
        _dequantize_blockwise_kernel[grid](
            flat, scales, table, out, numel, blocksize, TILE=DEQUANT_TILE, num_warps=num_warps_for(DEQUANT_TILE)
        )
    return out
