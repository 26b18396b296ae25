"""The blockwise-quantization core shared by every capability of effllm.

Names are resolved lazily (PEP 562) so that ``import effllm`` does not import torch or transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEFAULT_BLOCKSIZE": "effllm.kernels.blockwise",
    "dequantize_blockwise": "effllm.kernels.blockwise",
    "dequantize_blockwise_ref": "effllm.kernels.blockwise",
    "num_blocks": "effllm.kernels.blockwise",
    "quantize_blockwise": "effllm.kernels.blockwise",
    "quantize_blockwise_ref": "effllm.kernels.blockwise",
    "pack_bits": ("effllm.kernels.packing", "pack_bits_ref"),
    "unpack_bits": ("effllm.kernels.packing", "unpack_bits_ref"),
    "MAP_KINDS": "effllm.kernels.quant_maps",
    "dynamic_map": "effllm.kernels.quant_maps",
    "linear_map": "effllm.kernels.quant_maps",
    "make_map": "effllm.kernels.quant_maps",
    "QuantState": "effllm.quant.quant_state",
    "quantize": "effllm.quant.quant_state",
    "dequantize": "effllm.quant.quant_state",
    "WeightQuantSpec": "effllm.quant.weight_quant",
    "FakeQuantLinear": "effllm.quant.fake_quant_linear",
    "QuantLinear": "effllm.quant.quant_linear",
    "save_quantized": "effllm.quant.serialization",
    "load": "effllm.quant.serialization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'effllm.quant' has no attribute {name!r}")
    target = _EXPORTS[name]
    module_name, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
