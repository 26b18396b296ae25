import pytest
import torch
from ptq_models import make_tiny_llama
from transformers import LlamaForCausalLM


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
