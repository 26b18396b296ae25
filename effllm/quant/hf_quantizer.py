"""The transformers quantizer for effllm folders: swaps the listed linears for packed ``QuantLinear`` shells
before the weights load, so ``qweight``/``scales``/``zeros`` load straight into them."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .hf_registration import QUANT_METHOD, register
from .quant_linear import QuantLinear
from .weight_quant import WeightQuantSpec


class EffllmQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a folder written by effllm: how its linears are packed, and the recipe."""

    def __init__(self, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
                 act_bits: int | None = None, modules: list[str] | None = None, method: str = "rtn",
                 recipe: dict | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.act_bits = act_bits
        self.modules = list(modules or [])
        self.method = method
        self.recipe = recipe or {}
        for key, value in kwargs.items():
            setattr(self, key, value)

    @property
    def spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.bits, self.group_size, self.symmetric)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def replace_with_quant_linears(model: nn.Module, config: EffllmQuantizationConfig) -> None:
    """Swap each module named in ``config.modules`` for an empty ``QuantLinear`` of the same shape."""
    for name in config.modules:
        linear = model.get_submodule(name)
        if isinstance(linear, QuantLinear):
            continue
        device = linear.weight.device
        shell = QuantLinear(linear.in_features, linear.out_features, config.spec, linear.bias is not None,
                            config.act_bits, linear.weight.dtype, device)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, shell)


# Methods whose folders hold modules other than QuantLinear: method -> (module, function) that builds empty
# shells of them before the weights load. A fixed table, never read from the folder (no code named by data runs).
SHELL_BUILDERS = {"bct": ("effllm.compress.bct.compress", "prepare_shells")}


class EffllmHfQuantizer(HfQuantizer):
    requires_calibration = True  # effllm folders are always pre-quantized

    def _process_model_before_weight_loading(self, model, **kwargs):
        builder = SHELL_BUILDERS.get(self.quantization_config.method)
        if builder is not None:
            import importlib

            module_name, function = builder
            getattr(importlib.import_module(module_name), function)(model, self.quantization_config.to_dict())
            return model
        replace_with_quant_linears(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


# Importing this module may be what imported transformers' registry (whose hook could not register a
# half-defined module): register now that everything above exists.
register()
