"""Blockwise requantization: every backend equals the reference bit for bit, and the reference meets its oracles.

Results are compared for exact equality in every dtype: the work is one IEEE division, comparisons against the
map's fp32 midpoints, one fp32 product and one cast (rounded to nearest even), which every backend reproduces.
"""

from __future__ import annotations

import pytest
import torch
from effllm.kernels.blockwise import dequantize_blockwise_ref, num_blocks, quantize_blockwise_ref
from effllm.kernels.quant_maps import make_map
from effllm.kernels.requantize import requantize_blockwise, requantize_blockwise_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = [2, 3, 4, 8]
# Shapes: one value, one row below one block, widths that are not a multiple of the block (67, 130), a flat
# tensor of 4097 elements, leading dimensions, and rows of exactly one block.
SHAPES = [(1,), (1, 5), (3, 67), (4097,), (2, 3, 130), (4, 64)]
# SQNR (dB) of the reference on 256 x 384 standard normal values, blocks of 64 (and of 67: not dividing the width,
# so each row ends in a short block), measured: linear 2/3/4/8 bits 2.87/12.0/19.4/44.5, dynamic 4/8 bits
# 17.1/40.4, the same to 0.02 dB with blocks of 67. Floors sit a little below, so any change that costs precision
# fails.
SQNR_FLOOR_DB = {("linear", 2): 2.6, ("linear", 3): 11.7, ("linear", 4): 19.0, ("linear", 8): 44.0,
                 ("dynamic", 4): 16.8, ("dynamic", 8): 40.0}
# Blocks longer than the Triton kernel's largest tile (4096) are walked in tiles.
LONG_BLOCK = 5000


def _data(shape, dtype=torch.float32, device="cpu", seed=0, signed=True) -> torch.Tensor:
    """Normal values whose scale changes over four decades along the last dimension: blocks differ in absmax."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.logspace(-2, 2, shape[-1])
    return (x if signed else x.abs()).to(device=device, dtype=dtype)


def _assert_equals_reference(x, qmap, blocksize):
    out = requantize_blockwise(x, qmap, blocksize)
    ref = requantize_blockwise_ref(x, qmap, blocksize)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(out, ref), f"{int((out != ref).sum())} of {out.numel()} values differ from the reference"
    return out


# --- every backend against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_matches_reference(backend, shape, blocksize, bits):
    _, device = backend
    _assert_equals_reference(_data(shape, device=device), make_map("linear", True, bits, device), blocksize)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5), (3, 67), (4097,)], ids=str)
def test_backend_matches_reference_in_each_dtype(backend, shape, dtype):
    _, device = backend
    for kind, bits in [("linear", 8), ("dynamic", 4)]:
        _assert_equals_reference(_data(shape, dtype, device), make_map(kind, True, bits, device), 64)


@pytest.mark.parametrize("kind,signed,bits", [("dynamic", True, 8), ("dynamic", False, 8), ("linear", False, 4),
                                              ("linear_nozero", False, 4)])
def test_backend_matches_reference_for_other_maps(backend, kind, signed, bits):
    _, device = backend
    _assert_equals_reference(_data((5, 130), device=device, signed=signed), make_map(kind, signed, bits, device), 64)


@pytest.mark.parametrize("blocksize,shape", [(1, (3, 5)), (2, (2, 9)), (100, (3, 250)), (LONG_BLOCK, (2, 9001))])
def test_backend_matches_reference_for_unusual_blocksizes(backend, blocksize, shape):
    """Blocks of one and two values, blocks that are not a power of two, and blocks longer than one kernel tile."""
    _, device = backend
    _assert_equals_reference(_data(shape, device=device), make_map("linear", True, 8, device), blocksize)


def test_backend_handles_strided_zero_and_empty_inputs(backend):
    _, device = backend
    qmap = make_map("linear", True, 8, device)
    wide = _data((70, 12), device=device)
    _assert_equals_reference(wide.T, qmap, 64)  # rows 70 apart in memory, one short block each
    zeros = _data((4, 200), device=device)
    zeros[1] = 0  # a whole row of zero blocks
    zeros[2, 64:128] = 0  # one zero block inside a row
    out = _assert_equals_reference(zeros, make_map("linear_nozero", False, 4, device), 64)  # a map without 0
    assert torch.all(out[1] == 0) and torch.all(out[2, 64:128] == 0)
    assert requantize_blockwise(torch.empty(0, 64, device=device), qmap, 64).shape == (0, 64)
    assert requantize_blockwise(torch.empty(3, 0, device=device), qmap, 64).shape == (3, 0)


def test_backend_output_is_detached(backend):
    _, device = backend
    x = _data((2, 67), device=device).requires_grad_()
    out = requantize_blockwise(x, make_map("linear", True, 8, device), 64)
    assert not out.requires_grad


def test_invalid_arguments_raise(backend):
    _, device = backend
    x = _data((2, 10), device=device)
    with pytest.raises(ValueError, match="blocksize"):
        requantize_blockwise(x, make_map("linear", True, 8, device), 0)
    with pytest.raises(ValueError, match="map"):
        requantize_blockwise(x, torch.linspace(-1, 1, 512, device=device), 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference_at_model_sizes(dtype):
    """Activations of a real model ([tokens, hidden] and [batch, heads, tokens, tokens]) on the GPU."""
    for shape in [(512, 4096), (2, 12, 197, 197)]:
        x = _data(shape, dtype, "cuda")
        _assert_equals_reference(x, make_map("linear", True, 8, "cuda"), 64)


# --- the reference against independent oracles ------------------------------------------------------------


def _sqnr_db(x: torch.Tensor, approx: torch.Tensor) -> float:
    x, approx = x.double(), approx.double()
    return float(10 * torch.log10(x.pow(2).sum() / (x - approx).pow(2).sum()))


@pytest.mark.parametrize("blocksize", [64, 67])
@pytest.mark.parametrize("kind,bits", list(SQNR_FLOOR_DB))
def test_reference_sqnr_floor(kind, bits, blocksize):
    x = torch.randn(256, 384, generator=torch.Generator().manual_seed(0))
    out = requantize_blockwise_ref(x, make_map(kind, True, bits), blocksize)
    assert _sqnr_db(x, out) >= SQNR_FLOOR_DB[(kind, bits)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_is_the_cores_quantize_then_dequantize_on_zero_padded_rows(shape, bits, dtype):
    """What BCT's activation quantizer computed before this kernel, written out with the core's references."""
    blocksize = 64
    x = _data(shape, dtype, seed=bits)
    qmap = make_map("linear", True, bits)
    width = shape[-1]
    rows = x.reshape(-1, width).float()
    padded = torch.nn.functional.pad(rows, (0, num_blocks(width, blocksize) * blocksize - width))
    codes, absmax = quantize_blockwise_ref(padded, qmap, blocksize)
    expected = dequantize_blockwise_ref(codes, absmax, qmap, blocksize).view(padded.shape)[:, :width]
    assert torch.equal(requantize_blockwise_ref(x, qmap, blocksize), expected.reshape(shape).to(dtype))


def test_reference_blocks_never_straddle_rows():
    """Scaling one row changes no other row's result (its blocks are its own), and each row is what it would be
    alone; a flat tensor of the same values would have blocks crossing the row boundaries."""
    qmap = make_map("linear", True, 4)
    x = _data((3, 67), seed=5)
    louder = x.clone()
    louder[1] *= 1000
    out, out_louder = requantize_blockwise_ref(x, qmap, 64), requantize_blockwise_ref(louder, qmap, 64)
    assert torch.equal(out[[0, 2]], out_louder[[0, 2]])
    for row in range(3):
        assert torch.equal(out[row], requantize_blockwise_ref(x[row], qmap, 64))
    assert not torch.equal(out.reshape(-1), requantize_blockwise_ref(x.reshape(-1), qmap, 64))
