import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import effllm
from effllm.ptq.rtn import RTN
from effllm.ptq.runner import quantize_blocks
from effllm.quant.quant_linear import QuantLinear
from effllm.quant.serialization import save_quantized
from effllm.quant.weight_quant import WeightQuantSpec


def quantized_tiny_llama(bits=3, group=16):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    quantize_blocks(model, torch.randint(0, 64, (4, 16)), WeightQuantSpec(bits, group), RTN(), progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    return model, dict(bits=bits, group_size=group, symmetric=False, act_bits=None, modules=names, method="rtn")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_save_load_identical_logits(tmp_path, bits):
    model, qconfig = quantized_tiny_llama(bits)
    out = save_quantized(model, tmp_path / "q", qconfig)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "effllm" and saved["bits"] == bits
    loaded = effllm.load(out)
    ids = torch.randint(0, 64, (2, 12))
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape[1] >= 5


def test_plain_transformers_loads_after_import(tmp_path):
    model, qconfig = quantized_tiny_llama()
    out = save_quantized(model, tmp_path / "q", qconfig)
    code = (
        "import sys, torch, effllm\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("QuantLinear")


def test_failed_save_leaves_no_output(tmp_path, monkeypatch):
    model, qconfig = quantized_tiny_llama()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(model, tmp_path / "q", qconfig)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path):
    model, qconfig = quantized_tiny_llama()
    (tmp_path / "q").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(model, tmp_path / "q", qconfig)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        effllm.load(tmp_path)


def test_import_effllm_is_lean():
    code = "import sys, effllm; print(sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("first_import",
                         ["effllm.ptq.quantize", "effllm.quant.hf_quantizer", "effllm.quant.serialization"])
def test_any_effllm_module_can_be_imported_first_and_registers(first_import):
    # Importing our quantizer module imports transformers' registry, whose post-import hook must not try to
    # register the half-imported module (it once raised a circular ImportError in a fresh process).
    code = (f"import {first_import}\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
            "print('effllm' in AUTO_QUANTIZER_MAPPING)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"
