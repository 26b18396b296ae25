"""Triton kernel for blockwise requantization (the spec is ``requantize.requantize_blockwise_ref``).

Imported lazily by ``requantize``: importing effllm never imports Triton. On CPU tensors it runs under the
interpreter (``TRITON_INTERPRET=1``).

One pass: each program takes ``ROWS`` blocks (blocks are numbered row by row, ``blocks_per_row`` to a row, so
none straddles two rows), loads them, takes each block's absmax, finds every value's nearest map entry with the
same IEEE division and fp32 midpoints as the quantize kernel (``_blockwise_triton.map_code``: computed for the
dynamic and unsigned linear maps, searched for others), decodes
``qmap[code] * absmax`` and stores it in ``x``'s dtype. Codes never reach memory. The result equals the
reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blockwise_triton import (
    map_code,
    map_code_constexprs,
    num_warps_for,
    on_device,
    rows_for,
    tile_for,
    to_storage_dtype,
)
from .blockwise import _check, num_blocks
from .quant_maps import map_midpoints
from .requantize import rows_of


@triton.jit
def _requantize_blockwise_kernel(
    x_ptr,  # [rows, width] any float dtype, rows stride_x apart, unit stride along a row
    out_ptr,  # [rows, width] x's dtype, contiguous
    qmap_ptr,  # [map size] fp32 sorted map
    mid_ptr,  # [n_mid] fp32 midpoints of the map
    n_mid,
    rows,
    width,
    blocks_per_row,
    blocksize,
    span,  # elements of a block that can lie in a row: min(blocksize, width)
    stride_x,
    ROWS: tl.constexpr,  # blocks per program
    TILE: tl.constexpr,  # power of two >= span, or MAX_TILE for longer blocks
    ONE_TILE: tl.constexpr,  # span <= TILE: a block stays in registers between absmax and coding
    SEARCH_STEPS: tl.constexpr,
    COMPUTED: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr,  # codes computed: the map's kind, or 0
):
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] blocks, numbered row by row
    row = block // blocks_per_row  # [ROWS]
    col_start = (block % blocks_per_row) * blocksize  # [ROWS] first column of each block
    block_ok = (row < rows)[:, None]  # [ROWS, 1]
    x_row = x_ptr + row[:, None] * stride_x  # [ROWS, 1]
    out_row = out_ptr + row[:, None] * width  # [ROWS, 1]
    lanes = tl.arange(0, TILE)[None, :]  # [1, TILE]

    if ONE_TILE:
        col = col_start[:, None] + lanes  # [ROWS, TILE]
        mask = block_ok & (lanes < span) & (col < width)  # past the row's end reads as zero padding
        x = tl.load(x_row + col, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)[:, None]  # [ROWS, 1]
        scale = tl.where(absmax > 0, absmax, 1.0)  # an all-zero block divides by 1 (and decodes to 0)
        code = map_code(tl.math.div_rn(x, scale), mid_ptr, n_mid, BITS, SEARCH_STEPS, COMPUTED, SIGNED)
        value = tl.load(qmap_ptr + code, mask=mask, other=0.0) * absmax
        tl.store(out_row + col, to_storage_dtype(value, out_ptr.dtype.element_ty), mask=mask)
    else:
        # Blocks longer than one tile: absmax over the tiles first, then a second walk codes and decodes.
        running_max = tl.zeros([ROWS, TILE], dtype=tl.float32)
        for tile_start in range(0, span, TILE):
            in_block = tile_start + lanes
            col = col_start[:, None] + in_block
            mask = block_ok & (in_block < span) & (col < width)
            x = tl.load(x_row + col, mask=mask, other=0.0).to(tl.float32)
            running_max = tl.maximum(running_max, tl.abs(x))
        absmax = tl.max(running_max, axis=1)[:, None]  # [ROWS, 1]
        scale = tl.where(absmax > 0, absmax, 1.0)
        for tile_start in range(0, span, TILE):
            in_block = tile_start + lanes
            col = col_start[:, None] + in_block
            mask = block_ok & (in_block < span) & (col < width)
            x = tl.load(x_row + col, mask=mask, other=0.0).to(tl.float32)
            code = map_code(tl.math.div_rn(x, scale), mid_ptr, n_mid, BITS, SEARCH_STEPS, COMPUTED, SIGNED)
            value = tl.load(qmap_ptr + code, mask=mask, other=0.0) * absmax
            tl.store(out_row + col, to_storage_dtype(value, out_ptr.dtype.element_ty), mask=mask)


def requantize_blockwise_triton(x: torch.Tensor, qmap: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` in blocks of ``blocksize`` along its last dimension; same shape and dtype."""
    _check(x, qmap, blocksize)
    rows = rows_of(x)  # [R, W]
    if rows.numel() and rows.stride(-1) != 1:
        rows = rows.contiguous()
    n_rows, width = rows.shape
    out = torch.empty(n_rows, width, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out.view(x.shape)
    table = qmap.to(device=x.device, dtype=torch.float32).contiguous()
    midpoints = map_midpoints(table).contiguous()
    blocks_per_row = num_blocks(width, blocksize)
    span = min(blocksize, width)  # a row narrower than a block is one short block: no lanes beyond it
    tile = tile_for(span)
    blocks_per_program = rows_for(tile)
    grid = (triton.cdiv(n_rows * blocks_per_row, blocks_per_program),)
    with on_device(x.device):
        _requantize_blockwise_kernel[grid](
            rows, out, table, midpoints, midpoints.numel(), n_rows, width, blocks_per_row, blocksize, span,
            rows.stride(0), ROWS=blocks_per_program, TILE=tile, ONE_TILE=span <= tile,
            **map_code_constexprs(qmap, x.device), num_warps=num_warps_for(blocks_per_program * tile),
        )
    return out.view(x.shape)
