"""Calibration passages for BCT's calibrated rounding: paragraphs of a text, tokenized into padded batches.

A text file is cut at blank lines; paragraphs (stripped) of at least ``MIN_PASSAGE_CHARS`` characters are passages.
A folder stands for its ``train.txt`` (the layout of ``../shared/corpus``), so test text is never calibrated on.
"""

from __future__ import annotations

import random
from pathlib import Path

MIN_PASSAGE_CHARS = 40
BATCH_SIZE = 16


def load_passages(path: str | Path, count: int | None = None, skip: int = 0) -> list[str]:
    """Paragraphs of ``path`` (blank-line separated, stripped, >= MIN_PASSAGE_CHARS), in order, from ``skip``."""
    text = Path(path).read_text(encoding="utf-8")
    passages = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= MIN_PASSAGE_CHARS]
    return passages[skip:] if count is None else passages[skip: skip + count]


def calibration_file(source: str | Path) -> Path:
    """The text file of ``source``: the file itself, or a folder's ``train.txt``; ValueError naming the fix."""
    path = Path(source)
    if path.is_dir():
        path = path / "train.txt"
    if not path.is_file():
        raise ValueError(f"calibration text {path} does not exist: give a text file or a folder with train.txt")
    return path


def calibration_batches(tokenizer, source: str | Path, count: int, max_length: int, seed: int = 0) -> list[dict]:
    """``count`` passages of ``source`` drawn with ``seed``, as tokenizer batches (shortest first, less padding)."""
    passages = load_passages(calibration_file(source))
    if not passages:
        raise ValueError(f"{calibration_file(source)} has no paragraph of >= {MIN_PASSAGE_CHARS} characters to "
                         "calibrate on")
    random.Random(seed).shuffle(passages)
    chosen = sorted(passages[:count], key=len)
    batch_size = BATCH_SIZE if tokenizer.pad_token is not None else 1  # decoders often have no padding token
    return [tokenizer(chosen[start: start + batch_size], padding=batch_size > 1, truncation=True, max_length=max_length,
                      return_tensors="pt") for start in range(0, len(chosen), batch_size)]
