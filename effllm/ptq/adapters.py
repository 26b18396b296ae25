"""Where the decoder blocks of each architecture are. Adding an architecture is one entry here."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class DecoderLayout:
    """Dotted attribute paths, from the top-level ``*ForCausalLM`` module."""

    blocks: str
    model_types: tuple[str, ...]


LAYOUTS = (
    DecoderLayout("model.layers", ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "gemma", "gemma2")),
    DecoderLayout("model.decoder.layers", ("opt",)),
    DecoderLayout("transformer.h", ("gpt2", "gpt_neox_japanese", "gptj", "bloom")),
)


def _resolve(root: nn.Module, path: str):
    node = root
    for name in path.split("."):
        node = getattr(node, name, None)
        if node is None:
            return None
    return node


def layout_for(model: nn.Module) -> DecoderLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    supported = sorted(t for layout in LAYOUTS for t in layout.model_types)
    raise ValueError(
        f"architecture {model_type!r} is not supported for quantization; supported: {', '.join(supported)}"
    )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    layout = layout_for(model)
    blocks = _resolve(model, layout.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"expected the decoder blocks of {type(model).__name__} at {layout.blocks}")
    return blocks


def quantizable_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside a block, by its name within the block (in execution-friendly order)."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def convert_conv1d_to_linear(block: nn.Module) -> None:
    """GPT-2-style blocks use transformers' ``Conv1D`` (a transposed linear); make them ``nn.Linear``s."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    for name, child in list(block.named_modules()):
        if isinstance(child, Conv1D):
            in_features, out_features = child.weight.shape
            linear = nn.Linear(in_features, out_features, bias=child.bias is not None,
                               device=child.weight.device, dtype=child.weight.dtype)
            linear.weight.data.copy_(child.weight.detach().t())
            if child.bias is not None:
                linear.bias.data.copy_(child.bias.detach())
            parent_name, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, attr, linear)
