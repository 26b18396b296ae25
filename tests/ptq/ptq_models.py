"""Tiny models for the PTQ tests (a plain module, importable from test files unlike conftest)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_tiny_llama(layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()
