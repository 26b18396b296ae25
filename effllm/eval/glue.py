"""GLUE evaluation of a sequence-classification model: the validation split of a task, its official metrics.

Data comes through ``datasets``: ``load_dataset("nyu-mll/glue", task)`` from the hub, or a local copy in the GLUE
columns (a ``datasets`` folder written by ``save_to_disk``, a CSV/TSV/JSON/JSONL/parquet file, or a folder holding
``<split>.<ext>``), so GLUE runs without the hub too. Metrics are ``evaluate.load("glue", task)`` when that loads;
its metric script lives on the hub (``evaluate-metric/glue``) and needs scipy and scikit-learn, so offline, or
without those, the same formulas are computed here (``glue_metrics``: accuracy, binary F1 of class 1, Matthews
correlation, Pearson and Spearman correlation) and the result says which one ran.

The model's label ids must be GLUE's (as in every checkpoint fine-tuned on the task); STS-B is a regression
(one output).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    config: str  # the dataset config (and evaluate's glue config)
    text_columns: tuple[str, ...]
    num_labels: int  # 1: regression
    metrics: tuple[str, ...]
    split: str = "validation"


TASKS = {
    "cola": GlueTask("cola", ("sentence",), 2, ("matthews_correlation",)),
    "sst2": GlueTask("sst2", ("sentence",), 2, ("accuracy",)),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": GlueTask("qqp", ("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "mnli_mismatched": GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), "validation_mismatched"),
    "qnli": GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask("wnli", ("sentence1", "sentence2"), 2, ("accuracy",)),
}
_FILE_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
                  ".jsonl": ("json", {}), ".parquet": ("parquet", {})}


def glue_task(name: str) -> GlueTask:
    """``sst2`` or ``glue:sst2`` -> its GlueTask; a clear error listing the tasks otherwise."""
    key = name.removeprefix("glue:").lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; available: {', '.join('glue:' + t for t in TASKS)}")
    return TASKS[key]


# --- data ----------------------------------------------------------------------------------------------------
def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("GLUE evaluation needs the eval extra: pip install 'effllm[eval]'") from None
    return datasets


def _from_file(path: Path):
    datasets = _require_datasets()
    builder, options = _FILE_BUILDERS[path.suffix.lower()]
    return datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **options)


def load_glue(task: GlueTask, data: str | Path | None = None, split: str | None = None):
    """The ``split`` (default: the task's validation split) of ``task`` as a ``datasets.Dataset``: from the hub
    when ``data`` is None, else from the local copy at ``data`` (see the module docstring)."""
    datasets = _require_datasets()
    split = split or task.split
    if data is None:
        dataset = datasets.load_dataset(HUB_DATASET, task.config, split=split)
    else:
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"GLUE data {path} does not exist; give a datasets folder, a CSV/TSV/JSON/JSONL/"
                                    f"parquet file, or a folder with {split}.csv (or .tsv/.json/.jsonl/.parquet)")
        if path.is_file():
            if path.suffix.lower() not in _FILE_BUILDERS:
                raise ValueError(f"GLUE data {path}: unknown file type {path.suffix!r}; use one of "
                                 f"{', '.join(_FILE_BUILDERS)}")
            dataset = _from_file(path)
        elif any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"GLUE data {path} has no split {split!r}; it has {', '.join(dataset)}")
                dataset = dataset[split]
        else:
            files = [path / f"{split}{suffix}" for suffix in _FILE_BUILDERS if (path / f"{split}{suffix}").is_file()]
            if not files:
                raise FileNotFoundError(f"GLUE data folder {path} has no {split}.csv (or .tsv/.json/.jsonl/.parquet) "
                                        f"and is not a datasets folder (save_to_disk)")
            dataset = _from_file(files[0])
    missing = [column for column in (*task.text_columns, "label") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"GLUE {task.config} data needs the columns {', '.join((*task.text_columns, 'label'))}; "
                         f"missing {', '.join(missing)} (it has {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise ValueError(f"GLUE {task.config} {split}: no examples")
    if task.num_labels > 1 and min(dataset["label"]) < 0:
        raise ValueError(f"GLUE {task.config} {split} has hidden labels (-1, as the test splits); evaluate the "
                         f"validation split")
    return dataset


# --- metrics -------------------------------------------------------------------------------------------------
def _ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties given their average rank (as scipy.stats.rankdata)."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    start = 0
    n = values.numel()
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / denominator if denominator > 0 else float("nan")


def glue_metrics(task: GlueTask, predictions, references) -> dict[str, float]:
    """The task's metrics with evaluate's glue definitions (F1 of class 1; Matthews 0 when undefined)."""
    if task.num_labels == 1:
        x = torch.as_tensor(predictions, dtype=torch.float64)
        y = torch.as_tensor(references, dtype=torch.float64)
        return {"pearson": _pearson(x, y), "spearmanr": _pearson(_ranks(x), _ranks(y))}
    p = torch.as_tensor(predictions, dtype=torch.long)
    r = torch.as_tensor(references, dtype=torch.long)
    result = {}
    if "accuracy" in task.metrics:
        result["accuracy"] = float((p == r).double().mean())
    tp, fp = int(((p == 1) & (r == 1)).sum()), int(((p == 1) & (r != 1)).sum())
    fn, tn = int(((p != 1) & (r == 1)).sum()), int(((p != 1) & (r != 1)).sum())
    if "f1" in task.metrics:
        result["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    if "matthews_correlation" in task.metrics:
        denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        result["matthews_correlation"] = (tp * tn - fp * fn) / denominator if denominator else 0.0
    return result


def compute_metrics(task: GlueTask, predictions, references) -> tuple[dict[str, float], str]:
    """``(metrics, source)``: ``evaluate``'s glue metric when it loads and runs, else ``glue_metrics``."""
    name = "mnli_mismatched" if task.split == "validation_mismatched" else task.config
    try:
        import evaluate

        metric = evaluate.load("glue", name)
        values = metric.compute(predictions=list(predictions), references=list(references))
        return {key: float(value) for key, value in values.items()}, "evaluate"
    except Exception as error:  # noqa: BLE001 - offline hub, missing scipy/sklearn, no evaluate: same formulas here
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        return glue_metrics(task, predictions, references), f"effllm (evaluate's glue metric unavailable: {reason})"


# --- evaluation ----------------------------------------------------------------------------------------------
@dataclass
class GlueResult:
    task: str
    split: str
    examples: int
    metrics: dict[str, float]
    metric_source: str
    predictions: list = field(default_factory=list, repr=False)

    def to_dict(self, with_predictions: bool = False) -> dict:
        data = asdict(self)
        if not with_predictions:
            data.pop("predictions")
        return data


def _accepted_inputs(model) -> set[str] | None:
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None  # takes anything: keep what the tokenizer gives
    return set(parameters)


@torch.no_grad()
def predict(model, tokenizer, dataset, task: GlueTask, batch_size: int = 32, max_length: int = 512,
            progress: bool = True) -> list:
    """Class ids (regression: scores) for every example, in order, batched."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no padding token (nor an end-of-sequence token to pad with)")
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    accepted = _accepted_inputs(model)
    outputs = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"glue:{task.config}", disable=not progress,
                      unit="batch"):
        rows = dataset[start:start + batch_size]
        texts = [rows[column] for column in task.text_columns]
        encoded = tokenizer(*texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        inputs = {key: value.to(device) for key, value in encoded.items() if accepted is None or key in accepted}
        logits = model(**inputs).logits.float()
        outputs += (logits[:, 0] if task.num_labels == 1 else logits.argmax(-1)).tolist()
    return outputs


def evaluate_glue(model, tokenizer, task: GlueTask, dataset, batch_size: int = 32, max_length: int = 512,
                  progress: bool = True) -> GlueResult:
    """Predict every example of ``dataset`` and score the predictions with the task's metrics."""
    model_labels = getattr(model.config, "num_labels", None)
    if model_labels != task.num_labels:
        raise ValueError(f"the model has {model_labels} output labels but GLUE {task.config} needs "
                         f"{task.num_labels}; evaluate a model fine-tuned on {task.config}")
    limit = getattr(model.config, "max_position_embeddings", None)
    max_length = min(max_length, limit) if isinstance(limit, int) else max_length
    predictions = predict(model, tokenizer, dataset, task, batch_size, max_length, progress)
    metrics, source = compute_metrics(task, predictions, dataset["label"])
    return GlueResult(task.config if task.split != "validation_mismatched" else "mnli_mismatched", task.split,
                      len(dataset), metrics, source, predictions)
