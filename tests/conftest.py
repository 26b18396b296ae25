"""Shared fixtures and markers. ``gpu`` tests are skipped without CUDA (one marker, no ad-hoc skips)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): for tensors
    of a few thousand elements a second thread adds only synchronisation, and on a busy 2-core machine its
    spinning made such modules several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """``../shared/corpus`` (train/valid/test.txt); EFFLLM_SHARED overrides where shared/ is."""
    root = Path(os.environ.get("EFFLLM_SHARED", SHARED))
    path = root / "corpus"
    if not (path / "train.txt").exists():
        raise FileNotFoundError(f"shared corpus not found at {path}; set EFFLLM_SHARED to the shared/ folder")
    return path

TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs. " * 40


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 tokens) built offline."""
    vocab = {token: index for index, token in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    raw = Tokenizer(models.WordPiece(vocab, unk_token=next(iter(vocab)), max_input_chars_per_word=10_000))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False),
                                                 pre_tokenizers.Split("", "isolated")])
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama Hugging Face folder (config, safetensors, tokenizer) and a text file."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root
