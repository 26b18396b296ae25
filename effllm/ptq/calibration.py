"""Calibration sequences: random windows of ``seqlen`` tokens from a text (the GPTQ/CBQ convention)."""

from __future__ import annotations

from pathlib import Path

import torch

# A folder is taken as a split corpus (like ../shared/corpus) and calibrates on its training split.
CORPUS_TRAIN_FILE = "train.txt"
HUB_SETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", None, "train", "text"),
}
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
# Tokenizing a whole 12 MB corpus to draw a few dozen windows is wasteful: read this many characters per
# requested token (about 4 characters a token in English, with a wide margin).
CHARS_PER_TOKEN_BUDGET = 12


def calibration_text(source: str, max_chars: int | None = None) -> str:
    path = Path(source)
    if path.is_dir():
        path = path / CORPUS_TRAIN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"calibration folder {source} has no {CORPUS_TRAIN_FILE}")
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            text = handle.read(max_chars) if max_chars else handle.read()
    elif source in HUB_SETS:
        try:
            from datasets import load_dataset
        except ImportError:
            raise ImportError("calibrating on a hub dataset needs the eval extra: pip install 'effllm[eval]'") from None
        name, config, split, column = HUB_SETS[source]
        if source == "c4":
            data = load_dataset(name, data_files={"train": C4_TRAIN_SHARD}, split=split)
        else:
            data = load_dataset(name, config, split=split)
        text = "\n\n".join(data[column])[:max_chars] if max_chars else "\n\n".join(data[column])
    else:
        raise FileNotFoundError(
            f"calibration source {source!r} is not a file, a corpus folder, or one of {', '.join(HUB_SETS)}"
        )
    if not text.strip():
        raise ValueError(f"calibration source {source} is empty; give a text file with content")
    return text


def calibration_ids(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random token windows of ``seqlen`` [nsamples, seqlen] from ``source``."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    text = calibration_text(source, max_chars=CHARS_PER_TOKEN_BUDGET * nsamples * seqlen)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
