"""Optimizers with blockwise-quantized (8-bit, 4-bit or 32-bit) states: drop-in for ``torch.optim``."""

from .adam import Adam4bit, Adam8bit, AdamW4bit, AdamW8bit
from .bitsandbytes_state import from_bitsandbytes_state_dict, load_bitsandbytes_state_dict
from .blockwise_optimizer import BlockwiseOptimizer
from .frugal import Frugal
from .lion import Lion8bit
from .overrides import override
from .rmsprop import RMSprop8bit
from .sgd import SGD8bit
from .stable_embedding import StableEmbedding

__all__ = [
    "Adam4bit",
    "Adam8bit",
    "AdamW4bit",
    "AdamW8bit",
    "BlockwiseOptimizer",
    "Frugal",
    "Lion8bit",
    "RMSprop8bit",
    "SGD8bit",
    "StableEmbedding",
    "from_bitsandbytes_state_dict",
    "load_bitsandbytes_state_dict",
    "override",
]
