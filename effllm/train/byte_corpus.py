"""Byte-level token batches from a text file: every byte is a token, so no tokenizer is needed.

Training batches are windows at random offsets drawn from a seeded generator, so two runs with the same seed
see the same data in the same order whatever optimizer they use. Validation batches are consecutive
non-overlapping windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

VOCAB_SIZE = 256  # one token per byte value


def load_bytes(path: str | Path, max_bytes: int | None = None) -> torch.Tensor:
    """The first ``max_bytes`` bytes of ``path`` (all of it by default) as a uint8 tensor [n]."""
    with open(path, "rb") as f:
        data = f.read(max_bytes) if max_bytes is not None else f.read()
    if not data:
        raise ValueError(f"{path} is empty")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def random_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """``steps`` batches of int64 token ids [batch_size, seq_len], each row a window at a random offset."""
    if tokens.numel() <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {tokens.numel()}")
    generator = torch.Generator().manual_seed(seed)
    offsets_within_window = torch.arange(seq_len)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size, 1), generator=generator)
        yield tokens[starts + offsets_within_window].long()


def sequential_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows [batch_size, seq_len] (incomplete tail dropped)."""
    windows = tokens.numel() // seq_len
    rows = tokens[: windows * seq_len].view(windows, seq_len).long()
    batches = [rows[i : i + batch_size] for i in range(0, windows - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"{tokens.numel()} tokens do not fill one batch of {batch_size} x {seq_len}")
    return batches[:max_batches] if max_batches is not None else batches
