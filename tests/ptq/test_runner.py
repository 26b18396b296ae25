import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from effllm.ptq.rtn import RTN
from effllm.ptq.runner import quantize_blocks, window_starts
from effllm.quant.quant_linear import QuantLinear
from effllm.quant.weight_quant import WeightQuantSpec, fake_quant_weight


def test_rtn_through_runner_equals_direct_rounding(tiny_llama, calib_ids):
    spec = WeightQuantSpec(4, 16)
    expected = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for module in expected.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quant_weight(module.weight, spec))
    reports = quantize_blocks(tiny_llama, calib_ids, spec, RTN(), progress=False)
    assert [r.first_block for r in reports] == [0, 1, 2]
    assert all(r.loss > 0 for r in reports)
    linears = [m for m in tiny_llama.model.layers.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 3 * 7 and not any(isinstance(m, torch.nn.Linear) for m in tiny_llama.model.layers.modules())
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(calib_ids).logits, expected(calib_ids).logits)


def test_window_starts_cover_every_block_with_overlap():
    assert window_starts(30, 1, 0) == list(range(30))
    starts = window_starts(30, 4, 2)
    assert starts[0] == 0 and starts[-1] + 4 == 30 and all(b - a == 2 for a, b in zip(starts, starts[1:]))
    assert window_starts(5, 2, 0) == [0, 2, 3]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(5, 2, 2)


def test_unsupported_architecture_is_named(calib_ids):
    class Unknown(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="'Unknown' is not supported"):
        quantize_blocks(Unknown(), calib_ids, WeightQuantSpec(4), RTN(), progress=False)


def test_gpt2_layout_quantizes():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    # GPT-2's Conv1D layers are converted to nn.Linear and quantized like any other.
    quantize_blocks(model, ids, WeightQuantSpec(8), RTN(), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.transformer.h.modules()) == 2 * 4
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0.05, rtol=0)
