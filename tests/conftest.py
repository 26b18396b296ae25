"""Shared fixtures and markers. ``gpu`` tests are skipped without CUDA (one marker, no ad-hoc skips)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """``../shared/corpus`` (train/valid/test.txt); EFFLLM_SHARED overrides where shared/ is."""
    root = Path(os.environ.get("EFFLLM_SHARED", SHARED))
    path = root / "corpus"
    if not (path / "train.txt").exists():
        raise FileNotFoundError(f"shared corpus not found at {path}; set EFFLLM_SHARED to the shared/ folder")
    return path
