"""Export a weight-only effllm model in the compressed-tensors format (llm-compressor's), so plain
transformers loads it without effllm and vLLM serves it.

The folder is produced by the library itself, in llm-compressor's save lifecycle, one layer at a time: each
``QuantLinear`` is swapped for a dense ``nn.Linear`` holding its dequantized weight,
``initialize_module_for_quantization`` attaches the scheme with its ``weight_scale``/``weight_zero_point`` (set
to effllm's), ``compress_module`` re-quantizes and packs it (format ``pack-quantized``, any width 1..8); then
``ModelCompressor.from_pretrained_model`` derives the config (targets ``Linear``, the linears left dense as
``ignore``), ``save_pretrained`` writes the tensors and ``ModelCompressor.update_config`` the
``quantization_config``.

How effllm's grid maps onto theirs (``b`` bits, offset ``o = 2**(b-1)``):
effllm stores unsigned codes ``u`` in ``0..2**b-1`` and ``w = (u - z) * s``; compressed-tensors stores signed
codes ``q`` in ``-o..o-1`` and ``w = (q - zp) * s``. With ``q = u - o`` and ``zp = z - o`` the two are the same
integers times the same scale. effllm's symmetric grid fixes ``z = o``, i.e. ``zp = 0``: their symmetric scheme,
which stores no zero point. The dequantized weights are therefore bit-identical in the model's dtype; the export
checks this for every layer with the library's own decompression.

vLLM's WNA16 kernels serve 4 and 8 bits; 2, 3, 5, 6 and 7 bits are valid pack-quantized folders that
transformers (through compressed-tensors) loads and decompresses, but vLLM refuses them.

Loading in transformers (5.24 with compressed-tensors 0.20, measured on CPU): symmetric folders load with a plain
``from_pretrained(DIR)``, which keeps them packed and decompresses them on the first forward pass. Asymmetric
folders (packed zero points) need ``quantization_config=CompressedTensorsConfig(dequantize=True)``, which
decompresses while loading. The default path builds the packed layout by compressing the empty (meta) model, and
on meta compressed-tensors leaves ``weight_zero_point`` at its unpacked shape [out, groups], so transformers
refuses the packed checkpoint tensor [ceil(out * b / 32), groups] as a size mismatch. The folder itself is the
layout llm-compressor writes for asymmetric schemes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .quant_linear import QuantLinear
from .serialization import atomic_output_dir
from .weight_quant import WeightQuantSpec

FORMAT = "pack-quantized"
INSTALL_HINT = "pip install 'effllm[export]'"
ASYMMETRIC_LOAD_HINT = ("asymmetric compressed-tensors folder: load it in transformers with "
                        "quantization_config=CompressedTensorsConfig(dequantize=True)")


def require_compressed_tensors() -> None:
    """Fail with one line naming the extra when the ``compressed-tensors`` package is missing."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ImportError(f"the compressed-tensors export needs the compressed-tensors package: {INSTALL_HINT}") \
            from None


def check_exportable(spec: WeightQuantSpec, act_bits: int | None) -> None:
    """Refuse what the export cannot represent exactly, before any work is done."""
    if act_bits:
        raise ValueError(
            f"compressed-tensors export is weight-only: this model quantizes activations to {act_bits} bits "
            "(effllm's per-token grid has no exact compressed-tensors scheme); use --format effllm"
        )
    if not 1 <= spec.bits <= 8:
        raise ValueError(f"compressed-tensors pack-quantized stores 1..8-bit weights, got {spec.bits} bits")


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def model_spec(layers: dict[str, QuantLinear]) -> WeightQuantSpec:
    """The one spec every ``QuantLinear`` shares (a compressed-tensors config group holds one scheme)."""
    if not layers:
        raise ValueError("the model has no QuantLinear layers: quantize it first (effllm quantize / ptq.quantize)")
    specs = {layer.spec for layer in layers.values()}
    if len(specs) > 1:
        raise ValueError(f"the model mixes quantization specs {sorted(map(str, specs))}; export needs one spec")
    spec = specs.pop()
    for layer in layers.values():
        check_exportable(spec, layer.act_bits)
    return spec


def weight_scheme(spec: WeightQuantSpec):
    """The compressed-tensors ``QuantizationScheme`` of ``spec``'s integer weight grid (weights only)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    grouping = dict(strategy="channel") if spec.group_size is None else dict(strategy="group",
                                                                          group_size=spec.group_size)
    weights = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, **grouping)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def signed_zero_point(layer: QuantLinear) -> torch.Tensor:
    """effllm's unsigned zero ``z`` as compressed-tensors' signed ``zp = z - 2**(bits-1)`` (int8)."""
    spec, offset = layer.spec, 2 ** (layer.spec.bits - 1)
    zeros = layer.zeros.to(torch.int16)
    if spec.symmetric and not bool((zeros == offset).all()):
        raise ValueError(f"a symmetric layer has zeros other than {offset}: it cannot be stored as symmetric")
    if bool((zeros > spec.max_code).any()):
        raise ValueError(f"zero points above {spec.max_code} do not fit the {spec.bits}-bit zero-point grid")
    return (zeros - offset).to(torch.int8)


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                              extra_json: dict[str, dict] | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (its quantized linears are ``QuantLinear``) as a compressed-tensors folder, atomically.

    ``extra_json`` files (e.g. the effllm recipe) are written beside the weights. ``model`` is left as it was:
    its ``QuantLinear`` layers are swapped back after the save.
    """
    require_compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor

    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"output folder {out_dir} already exists; choose another --out or remove it")
    layers = quantized_linears(model)
    scheme = weight_scheme(model_spec(layers))
    with layers_restored(model, layers), effllm_config_detached(model):
        for name, layer in layers.items():
            _set_submodule(model, name, packed_linear(name, layer, scheme))
        # reads the schemes now on the modules: the config group, the ignore list (linears left dense), the format
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
        with atomic_output_dir(out_dir, overwrite) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            compressor.update_config(str(staging))
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            for file_name, payload in (extra_json or {}).items():
                (staging / file_name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def packed_linear(name: str, layer: QuantLinear, scheme) -> nn.Linear:
    """The compressed-tensors ``nn.Linear`` of ``layer``: ``weight_packed``, ``weight_scale``, ``weight_shape``
    (and ``weight_zero_point`` when asymmetric), packed by the library from the dequantized weight.

    One layer at a time, so only one layer's full-precision weight exists at once.
    """
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.quantization import initialize_module_for_quantization

    # fp32 weight and scale so the library's re-quantization round(w / s + zp) lands exactly on effllm's codes
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=layer.qweight.device, dtype=torch.float32)
    dense.weight.data = layer.dequantized_weight(torch.float32)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    dense.requires_grad_(False)
    initialize_module_for_quantization(dense, scheme)  # attaches the scheme, weight_scale, weight_zero_point
    dense.weight_scale.data = layer.scales.float().reshape(dense.weight_scale.shape)
    dense.weight_zero_point.data = signed_zero_point(layer).reshape(dense.weight_zero_point.shape)
    compress_module(dense, FORMAT)
    dense.weight_scale.data = dense.weight_scale.data.to(layer.scales.dtype)
    check_identical(name, layer, dense)
    return dense


def check_identical(name: str, layer: QuantLinear, packed: nn.Linear) -> None:
    """Decompress ``packed`` with compressed-tensors' own decompressor and require effllm's exact weight."""
    from compressed_tensors.compressors import BaseCompressor

    state = {key: value for key, value in [*packed.named_parameters(recurse=False),
                                           *packed.named_buffers(recurse=False)] if key.startswith("weight_")}
    restored = BaseCompressor.get_value_from_registry(FORMAT).decompress(state, packed.quantization_scheme)["weight"]
    expected = layer.dequantized_weight()
    if restored.dtype != expected.dtype or not torch.equal(restored, expected):
        worst = (restored.float() - expected.float()).abs().max().item()
        raise RuntimeError(f"{name}: compressed-tensors would dequantize a different weight (max error {worst:g})")


@contextmanager
def layers_restored(model: nn.Module, layers: dict[str, QuantLinear]) -> Iterator[None]:
    """Whatever replaces the ``QuantLinear`` layers inside the block, they are back in ``model`` after it."""
    try:
        yield
    finally:
        for name, layer in layers.items():
            _set_submodule(model, name, layer)


@contextmanager
def effllm_config_detached(model: nn.Module) -> Iterator[None]:
    """Hide an effllm ``quantization_config`` and quantizer (a model from ``effllm.load``) while saving."""
    config_had_one = "quantization_config" in vars(model.config)
    quant_config = vars(model.config).pop("quantization_config", None)
    quantizer = getattr(model, "hf_quantizer", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if config_had_one:
            model.config.quantization_config = quant_config


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
