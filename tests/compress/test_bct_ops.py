"""Each compressed operation against its float counterpart, with an error bound derived from its step sizes."""

import math

import pytest
import torch
from transformers.activations import GELUActivation

from effllm.compress.bct import ActivationSpec, StoredSpec, TableSpec
from effllm.compress.bct.activation_quant import ActivationQuantizer
from effllm.compress.bct.layers import BCTLayerNorm
from effllm.compress.bct.lookup_tables import TableActivation, TableSoftmax
from effllm.compress.bct.packed_tensor import PackedTensor, fit_map

GELU_MAX_SLOPE = 1.13  # max |GELU'(x)| = 1.1289 at x ~ 1.5


def _weights(shape=(48, 100), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("scale_format", ["float32", "float16", "uint8"])
def test_packed_tensor_error_bound_and_bytes(bits, scale_format):
    w = _weights()  # 4800 elements: not a multiple of the block size 64
    packed = PackedTensor.from_float(w, StoredSpec(bits, 64, "linear", scale_format))
    blocks = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % 64)).view(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    half_step = absmax / (2 ** (bits - 1) - 1) / 2
    # a decoded scale may be off by the 8-bit scale code's relative error (< 1%) stretching every level
    slack = 1.01 if scale_format == "uint8" else 1.0 + 1e-3
    error = (packed.dequantize().reshape(-1) - w.reshape(-1)).abs()
    bound = (half_step * slack + absmax * (slack - 1)).expand(-1, 64).reshape(-1)[: w.numel()]
    assert torch.all(error <= bound + 1e-7)
    code_bytes = math.ceil(w.numel() * bits / 8)
    scale_bytes = {"float32": 4, "float16": 2, "uint8": 1}[scale_format] * 75 + (4 if scale_format == "uint8" else 0)
    assert packed.nbytes() == code_bytes + scale_bytes


def test_gather_rows_equals_rows_of_the_decoded_tensor():
    w = _weights((37, 24))  # rows straddle blocks of 64
    for bits in (8, 4, 3):
        packed = PackedTensor.from_float(w, StoredSpec(bits, 64, "linear", "float16"))
        ids = torch.tensor([[0, 36, 5], [5, 17, 2]])
        assert torch.equal(packed.gather_rows(ids), packed.dequantize()[ids])


def test_fitted_map_and_clip_search_beat_rounding_to_the_linear_grid():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(3))  # bell-shaped like trained weights
    naive = PackedTensor.from_float(w, StoredSpec(4, 256, "linear", "float16"))
    fitted = PackedTensor.from_float(w, StoredSpec(4, 256, "fitted", "uint8", clip_search=True))
    naive_error = (naive.dequantize() - w).square().mean()
    fitted_error = (fitted.dequantize() - w).square().mean()
    assert fitted_error < 0.62 * naive_error
    # the best any 4-bit scalar quantizer does on a unit Gaussian (Lloyd-Max): 0.009497 (Max, 1960)
    assert fitted_error < 1.03 * 0.009497
    assert torch.all(fitted.fitted_map[1:] >= fitted.fitted_map[:-1])


def test_fit_map_recovers_clustered_levels():
    centres = torch.tensor([-0.9, -0.3, 0.2, 0.8])
    values = centres.repeat_interleave(1000) + torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 1e-3
    assert torch.allclose(fit_map(values, 4), centres, atol=2e-3)


@pytest.mark.parametrize("width", [64, 100, 1])
def test_activation_quantizer_half_step_per_block_and_idempotent(width):
    x = torch.randn(5, 3, width) * 4
    quant = ActivationQuantizer(ActivationSpec(8, 32, "linear"))
    y = quant(x)
    padded = torch.nn.functional.pad(x, (0, -width % 32)).view(5, 3, -1, 32)
    half_step = (padded.abs().amax(-1, keepdim=True) / 127 / 2).expand_as(padded).reshape(5, 3, -1)[..., :width]
    assert torch.all((y - x).abs() <= half_step * (1 + 1e-5) + 1e-7)
    assert torch.equal(quant(y), y)  # already on the grid: quantized data passes unchanged
    assert torch.equal(ActivationQuantizer(ActivationSpec(None))(x), x)


@pytest.mark.parametrize("bits", [8, 6])
def test_table_gelu_within_slope_times_half_step(bits):
    spec = TableSpec(bits, 6.0)
    gelu = TableActivation(GELUActivation(), spec)
    x = torch.linspace(-12, 12, 20001)
    error = (gelu(x) - torch.nn.functional.gelu(x)).abs()
    assert error.max() <= GELU_MAX_SLOPE * gelu.step / 2 + 1e-5
    # beyond the table GELU continues as x (right) and 0 (left)
    assert torch.allclose(gelu(torch.tensor([50.0, -50.0])), torch.tensor([50.0, 0.0]), atol=1e-3)


def test_table_tanh_saturates_beyond_the_table():
    tanh = TableActivation(torch.nn.Tanh(), TableSpec(8, 4.0))
    x = torch.linspace(-20, 20, 4001)
    assert (tanh(x) - torch.tanh(x)).abs().max() <= tanh.step / 2 + 1e-3  # tanh(4) is 1 - 7e-4


@pytest.mark.parametrize("bits, reach", [(8, 12.0), (6, 8.0)])
def test_table_softmax_relative_error_bound(bits, reach):
    scores = torch.randn(4, 2, 7, 33, generator=torch.Generator().manual_seed(0)) * 3
    softmax = TableSoftmax(TableSpec(bits, reach))
    p, ref = softmax(scores), torch.softmax(scores, -1)
    rel = math.exp(softmax.step / 2) - 1  # one exp rounded by at most half a grid step
    dropped = scores.shape[-1] * math.exp(-reach)  # mass of terms below the table, read as 0
    assert torch.all((p - ref).abs() <= ref * (2 * rel + rel * rel) / (1 - rel) + dropped + 1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(4, 2, 7))


def test_table_softmax_masked_positions_are_exactly_zero():
    scores = torch.randn(2, 5)
    mask = torch.tensor([[0.0] * 5, [0.0, 0.0, 0.0, torch.finfo(torch.float32).min, torch.finfo(torch.float32).min]])
    p = TableSoftmax(TableSpec(8, 12.0))(scores + mask)
    assert torch.all(p[1, 3:] == 0) and torch.allclose(p.sum(-1), torch.ones(2))


def test_layernorm_on_quantized_input_within_derived_bound():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(6, 64) * 3 + 1
    act = ActivationSpec(8, 64, "linear")
    bct = BCTLayerNorm(norm, StoredSpec(None), act, act)
    y, ref = bct(x), norm(x).detach()
    sigma = x.var(-1, unbiased=False, keepdim=True).sqrt()
    in_err = x.abs().amax(-1, keepdim=True) / 127 / 2  # residual-stream half step
    normalized_max = ((x - x.mean(-1, keepdim=True)) / sigma).abs().amax(-1, keepdim=True)
    # first order: a shift d of the input moves (x - mean)/sigma by at most |d|/sigma * (2 + max|x_hat|)
    ln_err = norm.weight.abs().max() * in_err / sigma * (2 + normalized_max)
    out_err = y.abs().amax(-1, keepdim=True) / 127 / 2
    assert torch.all((y - ref).abs() <= ln_err * 1.05 + out_err + 1e-6)
