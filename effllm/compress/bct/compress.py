"""``compress(model, config)``: patch a Hugging Face encoder instance so every component runs blockwise-quantized.

What is swapped (the model instance only; no transformers class or global behaviour changes):

* every ``nn.Linear`` -> ``BCTLinear`` (packed weight, quantized input and output), classifier heads included;
* every ``nn.Embedding`` -> ``BCTEmbedding`` (packed table);
* every ``nn.LayerNorm`` -> ``BCTLayerNorm`` (quantized residual stream in, quantized output);
* every pointwise activation (GELU, tanh, ReLU, ...) -> ``TableActivation`` (the ``gelu`` spec);
* attention scores and probabilities: each self-attention module gets ``BCTAttentionOps`` and the model's
  config selects the ``effllm_bct`` attention implementation (see ``attention.py``).

``shell=True`` builds the same structure with empty buffers, for loading a saved folder.
"""

from __future__ import annotations

from torch import nn

from .attention import ATTN_IMPLEMENTATION, OPS_ATTRIBUTE, BCTAttentionOps, register_attention
from .config import BCTConfig
from .layers import BCTEmbedding, BCTLayerNorm, BCTLinear
from .lookup_tables import TableActivation

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "distilbert")
FORMAT = "bct-packed-v1"  # layout of the saved buffers (PackedTensor); bump when it changes
_POINTWISE_ACTIVATIONS = (nn.GELU, nn.Tanh, nn.ReLU, nn.SiLU)


def check_supported(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        name = type(model).__name__
        raise ValueError(f"BCT does not support {name} (model_type {model_type!r}) yet; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (BERT, RoBERTa, DistilBERT and MiniLM-style encoders)")


def _is_pointwise_activation(module: nn.Module) -> bool:
    if isinstance(module, _POINTWISE_ACTIVATIONS):
        return True
    # transformers' own activations (GELUActivation, NewGELUActivation, ...) live in transformers.activations
    return type(module).__module__ == "transformers.activations"


def _replacement(module: nn.Module, config: BCTConfig, shell: bool) -> nn.Module | None:
    if isinstance(module, nn.Linear):
        return BCTLinear(module, config.linear_weights, config.biases, config.activations, shell)
    if isinstance(module, nn.Embedding):
        return BCTEmbedding(module, config.embeddings, shell)
    if isinstance(module, nn.LayerNorm):
        return BCTLayerNorm(module, config.biases, config.residual, config.layernorm, shell)
    if config.gelu.bits is not None and _is_pointwise_activation(module):
        return TableActivation(module, config.gelu)
    return None


def compress(model: nn.Module, config: BCTConfig | None = None, shell: bool = False) -> nn.Module:
    """Compress ``model`` in place (and return it); see the module docstring."""
    config = config or BCTConfig()
    check_supported(model)
    for parent in list(model.modules()):
        if isinstance(parent, (BCTLinear, BCTEmbedding, BCTLayerNorm, TableActivation)):
            continue
        for name, child in list(parent.named_children()):
            replacement = _replacement(child, config, shell)
            if replacement is not None:
                setattr(parent, name, replacement)
        if type(parent).__name__.endswith("SelfAttention"):
            setattr(parent, OPS_ATTRIBUTE, BCTAttentionOps(config))
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.bct_config = config
    return model


def quantization_config(config: BCTConfig) -> dict:
    """What config.json records for a BCT folder: ``effllm.load`` rebuilds the modules from it."""
    return {"method": "bct", "format": FORMAT, "bct": config.to_dict()}


def prepare_shells(model: nn.Module, quantization_config: dict) -> None:
    """Called by effllm's transformers quantizer before a BCT folder's weights load into ``model``."""
    if quantization_config.get("format") != FORMAT:
        raise ValueError(f"unknown BCT folder format {quantization_config.get('format')!r}; this effllm reads "
                         f"{FORMAT!r}")
    compress(model, BCTConfig.from_dict(quantization_config["bct"]), shell=True)


def save_compressed(model: nn.Module, out_dir, tokenizer=None, overwrite: bool = False):
    """Save a compressed model as a Hugging Face folder (atomically) that ``effllm.load`` reads back."""
    from effllm.quant.serialization import save_quantized

    config = getattr(model, "bct_config", None)
    if config is None:
        raise ValueError("this model was not compressed with BCT: call compress(model, config) first")
    from .report import compression_report

    report = compression_report(model)
    return save_quantized(model, out_dir, quantization_config(config), tokenizer,
                          extra_json={"bct_config.json": config.to_dict(), "compression_report.json": report},
                          overwrite=overwrite)
