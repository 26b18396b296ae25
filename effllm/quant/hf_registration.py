"""Teach transformers to load effllm's quantized folders: ``AutoModel*.from_pretrained(DIR)`` works once effllm
is imported, through transformers' public registration of custom quantizers (no patching of its internals).

``import effllm`` must stay lean, so registration waits until transformers' quantizer registry is imported:
``install()`` registers at once if it already is, else adds a post-import hook for that module.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

QUANT_METHOD = "effllm"
_REGISTRY_MODULE = "transformers.quantizers.auto"
_QUANTIZER_MODULE = "effllm.quant.hf_quantizer"
_registered = False


def register() -> None:
    """Register effllm's quantization config and quantizer with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    quantizer_module = sys.modules.get(_QUANTIZER_MODULE)
    if quantizer_module is not None and not hasattr(quantizer_module, "EffllmHfQuantizer"):
        # Our quantizer module is half-imported: importing it imported transformers' registry, whose hook
        # brought us here. That module calls register() itself once it is complete.
        return
    _registered = True
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from .hf_quantizer import EffllmHfQuantizer, EffllmQuantizationConfig

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(EffllmQuantizationConfig)
        register_quantizer(QUANT_METHOD)(EffllmHfQuantizer)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``register()`` right after transformers' quantizer registry module has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # find the real spec without ourselves, once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_then_register(module):
            original_exec(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if _REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
