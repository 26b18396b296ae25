"""Blockwise-packed weight matmul: every backend equals the reference, the reference meets explicit oracles
(BCT's ``PackedTensor`` decoding, a Python loop over the bits), and a compressed BCT model gives the same outputs
on every backend.

Backends sum the same fp32 products in another order than the reference, so results are compared within a bound
proportional to ``|x| @ |W|.T``, the size of the terms being summed; a wrong code, scale, block or layout shows up
orders of magnitude above it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from effllm.kernels.blockwise import num_blocks
from effllm.kernels.blockwise_matmul import blockwise_matmul, blockwise_matmul_ref, decode_blockwise_weight_ref
from effllm.kernels.packing import pack_bits_ref, packed_numel
from effllm.kernels.quant_maps import make_map

from effllm.compress.bct import BCTConfig, StoredSpec, compress, layers
from effllm.compress.bct.packed_tensor import PackedTensor

# Relative rounding of the fp32 sums, against |x| @ |W|.T (as for qmatmul).
FP32_SUM_TOLERANCE = 2e-6
# (bits, blocksize, out_features, in_features): widths 2/3/4/8; blocks shorter than a row and not dividing it
# (7), blocks spanning rows (64 over 61 or 67 columns), blocks longer than the whole weight, 4097 = 17 * 241
# elements, one output, an input narrower than one block. Each runs in both layouts.
WEIGHTS = [
    (4, 64, 48, 128), (4, 7, 17, 241), (4, 1000, 5, 67),
    (3, 64, 67, 61), (3, 7, 9, 67), (3, 64, 1, 67),
    (2, 64, 40, 96), (2, 5, 13, 9), (2, 300, 17, 241),
    (8, 64, 33, 67), (8, 64, 16, 5), (8, 7, 66, 20),
]
LAYOUTS = {"row_major": False, "column_major": True}
# Rows of x: one (decoding), a few, more than a Triton tile.
ROWS = [1, 3, 70]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_packed(bits: int, blocksize: int, out_features: int, in_features: int, seed: int = 0,
                device: str = "cpu"):
    """Random packed weight: codes over the full range, block scales over two decades, the dynamic map (uneven
    levels, so a code read from the wrong bits lands on a visibly different value). Returns (codes stream, scales,
    qmap, unpacked codes in stored order)."""
    generator = torch.Generator().manual_seed(seed)
    numel = out_features * in_features
    codes = torch.randint(0, 2**bits, (numel,), generator=generator, dtype=torch.uint8)
    scales = torch.logspace(-2, 0, num_blocks(numel, blocksize))
    scales = scales[torch.randperm(scales.numel(), generator=generator)]
    qmap = make_map("dynamic", True, bits)
    return pack_bits_ref(codes, bits).to(device), scales.to(device), qmap.to(device), codes


def make_x(shape, seed: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def assert_close_to_reference(out, ref, x, weight, bias, tolerance):
    """|out - ref| <= tolerance * (|x| @ |W|.T + |bias|), elementwise, and the same shape and dtype."""
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    magnitude = x.abs().float().reshape(-1, x.shape[-1]) @ weight.abs().T.to(x.device)
    if bias is not None:
        magnitude = magnitude + bias.abs().float()
    bound = tolerance * magnitude.reshape(ref.shape) + torch.finfo(torch.float32).tiny
    error = (out.float() - ref.float()).abs()
    assert (error <= bound).all(), f"max error {error.max().item():.3g}, worst error/bound {(error / bound).max():.3g}"


def output_tolerance(dtype: torch.dtype) -> float:
    """fp32: the sums' rounding; half dtypes: the weight rounded to that dtype (on GPUs) plus the output rounding."""
    return FP32_SUM_TOLERANCE if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


# --- the reference against explicit oracles ---------------------------------------------------------------


def _packed_spec(bits: int, blocksize: int, layout: str, scale_format: str, qmap_kind: str) -> StoredSpec:
    # min_low_bit_elements=0: keep the asked-for bits even for these small tensors
    return StoredSpec(bits=bits, blocksize=blocksize, map=qmap_kind, scale_format=scale_format, block_layout=layout,
                      min_low_bit_elements=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scale_format,qmap_kind", [("float32", "linear"), ("float16", "dynamic"),
                                                    ("uint8", "fitted")])
def test_reference_equals_packed_tensor_dequantize_then_matmul(layout, bits, scale_format, qmap_kind):
    """BCT's PackedTensor encodes a weight; decoding it and multiplying with torch is what the reference gives."""
    out_features, in_features, blocksize = 17, 67, 64
    weight = make_x((out_features, in_features), seed=bits)
    packed = PackedTensor.from_float(weight, _packed_spec(bits, blocksize, layout, scale_format, qmap_kind))
    assert packed.column_major == LAYOUTS[layout]
    x, bias = make_x((5, in_features), seed=2), make_x((out_features,), seed=3)
    args = (packed.codes, packed.decoded_scales(), packed.qmap, bits, blocksize, out_features, in_features,
            packed.column_major)
    expected = torch.nn.functional.linear(x, packed.dequantize(), bias)
    assert torch.equal(blockwise_matmul_ref(x, *args, bias), expected)
    assert torch.equal(decode_blockwise_weight_ref(*args), packed.dequantize())


def oracle_weight(stream: list[int], bits: int, blocksize: int, scales: list[float], qmap: list[float],
                  out_features: int, in_features: int, column_major: bool) -> list[list[float]]:
    """W[n][k] read code by code from the bytes with Python integers: qmap[code] * scale of its block."""
    weight = []
    for n in range(out_features):
        row = []
        for k in range(in_features):
            element = k * out_features + n if column_major else n * in_features + k
            code = 0
            for b in range(bits):  # bit by bit, little-endian within and across bytes
                bit = element * bits + b
                code |= ((stream[bit // 8] >> (bit % 8)) & 1) << b
            row.append(qmap[code] * scales[element // blocksize])
        weight.append(row)
    return weight


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits,blocksize", [(2, 4), (3, 5), (4, 7), (5, 3), (8, 6)])
def test_reference_matches_a_python_loop_oracle(bits, blocksize, layout):
    out_features, in_features, rows = 5, 7, 3
    column_major = LAYOUTS[layout]
    codes, scales, qmap, _ = make_packed(bits, blocksize, out_features, in_features, seed=bits)
    x, bias = make_x((rows, in_features), seed=bits), make_x((out_features,), seed=10 + bits)
    weight = oracle_weight(codes.tolist(), bits, blocksize, scales.tolist(), qmap.tolist(), out_features,
                           in_features, column_major)
    args = (codes, scales, qmap, bits, blocksize, out_features, in_features, column_major)
    torch.testing.assert_close(decode_blockwise_weight_ref(*args), torch.tensor(weight), rtol=0, atol=0)
    expected = [[sum(x[m, k].item() * weight[n][k] for k in range(in_features)) + bias[n].item()
                 for n in range(out_features)] for m in range(rows)]
    torch.testing.assert_close(blockwise_matmul_ref(x, *args, bias), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_reference_keeps_dtype_and_leading_dims_and_passes_gradients():
    codes, scales, qmap, _ = make_packed(4, 64, 12, 16)
    args = (codes, scales, qmap, 4, 64, 12, 16, True)
    out = blockwise_matmul_ref(make_x((2, 3, 16), dtype=torch.bfloat16), *args)
    assert out.shape == (2, 3, 12) and out.dtype == torch.bfloat16
    x, bias = make_x((3, 16)).requires_grad_(), make_x((12,)).requires_grad_()
    blockwise_matmul_ref(x, *args, bias).sum().backward()
    torch.testing.assert_close(x.grad, decode_blockwise_weight_ref(*args).sum(dim=0).expand(3, 16))
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 3.0))


# --- every backend against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits,blocksize,out_features,in_features", WEIGHTS)
def test_backend_matches_reference(backend, bits, blocksize, out_features, in_features, layout, rows):
    _, device = backend
    codes, scales, qmap, _ = make_packed(bits, blocksize, out_features, in_features, seed=rows, device=device)
    args = (codes, scales, qmap, bits, blocksize, out_features, in_features, LAYOUTS[layout])
    x = make_x((rows, in_features), seed=rows, device=device)
    out = blockwise_matmul(x, *args)
    assert_close_to_reference(out, blockwise_matmul_ref(x, *args), x, decode_blockwise_weight_ref(*args), None,
                              FP32_SUM_TOLERANCE)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 17])
def test_backend_matches_reference_in_each_dtype_with_bias(backend, dtype, rows, layout):
    _, device = backend
    bits, blocksize, out_features, in_features = 4, 64, 40, 67
    codes, scales, qmap, _ = make_packed(bits, blocksize, out_features, in_features, device=device)
    args = (codes, scales, qmap, bits, blocksize, out_features, in_features, LAYOUTS[layout])
    x = make_x((2, rows, in_features), dtype=dtype, device=device)  # leading dims are kept
    bias = make_x((out_features,), seed=7, dtype=dtype, device=device)
    out = blockwise_matmul(x, *args, bias)
    ref = blockwise_matmul_ref(x, *args, bias)
    assert out.shape == (2, rows, out_features)
    assert_close_to_reference(out, ref, x, decode_blockwise_weight_ref(*args), bias, output_tolerance(dtype))


def test_backend_handles_empty_and_strided_inputs(backend):
    _, device = backend
    codes, scales, qmap, _ = make_packed(3, 7, 24, 32, device=device)
    args = (codes, scales, qmap, 3, 7, 24, 32, False)
    assert blockwise_matmul(make_x((0, 32), device=device), *args).shape == (0, 24)
    strided = make_x((5, 64), device=device)[:, ::2]  # every other column: not contiguous
    out = blockwise_matmul(strided, *args)
    ref = blockwise_matmul_ref(strided.contiguous(), *args)
    assert_close_to_reference(out, ref, strided, decode_blockwise_weight_ref(*args), None, FP32_SUM_TOLERANCE)


def test_backend_passes_gradients_through_the_reference(backend):
    _, device = backend
    codes, scales, qmap, _ = make_packed(4, 16, 8, 32, device=device)
    args = (codes, scales, qmap, 4, 16, 8, 32, True)
    bias = make_x((8,), device=device).requires_grad_()
    x = make_x((3, 32), device=device).requires_grad_()
    blockwise_matmul(x, *args, bias).sum().backward()
    torch.testing.assert_close(x.grad, decode_blockwise_weight_ref(*args).sum(dim=0).expand(3, 32))
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 3.0))


def test_inconsistent_arguments_are_refused(backend):
    _, device = backend
    codes, scales, qmap, _ = make_packed(4, 8, 6, 16, device=device)
    x = make_x((2, 16), device=device)
    with pytest.raises(ValueError, match="codes must hold"):
        blockwise_matmul(x, codes[: packed_numel(6 * 16, 4) - 1], scales, qmap, 4, 8, 6, 16, False)
    with pytest.raises(ValueError, match="scales cannot cover"):
        blockwise_matmul(x, codes, scales[:-1], qmap, 4, 8, 6, 16, False)
    with pytest.raises(ValueError, match="map of 16 entries"):
        blockwise_matmul(x, codes, scales, qmap[:8], 4, 8, 6, 16, False)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        blockwise_matmul(x, codes, scales, qmap, 9, 8, 6, 16, False)
    with pytest.raises(ValueError, match="blocksize"):
        blockwise_matmul(x, codes, scales, qmap, 4, 0, 6, 16, False)
    with pytest.raises(ValueError, match="features"):
        blockwise_matmul(make_x((2, 15), device=device), codes, scales, qmap, 4, 8, 6, 16, False)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference_at_model_sizes(dtype, layout):
    """A [1536, 576] 4-bit weight in blocks of 256 (SmolLM2's MLP) against prefill and decode rows."""
    bits, blocksize, out_features, in_features = 4, 256, 1536, 576
    codes, scales, qmap, _ = make_packed(bits, blocksize, out_features, in_features, device="cuda")
    args = (codes, scales, qmap, bits, blocksize, out_features, in_features, LAYOUTS[layout])
    bias = make_x((out_features,), seed=7, dtype=dtype, device="cuda")
    for rows in (1, 300):
        x = make_x((rows, in_features), dtype=dtype, device="cuda")
        out, ref = blockwise_matmul(x, *args, bias), blockwise_matmul_ref(x, *args, bias)
        assert_close_to_reference(out, ref, x, decode_blockwise_weight_ref(*args), bias, output_tolerance(dtype))


# --- a compressed BCT model on every backend --------------------------------------------------------------


def _tiny_tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


# Float activations: the model's outputs differ between backends only by the sums' rounding. 4-bit weights give
# fitted maps, uint8 scales, blocks of 256 spanning rows and a column-major embedding read by the tied head.
FLOAT_ACTIVATIONS = BCTConfig.uniform(4, None)
# Quantized activations too: a matmul result within fp32 rounding of a midpoint of the 8-bit activation grid may
# round to the neighbouring level on one backend and not the other. Moving one value of one linear's output by a
# level moves this model's logits by up to 1.0e-2 of their largest magnitude (measured for each linear, at the
# value where a level is widest); no flip occurred under the interpreter (the backends agreed to 1.2e-7); the
# bound allows two.
QUANTIZED_ACTIVATIONS = BCTConfig.uniform(4, 8)
# Largest logit difference, relative to the largest logit, allowed with float activations: fp32 rounding through
# two decoder layers (measured 1.9e-7 under the interpreter).
FLOAT_LOGITS_TOLERANCE = 1e-5
QUANTIZED_LOGITS_TOLERANCE = 2e-2


@pytest.mark.parametrize("config,tolerance", [(FLOAT_ACTIVATIONS, FLOAT_LOGITS_TOLERANCE),
                                              (QUANTIZED_ACTIVATIONS, QUANTIZED_LOGITS_TOLERANCE)],
                         ids=["float-activations", "quantized-activations"])
def test_compressed_model_gives_the_same_outputs_on_every_backend(backend, monkeypatch, config, tolerance):
    name, device = backend
    monkeypatch.setenv("EFFLLM_KERNEL", "torch")
    model = compress(_tiny_tied_llama(), config)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    monkeypatch.setenv("EFFLLM_KERNEL", name)
    calls = []
    monkeypatch.setattr(layers, "blockwise_matmul", lambda *args: calls.append(args) or blockwise_matmul(*args))
    on_backend = copy.deepcopy(model).to(device)
    with torch.no_grad():
        logits = on_backend(ids.to(device)).logits.cpu()
    # the Triton backend runs every linear (the tied head's column-major weight too) through blockwise_matmul
    packed_linears = [m for m in on_backend.modules() if isinstance(m, layers.BCTLinear)]
    assert len(calls) == (len(packed_linears) if name == "triton" else 0)
    assert any(args[8] for args in calls) == (name == "triton")  # column_major
    assert (logits - expected).abs().max() <= tolerance * expected.abs().max()
