"""The blockwise-quantization core shared by every capability of effllm."""

from effllm.kernels.blockwise import (
    DEFAULT_BLOCKSIZE,
    dequantize_blockwise,
    dequantize_blockwise_ref,
    num_blocks,
    quantize_blockwise,
    quantize_blockwise_ref,
)
from effllm.kernels.packing import pack_bits_ref as pack_bits
from effllm.kernels.packing import unpack_bits_ref as unpack_bits
from effllm.kernels.quant_maps import MAP_KINDS, dynamic_map, linear_map, make_map

from .quant_state import QuantState, dequantize, quantize

__all__ = [
    "DEFAULT_BLOCKSIZE",
    "MAP_KINDS",
    "QuantState",
    "dequantize",
    "dequantize_blockwise",
    "dequantize_blockwise_ref",
    "dynamic_map",
    "linear_map",
    "make_map",
    "num_blocks",
    "pack_bits",
    "quantize",
    "quantize_blockwise",
    "quantize_blockwise_ref",
    "unpack_bits",
]
