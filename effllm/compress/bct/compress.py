"""``compress(model, config)``: patch a Hugging Face encoder or Llama-family decoder instance so every component
runs blockwise-quantized (which architectures, and where their parts are: ``architectures.py``).

What is swapped (the model instance only; no transformers class or global behaviour changes):

* every ``nn.Linear`` -> ``BCTLinear`` (packed weight, quantized input and output), classifier and LM heads
  included; a head tied to an input embedding -> ``BCTTiedLinear``, which reads the embedding's packed table;
* every ``nn.Embedding`` -> ``BCTEmbedding`` (packed table);
* every ``nn.LayerNorm`` -> ``BCTLayerNorm`` and every Llama-style ``*RMSNorm`` -> ``BCTRMSNorm`` (quantized
  input, quantized output);
* every pointwise activation (GELU, SiLU, tanh, ReLU, ...) -> ``TableActivation`` (the ``gelu`` spec);
* attention scores and probabilities: each attention module gets ``BCTAttentionOps`` and the model's
  config selects the ``effllm_bct`` attention implementation (see ``attention.py``).

``shell=True`` builds the same structure with empty buffers, for loading a saved folder; ``tied`` then names
the tied heads recorded when the model was compressed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .architectures import (  # noqa: F401  (SUPPORTED_MODEL_TYPES: re-exported)
    SUPPORTED_MODEL_TYPES,
    bias_aliases,
    family_of,
    is_attention_module,
    is_rms_norm,
    tied_heads,
)
from .attention import ATTN_IMPLEMENTATION, OPS_ATTRIBUTE, BCTAttentionOps, register_attention
from .config import BCTConfig
from .layers import BCTEmbedding, BCTLayerNorm, BCTLinear, BCTRMSNorm, BCTTiedLinear
from .lookup_tables import TableActivation

FORMAT = "bct-packed-v1"  # layout of the saved buffers (PackedTensor); bump when it changes
_POINTWISE_ACTIVATIONS = (nn.GELU, nn.Tanh, nn.ReLU, nn.SiLU)
_COMPRESSED = (BCTLinear, BCTEmbedding, BCTLayerNorm, BCTRMSNorm, TableActivation)


def check_supported(model: nn.Module) -> None:
    """A clear error naming the model when BCT does not support its architecture."""
    family_of(model)


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
    if is_rms_norm(module):  # the layernorm spec covers every normalisation's output
        return BCTRMSNorm(module, config.biases, config.residual, config.layernorm, shell)
    if config.gelu.bits is not None and _is_pointwise_activation(module):
        return TableActivation(module, config.gelu)
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module)


def compress(model: nn.Module, config: BCTConfig | None = None, shell: bool = False,
             tied: dict[str, str] | None = None, aliases: dict[str, str] | None = None,
             calib=None) -> nn.Module:
    """Compress ``model`` in place (and return it); see the module docstring. ``tied`` (head -> embedding) and
    ``aliases`` (head -> the parameter that is its bias) default to what the model's tied weights say; a shell
    takes them from the saved folder. ``calib`` (model inputs: tokenizer-output dicts or id tensors) is needed
    when ``linear_weights.rounding`` is ``gptq`` (calibrated_rounding.py)."""
    config = config or BCTConfig()
    family = family_of(model)
    calibrated = not shell and config.linear_weights.bits is not None and config.linear_weights.rounding == "gptq"
    if calibrated and calib is None:
        raise ValueError("linear_weights.rounding 'gptq' needs calibration data: pass calib=[batches of model "
                         "inputs], or set linear_weights.rounding to 'nearest'")
    # calibrated rounding starts from the float weights, which the compressed layers no longer hold
    float_weights = {name: module.weight.detach().float().clone() for name, module in model.named_modules()
                     if isinstance(module, nn.Linear)} if calibrated else None
    # the dtype of what stays in floating point, before the packed tensors' scales come first (see save_compressed)
    float_dtype = getattr(model.config, "dtype", None) if shell else model.dtype
    if tied is None:
        tied = {} if shell else tied_heads(model)
    if aliases is None:
        aliases = {} if shell else bias_aliases(model, tied)
    heads = {id(model.get_submodule(name)) for name in tied}
    attention_modules = 0
    for parent in list(model.modules()):
        if isinstance(parent, _COMPRESSED):
            continue
        for name, child in list(parent.named_children()):
            if id(child) in heads:
                continue  # packed once, as its embedding, below
            replacement = _replacement(child, config, shell)
            if replacement is not None:
                setattr(parent, name, replacement)
        if is_attention_module(parent, family):
            setattr(parent, OPS_ATTRIBUTE, BCTAttentionOps(config))
            attention_modules += 1
    if attention_modules == 0:  # a renamed transformers class would otherwise leave attention in float silently
        raise ValueError(f"BCT found no attention module in {type(model).__name__}; this transformers version "
                         f"names them differently from what effllm expects")
    for head_name, embedding_name in tied.items():
        embedding = model.get_submodule(embedding_name)
        if not isinstance(embedding, BCTEmbedding):
            raise ValueError(f"tied head {head_name}: {embedding_name} is not a compressed embedding")
        alias = None
        if head_name in aliases:
            owner_name, _, attribute = aliases[head_name].rpartition(".")
            alias = (model.get_submodule(owner_name), attribute)
        _set_submodule(model, head_name, BCTTiedLinear(model.get_submodule(head_name), embedding, config.biases,
                                                       config.activations, shell, alias))
    if tied:
        # transformers ties weights by parameter name (lm_head.weight -> embed_tokens.weight) after loading; the
        # compressed head has no such parameter and already shares the packed table, so no tying is left to do
        model.all_tied_weights_keys = {}
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.bct_config = config
    model.bct_tied = {"tied_heads": dict(tied), "bias_aliases": dict(aliases)}
    model.bct_float_dtype = float_dtype if isinstance(float_dtype, torch.dtype) else torch.float32
    if calibrated:
        from .calibrated_rounding import calibrate_rounding

        calibrate_rounding(model, float_weights, calib)
    return model


def quantization_config(config: BCTConfig, tied: dict | None = None) -> dict:
    """What config.json records for a BCT folder: ``effllm.load`` rebuilds the modules from it (``tied``: the
    ``bct_tied`` record of ``compress``)."""
    return {"method": "bct", "format": FORMAT, "bct": config.to_dict(),
            **(tied or {"tied_heads": {}, "bias_aliases": {}})}


def prepare_shells(model: nn.Module, quantization_config: dict) -> None:
    """Called by effllm's transformers quantizer before a BCT folder's weights load into ``model``."""
    if quantization_config.get("format") != FORMAT:
        raise ValueError(f"unknown BCT folder format {quantization_config.get('format')!r}; this effllm reads "
                         f"{FORMAT!r}")
    compress(model, BCTConfig.from_dict(quantization_config["bct"]), shell=True,
             tied=quantization_config.get("tied_heads") or {},
             aliases=quantization_config.get("bias_aliases") or {})


def save_compressed(model: nn.Module, out_dir, tokenizer=None, overwrite: bool = False):
    """Save a compressed model as a Hugging Face folder (atomically) that ``effllm.load`` reads back."""
    from effllm.quant.serialization import save_quantized

    config = getattr(model, "bct_config", None)
    if config is None:
        raise ValueError("this model was not compressed with BCT: call compress(model, config) first")
    from .report import compression_report

    report = compression_report(model)
    path = save_quantized(model, out_dir, quantization_config(config, getattr(model, "bct_tied", None)), tokenizer,
                          extra_json={"bct_config.json": config.to_dict(), "compression_report.json": report},
                          overwrite=overwrite)
    _record_float_dtype(path / "config.json", getattr(model, "bct_float_dtype", torch.float32))
    return path


def _record_float_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` records the dtype of the first floating-point parameter, here an fp16 block scale;
    loading would then cast every float tensor BCT left alone to fp16. Record the float components' dtype
    instead (the scales keep theirs: their shells are built with it). Replaced atomically."""
    data = json.loads(config_file.read_text())
    data["dtype"] = str(dtype).removeprefix("torch.")
    tmp = config_file.with_name(config_file.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(config_file)
