"""effllm optimizers in ``transformers.Trainer``: through ``optimizer_cls_and_kwargs`` and through
``optimizers=(instance, None)``, with a checkpoint saved mid-run and training resumed from it to the same
final parameters, bit for bit, as an uninterrupted run. Trainer saves ``optimizer.pt`` with ``torch.save``
and loads it with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from effllm.optim import AdamW8bit
from effllm.train import TinyLMConfig, build_tiny_llama

transformers = pytest.importorskip("transformers")

TOTAL_STEPS = 12
CHECKPOINT_STEP = 6
BATCH_SIZE = 4
SEQ_LEN = 32
SAMPLES = 64
# hidden 64: every attention/MLP weight and the embeddings (>= 4096 elements) get 8-bit state.
TINY = TinyLMConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128, max_seq_len=SEQ_LEN)
OPTIMIZER_KWARGS = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


class TokenDataset(torch.utils.data.Dataset):
    """Learnable byte sequences (arithmetic progressions modulo 256 with random start and stride);
    labels = inputs (the model shifts them)."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, TINY.vocab_size, (SAMPLES, 1), generator=generator)
        strides = torch.randint(1, 4, (SAMPLES, 1), generator=generator)
        self.tokens = (starts + strides * torch.arange(SEQ_LEN)) % TINY.vocab_size

    def __len__(self):
        return SAMPLES

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def _args(output_dir: Path, **overrides):
    options = dict(
        output_dir=str(output_dir),
        max_steps=TOTAL_STEPS,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=OPTIMIZER_KWARGS["lr"],
        weight_decay=OPTIMIZER_KWARGS["weight_decay"],
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=CHECKPOINT_STEP,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def _final_params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _unwrapped(optimizer):
    """Trainer wraps the optimizer in accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def _assert_quantized_state(optimizer):
    optimizer = _unwrapped(optimizer)
    assert isinstance(optimizer, AdamW8bit)
    code_dtypes = {state["state1"].dtype for state in optimizer.state.values()}
    assert torch.uint8 in code_dtypes  # large weights: 8-bit state
    assert all(state["step"] > 0 for state in optimizer.state.values())


def _train_cls_and_kwargs(output_dir: Path, resume_from: Path | None = None):
    model = build_tiny_llama(TINY, seed=0)
    trainer = transformers.Trainer(
        model=model,
        args=_args(output_dir),
        train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=(AdamW8bit, dict(OPTIMIZER_KWARGS)),
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer


def test_optimizer_cls_and_kwargs_trains_and_resumes_bit_exactly(tmp_path):
    uninterrupted = _train_cls_and_kwargs(tmp_path / "run")
    _assert_quantized_state(uninterrupted.optimizer)
    # Trainer's two param groups: decay for weights, none for norms and biases.
    assert [g["weight_decay"] for g in _unwrapped(uninterrupted.optimizer).param_groups] == [0.1, 0.0]
    losses = [entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry]
    assert len(losses) == TOTAL_STEPS and losses[-1] < losses[0]

    checkpoint = tmp_path / "run" / f"checkpoint-{CHECKPOINT_STEP}"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "model.safetensors").is_file()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {state["state1"].dtype for state in saved["state"].values()} >= {torch.uint8}

    resumed = _train_cls_and_kwargs(tmp_path / "resumed", resume_from=checkpoint)
    assert resumed.state.global_step == TOTAL_STEPS
    _assert_quantized_state(resumed.optimizer)
    _assert_same(_final_params(resumed.model), _final_params(uninterrupted.model))


def _train_with_instance(output_dir: Path, resume_from: Path | None = None):
    model = build_tiny_llama(TINY, seed=0)
    optimizer = AdamW8bit(model.parameters(), **OPTIMIZER_KWARGS)
    trainer = transformers.Trainer(
        model=model, args=_args(output_dir), train_dataset=TokenDataset(), optimizers=(optimizer, None)
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    assert _unwrapped(trainer.optimizer) is optimizer
    return trainer


def test_optimizer_instance_trains_and_resumes_bit_exactly(tmp_path):
    uninterrupted = _train_with_instance(tmp_path / "run")
    _assert_quantized_state(uninterrupted.optimizer)
    # Trainer built its linear schedule around our optimizer, and it drove the learning rate down.
    assert _unwrapped(uninterrupted.optimizer).param_groups[0]["lr"] < OPTIMIZER_KWARGS["lr"]
    checkpoint = tmp_path / "run" / f"checkpoint-{CHECKPOINT_STEP}"
    resumed = _train_with_instance(tmp_path / "resumed", resume_from=checkpoint)
    _assert_same(_final_params(resumed.model), _final_params(uninterrupted.model))
