"""Which Hugging Face architectures BCT compresses, and where their parts are.

Two families, each recognised by ``config.model_type``:

* encoders (BERT, RoBERTa, DistilBERT, MiniLM-style BERTs): post-norm ``nn.LayerNorm``, GELU, the attention
  function called from each ``*SelfAttention`` module;
* Llama-family decoders (Llama, Mistral, Qwen2, Qwen3): pre-norm ``*RMSNorm``, SiLU-gated MLPs, rotary
  embeddings and causal masks, grouped-query attention called from each ``*Attention`` module.

Both call the attention function registered under ``config._attn_implementation`` (transformers 5), which is
how BCT reaches the scores and probabilities (``attention.py``).
"""

from __future__ import annotations

from torch import nn

ENCODER_TYPES = ("bert", "roberta", "distilbert")
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = ENCODER_TYPES + DECODER_TYPES
# class-name suffix of the modules that call the attention function, per family
_ATTENTION_SUFFIX = {"encoder": "SelfAttention", "decoder": "Attention"}


def family_of(model: nn.Module) -> str:
    """``"encoder"`` or ``"decoder"``; a clear error naming the model for anything else."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ENCODER_TYPES:
        return "encoder"
    if model_type in DECODER_TYPES:
        return "decoder"
    raise ValueError(f"BCT does not support {type(model).__name__} (model_type {model_type!r}) yet; supported model "
                     f"types: {', '.join(SUPPORTED_MODEL_TYPES)} (BERT, RoBERTa, DistilBERT and MiniLM-style "
                     f"encoders; Llama, Mistral, Qwen2 and Qwen3 decoders)")


def is_attention_module(module: nn.Module, family: str) -> bool:
    name = type(module).__name__
    if family == "decoder":  # LlamaAttention, not LlamaDecoderLayer; every one has its q_proj
        return name.endswith(_ATTENTION_SUFFIX[family]) and hasattr(module, "q_proj")
    return name.endswith(_ATTENTION_SUFFIX[family])


def is_rms_norm(module: nn.Module) -> bool:
    """Llama-style RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)`` (not Gemma's ``1 + weight``)."""
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)
            and isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float))


def tied_heads(model: nn.Module) -> dict[str, str]:
    """``{head linear name: embedding name}`` for output heads whose weight *is* an input embedding's weight
    (LM heads with ``tie_word_embeddings``, BERT-style MLM decoders)."""
    modules = dict(model.named_modules())
    tied = {}
    for target, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        head_name, _, head_attr = target.rpartition(".")
        embedding_name, _, embedding_attr = source.rpartition(".")
        head, embedding = modules.get(head_name), modules.get(embedding_name)
        if (head_attr == embedding_attr == "weight" and isinstance(head, nn.Linear)
                and isinstance(embedding, nn.Embedding) and head.weight is embedding.weight):
            tied[head_name] = embedding_name
    return tied



def bias_aliases(model: nn.Module, heads: dict[str, str]) -> dict[str, str]:
    """``{tied head name: parameter name}`` for parameters elsewhere in the model that *are* a tied head's bias
    (BERT's and RoBERTa's ``predictions.bias`` is ``predictions.decoder.bias``). The compressed head reads that
    parameter rather than storing a second copy of it."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    aliases = {}
    for target, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        head_name, _, attribute = target.rpartition(".")
        if (head_name in heads and attribute == "bias" and source in parameters and target in parameters
                and parameters[source] is parameters[target]):
            aliases[head_name] = source
    return aliases
