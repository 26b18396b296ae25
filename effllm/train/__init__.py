"""Tiny causal LMs and byte-level corpora: for tests, demos, benchmarks and small recipes."""

from .byte_corpus import VOCAB_SIZE, load_bytes, random_batches, sequential_batches
from .tiny_lm import TinyLMConfig, TrainResult, build_tiny_llama, evaluate_loss, train_lm, warmup_cosine

__all__ = [
    "VOCAB_SIZE",
    "TinyLMConfig",
    "TrainResult",
    "build_tiny_llama",
    "evaluate_loss",
    "load_bytes",
    "random_batches",
    "sequential_batches",
    "train_lm",
    "warmup_cosine",
]
