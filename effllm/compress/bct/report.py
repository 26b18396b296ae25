"""Compression report: bytes and bits per element of each stored component, from the tensors really held.

Every persistent tensor of the model (what ``save_pretrained`` writes) is counted once, in the component it
belongs to: ``embeddings``, ``linear_weights``, ``biases`` (biases and LayerNorm/RMSNorm parameters, packed or float),
and ``other`` (anything BCT left alone). A packed tensor's bytes are its codes plus its scales (and second-level
scales and map): the scale overhead is reported separately. The baselines are the same elements in fp32 and fp16.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .layers import BCTEmbedding, BCTLayerNorm, BCTLinear, BCTRMSNorm, BCTTiedLinear
from .packed_tensor import PackedTensor

FP32_BYTES, FP16_BYTES = 4, 2


def _component_of(owner: nn.Module, attribute: str) -> str:
    if isinstance(owner, BCTEmbedding):
        return "embeddings"
    if isinstance(owner, BCTLinear) and attribute == "weight_packed":
        return "linear_weights"
    if isinstance(owner, (BCTLinear, BCTLayerNorm, BCTRMSNorm)):
        return "biases"
    return "other"


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def compression_report(model: nn.Module) -> dict:
    """``{"components": {name: {...}}, "total": {...}}`` with elements, bytes, code/scale bytes, bits per
    element and the ratios against fp32 and fp16."""
    rows: dict[str, dict[str, float]] = defaultdict(lambda: dict(elements=0, bytes=0, code_bytes=0, scale_bytes=0))
    owners = {}
    for module in model.modules():
        for attribute, child in module.named_children():
            owners[id(child)] = (module, attribute)
    seen = set()
    for module in model.modules():
        if isinstance(module, PackedTensor):
            owner, attribute = owners[id(module)]
            row = rows[_component_of(owner, attribute)]
            row["elements"] += module.shape.numel()
            row["code_bytes"] += _tensor_bytes(module.codes)
            row["scale_bytes"] += module.nbytes() - _tensor_bytes(module.codes)
            row["bytes"] += module.nbytes()
            seen.update(id(tensor) for tensor in [*module.parameters(), *module.buffers()])
    # a tied head's bias may be another module's parameter (BERT's predictions.bias): still a bias
    aliased = {id(m.aliased_bias()) for m in model.modules() if isinstance(m, BCTTiedLinear)}
    for module in model.modules():
        if isinstance(module, PackedTensor):
            continue
        persistent = list(module.parameters(recurse=False))
        persistent += [t for n, t in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for tensor in persistent:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            is_bias = isinstance(module, (BCTLinear, BCTLayerNorm, BCTRMSNorm)) or id(tensor) in aliased
            component = "biases" if is_bias else "other"
            row = rows[component]
            row["elements"] += tensor.numel()
            row["bytes"] += _tensor_bytes(tensor)
            row["code_bytes"] += _tensor_bytes(tensor)
    components = {name: _finish(dict(row)) for name, row in sorted(rows.items())}
    total = dict(elements=0, bytes=0, code_bytes=0, scale_bytes=0)
    for row in components.values():
        for key in total:
            total[key] += row[key]
    return {"components": components, "total": _finish(total)}


def _finish(row: dict) -> dict:
    elements = max(1, row["elements"])
    row["bits_per_element"] = 8.0 * row["bytes"] / elements
    row["scale_bits_per_element"] = 8.0 * row["scale_bytes"] / elements
    row["ratio_vs_fp32"] = FP32_BYTES * row["elements"] / max(1, row["bytes"])
    row["ratio_vs_fp16"] = FP16_BYTES * row["elements"] / max(1, row["bytes"])
    return row


def format_report(report: dict) -> str:
    """The report as a plain-text table."""
    header = f"{'component':<16}{'elements':>12}{'bytes':>12}{'bits/elem':>11}{'scale bits':>11}{'vs fp32':>9}"
    lines = [header, "-" * len(header)]
    for name, row in [*report["components"].items(), ("total", report["total"])]:
        lines.append(f"{name:<16}{row['elements']:>12,}{row['bytes']:>12,}{row['bits_per_element']:>11.3f}"
                     f"{row['scale_bits_per_element']:>11.3f}{row['ratio_vs_fp32']:>8.2f}x")
    lines.append(f"overall: {report['total']['ratio_vs_fp32']:.3f}x vs fp32, "
                 f"{report['total']['ratio_vs_fp16']:.3f}x vs fp16")
    return "\n".join(lines)
