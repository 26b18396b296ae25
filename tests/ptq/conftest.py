import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_tiny_llama(layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def make_llama():
    """Factory: ``make_llama(layers=3, seed=0)`` builds a fresh tiny Llama."""
    return make_tiny_llama
