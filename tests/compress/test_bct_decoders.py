"""compress() on tiny Llama-family decoders and tied heads: every component quantized, error bounds against float,
causality, save/load, generate."""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import effllm
from effllm.compress.bct import BCTConfig, StoredSpec, TableSpec, compress, compression_report, save_compressed
from effllm.compress.bct.activation_quant import ActivationQuantizer
from effllm.compress.bct.attention import ATTN_IMPLEMENTATION
from effllm.compress.bct.layers import BCTEmbedding, BCTLinear, BCTRMSNorm, BCTTiedLinear
from effllm.compress.bct.lookup_tables import TableActivation

VOCAB, LAYERS = 300, 2
FLOAT = BCTConfig.uniform(None, None, biases=StoredSpec(None))
SILU_MAX_SLOPE = 1.1  # max |SiLU'(x)| = 1.0998 at x ~ 2.4


def _llama(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def _ids(batch=2, length=13, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_every_decoder_component_is_replaced(tied):
    model = compress(_llama(tied), BCTConfig())
    kinds = [type(m) for m in model.modules()]
    assert not any(k in (nn.Linear, nn.Embedding) or k.__name__ == "LlamaRMSNorm" for k in kinds)
    assert kinds.count(BCTLinear) == 7 * LAYERS + (0 if tied else 1)  # q k v o gate up down (+ lm_head)
    assert kinds.count(BCTTiedLinear) == (1 if tied else 0)
    assert kinds.count(BCTEmbedding) == 1 and kinds.count(BCTRMSNorm) == 2 * LAYERS + 1
    assert kinds.count(TableActivation) == LAYERS  # SiLU
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert all(hasattr(layer.self_attn, "bct_ops") for layer in model.model.layers)
    for name, _ in model.named_parameters():
        assert name.endswith(("scales", "scale_absmax")), name
    if tied:  # the head reads the embedding's packed table: one copy, held by the embedding
        assert model.lm_head.embedding is model.model.embed_tokens
        assert not any(name.startswith("lm_head") for name in model.state_dict())


def test_decoder_outputs_are_quantized():
    model = compress(_llama(False), BCTConfig())
    checked = []

    def check(module, inputs, output):
        assert torch.equal(module.output_quant(output), output)
        checked.append(type(module))

    for module in model.modules():
        if isinstance(module, (BCTLinear, BCTRMSNorm)):
            module.register_forward_hook(check)
    out = model(_ids(), output_attentions=True)
    assert checked.count(BCTLinear) == 7 * LAYERS + 1 and checked.count(BCTRMSNorm) == 2 * LAYERS + 1
    probs_quant = ActivationQuantizer(BCTConfig().attention_probs, signed=False)
    for probs in out.attentions:
        assert torch.equal(probs_quant(probs), probs)
        assert torch.all(probs.triu(diagonal=1) == 0)  # causal: no attention to later tokens


def test_float_config_reproduces_the_float_decoder():
    """Every bit width null: the table-free path (rotary, grouped-query attention, causal mask) is the model's."""
    ref_model = _llama(False)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ref = _logits(ref_model, ids, attention_mask=mask)
    out = _logits(compress(copy.deepcopy(ref_model), FLOAT), ids, attention_mask=mask)
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("config, floor", [(BCTConfig(), 0.999), (BCTConfig.uniform(4, 8), 0.95)], ids=["w8a8", "w4a8"])
def test_decoder_close_to_float(tied, config, floor):
    ref_model = _llama(tied)
    ids = _ids()
    ref = _logits(ref_model, ids)
    out = _logits(compress(copy.deepcopy(ref_model), config), ids)
    assert torch.nn.functional.cosine_similarity(out, ref, dim=-1).min() > floor


def test_no_position_depends_on_a_later_token():
    """Future scores are zeroed before the scores are quantized, so they never set a block's scale."""
    model = compress(_llama(False), BCTConfig())
    ids = _ids(batch=1, length=20)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    a, b = _logits(model, ids), _logits(model, changed)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])


def test_cached_decoding_matches_full_forward():
    model = compress(_llama(False), BCTConfig())
    ids = _ids(batch=1, length=9)
    with torch.no_grad():
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=prefix.past_key_values, use_cache=True).logits[:, -1]
    full = _logits(model, ids)[:, -1]
    assert torch.allclose(step, full, atol=1e-4 * full.abs().max().item())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_decoder_save_load_identical_and_generates(tied, tmp_path):
    model = compress(_llama(tied), BCTConfig.uniform(4, 8))
    ids = _ids()
    expected = _logits(model, ids)
    save_compressed(model, tmp_path / "bct")
    loaded = effllm.load(tmp_path / "bct").eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(_logits(loaded, ids), expected)
    with safe_open(tmp_path / "bct" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        written = sum(f.get_tensor(key).nbytes for key in keys)
    assert not any(key.endswith(".weight") for key in keys)
    assert any(key.startswith("lm_head.") for key in keys) != tied
    assert compression_report(loaded)["total"]["bytes"] == written
    if tied:
        assert loaded.lm_head.embedding is loaded.model.embed_tokens
    prompt = ids[:1, :5]
    generated = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11) and torch.equal(generated[:, :5], prompt)
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=6, do_sample=False))


def test_tied_head_is_counted_once():
    ref_model = _llama(True)
    elements = sum(p.numel() for p in ref_model.parameters())  # the tied table counts once
    report = compression_report(compress(ref_model, BCTConfig()))
    assert report["total"]["elements"] == elements
    assert report["components"]["embeddings"]["elements"] == VOCAB * 64


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_decoder_families(family):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[family]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**common)).eval()
    ids = _ids()
    ref = _logits(model, ids)
    compressed = compress(copy.deepcopy(model), BCTConfig())
    assert not any(type(m) in (nn.Linear, nn.Embedding) or type(m).__name__ == f"{model_cls[:-11]}RMSNorm"
                   for m in compressed.modules())
    assert sum(isinstance(m, BCTRMSNorm) for m in compressed.modules()) >= 3
    assert torch.nn.functional.cosine_similarity(_logits(compressed, ids), ref, dim=-1).min() > 0.999


def test_table_silu_within_slope_times_half_step():
    silu = TableActivation(nn.SiLU(), TableSpec(8, 8.0))
    x = torch.linspace(-20, 20, 40001)
    error = (silu(x) - nn.functional.silu(x)).abs()
    inside = x.abs() <= 8
    assert error[inside].max() <= SILU_MAX_SLOPE * silu.step / 2 + 1e-5
    # beyond the table: x on the right, silu(-8) = -0.0027 (the end entry) on the left
    assert error[~inside].max() <= abs(nn.functional.silu(torch.tensor(-8.0)).item()) + 1e-5


def test_rmsnorm_on_quantized_input_within_derived_bound():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(6, 64) * 3 + 1
    act = BCTConfig().activations
    bct = BCTRMSNorm(norm, StoredSpec(None), act, act)
    y, ref = bct(x), norm(x).detach()
    rms = x.square().mean(-1, keepdim=True).sqrt()
    in_err = x.abs().amax(-1, keepdim=True) / 127 / 2  # half step of the quantized input
    # first order: a shift d of the input moves x / rms by at most |d| / rms * (1 + max|x / rms|)
    norm_err = norm.weight.abs().max() * in_err / rms * (1 + (x / rms).abs().amax(-1, keepdim=True))
    out_err = y.abs().amax(-1, keepdim=True) / 127 / 2
    assert torch.all((y - ref).abs() <= norm_err * 1.05 + out_err + 1e-6)
    assert torch.equal(bct.output_quant(y), y)


def test_bert_mlm_head_shares_the_embedding_and_round_trips(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64)).eval()
    with torch.no_grad():
        model.cls.predictions.bias.uniform_(-1, 1)  # a bias that matters (it is tied to the decoder's)
    elements = sum(p.numel() for p in model.parameters())
    ids = _ids(length=11)
    ref = _logits(model, ids)
    compressed = compress(model, BCTConfig())
    head = compressed.cls.predictions.decoder
    assert isinstance(head, BCTTiedLinear) and head.embedding is compressed.bert.embeddings.word_embeddings
    assert head.aliased_bias() is compressed.cls.predictions.bias and head.bias_packed is None
    expected = _logits(compressed, ids)
    assert torch.nn.functional.cosine_similarity(expected, ref, dim=-1).min() > 0.99
    report = compression_report(compressed)
    assert report["total"]["elements"] == elements and "other" not in report["components"]
    save_compressed(compressed, tmp_path / "mlm")
    loaded = effllm.load(tmp_path / "mlm").eval()
    assert torch.equal(_logits(loaded, ids), expected)
