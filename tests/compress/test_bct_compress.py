"""compress() on tiny encoders built from configs: every component quantized, fidelity, save/load, real bytes."""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

import effllm
from effllm.compress.bct import BCTConfig, compress, compression_report, save_compressed
from effllm.compress.bct.activation_quant import ActivationQuantizer
from effllm.compress.bct.attention import ATTN_IMPLEMENTATION
from effllm.compress.bct.layers import BCTEmbedding, BCTLayerNorm, BCTLinear
from effllm.compress.bct.lookup_tables import TableActivation

W4 = BCTConfig.uniform(4, 8)


def _hidden(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs)


def _cosine(a, b, mask):
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return cos[mask.bool()]


def test_every_component_is_replaced(tiny_bert):
    model = compress(tiny_bert, BCTConfig())
    kinds = [type(m) for m in model.modules()]
    assert not any(k in (nn.Linear, nn.Embedding, nn.LayerNorm) for k in kinds)
    assert kinds.count(BCTLinear) == 2 * 6 + 1  # q, k, v, o, up, down per layer + pooler
    assert kinds.count(BCTEmbedding) == 3 and kinds.count(BCTLayerNorm) == 1 + 2 * 2
    assert kinds.count(TableActivation) == 2 + 1  # GELU per layer, tanh of the pooler
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert all(hasattr(layer.attention.self, "bct_ops") for layer in model.encoder.layer)
    # no weight is kept in floating point: every parameter is a scale of a packed tensor
    for name, _ in model.named_parameters():
        assert name.endswith(("scales", "scale_absmax")), name


def test_outputs_of_every_operation_are_quantized(tiny_bert, batch):
    """Each linear, LayerNorm and softmax hands on data already on its blockwise grid (quantizing is a no-op)."""
    model = compress(tiny_bert, BCTConfig())
    checked = []

    def check(module, inputs, output):
        assert torch.equal(module.output_quant(output), output)
        checked.append(module)

    for module in model.modules():
        if isinstance(module, (BCTLinear, BCTLayerNorm)):
            module.register_forward_hook(check)
    out = _hidden(model, batch, output_attentions=True)
    assert len(checked) == 13 + 5
    probs_quant = ActivationQuantizer(BCTConfig().attention_probs, signed=False)
    for probs in out.attentions:
        assert torch.equal(probs_quant(probs), probs)
        assert torch.all(probs[1, :, :, 7:] == 0)  # padding gets no attention
        assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=0.02)


@pytest.mark.parametrize("config, floor", [(BCTConfig(), 0.999), (W4, 0.98)])
def test_close_to_the_float_model(tiny_bert, batch, config, floor):
    ref = _hidden(tiny_bert, batch).last_hidden_state
    out = _hidden(compress(copy.deepcopy(tiny_bert), config), batch).last_hidden_state
    assert _cosine(out, ref, batch["attention_mask"]).min() > floor


def test_float_components_stay_float(tiny_bert, batch):
    """With every bit width null the compressed model computes what the float model does."""
    ref = _hidden(tiny_bert, batch).last_hidden_state
    out = _hidden(compress(copy.deepcopy(tiny_bert), BCTConfig.uniform(None, None, biases=BCTConfig.uniform(
        None).linear_weights)), batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert torch.allclose(out[mask], ref[mask], atol=1e-5)


@pytest.mark.parametrize("config", [BCTConfig(), W4], ids=["w8a8", "w4a8"])
def test_save_load_round_trip_is_exact(tiny_bert, batch, tmp_path, config):
    model = compress(tiny_bert, config)
    expected = _hidden(model, batch).last_hidden_state
    save_compressed(model, tmp_path / "bct")
    loaded = effllm.load(tmp_path / "bct").eval()
    assert loaded.config.quantization_config.method == "bct"
    assert torch.equal(_hidden(loaded, batch).last_hidden_state, expected)
    with safe_open(tmp_path / "bct" / "model.safetensors", "pt") as f:
        assert not any(key.endswith(".weight") for key in f.keys())  # no float weight was written


def test_ratio_comes_from_the_bytes_written(tiny_bert, tmp_path):
    elements = sum(p.numel() for p in tiny_bert.parameters())
    model = compress(tiny_bert, W4)
    report = compression_report(model)
    save_compressed(model, tmp_path / "bct")
    with safe_open(tmp_path / "bct" / "model.safetensors", "pt") as f:
        written = sum(f.get_tensor(key).nbytes for key in f.keys())
    assert report["total"]["bytes"] == written
    assert report["total"]["elements"] == elements
    assert report["total"]["ratio_vs_fp32"] == pytest.approx(4 * elements / written)
    # 4-bit codes, an 8-bit scale per 256 and a fp32 second-level scale per 256 scales, a 16-entry fp32 map
    weights = report["components"]["linear_weights"]
    sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, BCTLinear)]
    blocks = [-(-n // 256) for n in sizes]
    assert weights["code_bytes"] == sum(-(-n * 4 // 8) for n in sizes)
    assert weights["bytes"] == weights["code_bytes"] + sum(b + 4 * -(-b // 256) + 16 * 4 for b in blocks)
    assert weights["elements"] == sum(sizes)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match=r"BCT does not support GPT2Model \(model_type 'gpt2'\).*llama"):
        compress(model, BCTConfig())


def test_save_needs_a_compressed_model(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="not compressed with BCT"):
        save_compressed(tiny_bert, tmp_path / "x")


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_encoder_families(family, batch):
    import transformers

    torch.manual_seed(0)
    if family == "roberta":
        config = transformers.RobertaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=128,
                                            max_position_embeddings=64)
        model = transformers.RobertaForSequenceClassification(config).eval()
    else:
        config = transformers.DistilBertConfig(vocab_size=300, dim=64, n_layers=1, n_heads=4, hidden_dim=128,
                                               max_position_embeddings=64)
        model = transformers.DistilBertForSequenceClassification(config).eval()
    batch = {key: value for key, value in batch.items()}
    ref = _hidden(model, batch).logits
    out = _hidden(compress(copy.deepcopy(model), BCTConfig()), batch).logits
    assert torch.allclose(out, ref, atol=0.05 * ref.abs().max().item() + 1e-3)
