"""Perplexity by the standard protocol (as in GPTQ, OmniQuant, CBQ): the test text is joined, tokenized once,
cut into non-overlapping windows of ``seqlen`` tokens (the incomplete tail dropped), and the mean next-token
negative log-likelihood over every window is exponentiated."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

# Public test sets, loaded through ``datasets``: name -> (path, config, split, text column).
DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
}
C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"
C4_DOCUMENTS = 1100  # the usual slice of the first validation shard


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    windows: int
    tokens: int
    seqlen: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_eval_text(dataset: str, max_chars: int | None = None) -> str:
    """The joined test text of ``dataset``: a file path, ``wikitext2``, ``ptb`` or ``c4``."""
    path = Path(dataset)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif dataset in DATASETS or dataset == "c4":
        try:
            from datasets import load_dataset
        except ImportError:
            raise ImportError("evaluating on a hub dataset needs the eval extra: pip install 'effllm[eval]'") from None
        if dataset == "c4":
            data = load_dataset("allenai/c4", data_files={"validation": C4_VALIDATION_SHARD}, split="validation")
            text = " ".join(data[:C4_DOCUMENTS]["text"])
        else:
            name, config, split, column = DATASETS[dataset]
            text = "\n\n".join(load_dataset(name, config, split=split)[column])
    else:
        choices = ", ".join([*DATASETS, "c4"])
        raise ValueError(f"dataset {dataset!r} is neither a text file nor one of {choices}")
    if not text.strip():
        raise ValueError(f"the evaluation text from {dataset!r} is empty")
    return text[:max_chars] if max_chars else text


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, input_ids: torch.Tensor, seqlen: int, batch_size: int = 1, progress: bool = True
) -> PerplexityResult:
    """Perplexity of a causal LM over ``input_ids`` [tokens] in non-overlapping windows of ``seqlen``."""
    windows = input_ids.numel() // seqlen
    if windows == 0:
        raise ValueError(f"the text has {input_ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    batches = input_ids[: windows * seqlen].view(windows, seqlen)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = batches[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, windows, total_tokens, seqlen)
