"""``effllm.integrations.hf`` in a real ``transformers.Trainer`` (tiny Llama from a config, CPU, a few steps):
the factory's param groups are the Trainer's own decay grouping (split by projection for Frugal); the callbacks
log what they claim, checked against figures computed here independently (state bytes from the shapes, refresh
steps from the basis tensors, a NaN injected at a known step); Frugal built by the factory resumes from a Trainer
checkpoint to the uninterrupted trajectory, bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch

from effllm.integrations.hf import (
    NonFiniteGradientCallback,
    OptimizerStateCallback,
    QuantizedStateWarningCallback,
    attach_callbacks,
    create_optimizer,
    effllm_callbacks,
    optimizer_cls_and_kwargs,
)
from effllm.optim import AdamW8bit, Frugal
from effllm.train import TinyLMConfig, build_tiny_llama

transformers = pytest.importorskip("transformers")

SEQ_LEN = 16
BATCH_SIZE = 4
# hidden 64, intermediate 128: projected weights of 64 x 64 and 64 x 128 (rank 16 at density 0.25).
TINY = TinyLMConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128, max_seq_len=SEQ_LEN)
LR = 3e-3


class TokenDataset(torch.utils.data.Dataset):
    """Arithmetic progressions of bytes (learnable); labels = inputs."""

    def __init__(self, samples: int = 64):
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, TINY.vocab_size, (samples, 1), generator=generator)
        strides = torch.randint(1, 4, (samples, 1), generator=generator)
        self.tokens = (starts + strides * torch.arange(SEQ_LEN)) % TINY.vocab_size

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def training_args(output_dir, **overrides):
    options = dict(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=BATCH_SIZE,
                   learning_rate=LR, weight_decay=0.1, lr_scheduler_type="constant", logging_steps=5,
                   save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                   dataloader_num_workers=0)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def logs_with(trainer, key):
    return {entry["step"]: entry for entry in trainer.state.log_history if key in entry}


# --- the factory ---------------------------------------------------------------------------------------------
def test_groups_are_the_trainers_decay_grouping(tmp_path):
    model = build_tiny_llama(TINY, seed=0)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset())
    trainer.create_optimizer()
    trainer_groups = [({id(p) for p in g["params"]}, g["weight_decay"]) for g in trainer.optimizer.param_groups]

    _, kwargs = optimizer_cls_and_kwargs(model, "adamw8bit", args=trainer.args)
    ours = [({id(p) for p in g["params"]}, g["weight_decay"]) for g in kwargs["params"]]
    assert ours == trainer_groups
    assert kwargs["lr"] == LR and kwargs["betas"] == (0.9, 0.999) and kwargs["eps"] == 1e-8

    names = {id(p): n for n, p in model.named_parameters()}
    _, kwargs = optimizer_cls_and_kwargs(model, "frugal", lr=LR, weight_decay=0.1, density=0.25)
    by_kind = {(g["projected"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in kwargs["params"]}
    assert set(by_kind) == {(True, 0.1), (False, 0.1), (False, 0.0)}
    assert by_kind[(False, 0.1)] == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all("norm" in name for name in by_kind[(False, 0.0)])
    assert len(by_kind[(True, 0.1)]) == 7 and all("proj" in name for name in by_kind[(True, 0.1)])
    # together, the two groupings' union is every parameter, once
    assert sorted(n for group in by_kind.values() for n in group) == sorted(names.values())


def test_factory_keeps_embeddings_32bit_and_rejects_unknown_names():
    model = build_tiny_llama(TINY, seed=0)
    optimizer = create_optimizer(model, "adamw8bit", lr=LR)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    optimizer.step()
    assert optimizer.state[model.model.embed_tokens.weight]["state_bits"] == 32
    assert optimizer.state[model.lm_head.weight]["state_bits"] == 8  # a Linear head is not an input embedding
    with pytest.raises(ValueError, match="unknown optimizer 'adam9bit'"):
        optimizer_cls_and_kwargs(model, "adam9bit", lr=LR)
    with pytest.raises(ValueError, match="give lr"):
        optimizer_cls_and_kwargs(model, "adamw8bit")


# --- the callbacks -------------------------------------------------------------------------------------------
class RecordBasis(transformers.TrainerCallback):
    """Independent witness of refreshes: the optimizer steps at which q_proj's basis tensor was replaced."""

    def __init__(self, param):
        self.param, self.previous, self.replaced_at = param, None, []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        basis = unwrapped(optimizer).state[self.param]["basis"]
        if basis is not self.previous:
            self.replaced_at.append(state.global_step)
        self.previous = basis


def expected_frugal_state_bytes(model, rank_fraction=0.25) -> int:
    """fp32 Adam moments (2 x 4 bytes) on every state-full element; for each projected weight (short side d,
    long side n, rank r = d/4): the basis r x d and two moments r x n, all fp32."""
    total = 0
    for name, param in model.named_parameters():
        if param.ndim == 2 and "proj" in name:
            d, n = sorted(param.shape)
            r = round(rank_fraction * d)
            total += 4 * (r * d + 2 * r * n)
        else:
            total += 8 * param.numel()
    return total


def test_state_callback_logs_bytes_and_frugal_refreshes(tmp_path):
    model = build_tiny_llama(TINY, seed=0)
    cls, kwargs = optimizer_cls_and_kwargs(model, "frugal", lr=LR, weight_decay=0.1, density=0.25, update_gap=3)
    witness = RecordBasis(model.model.layers[0].self_attn.q_proj.weight)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=7),
                                   train_dataset=TokenDataset(), optimizer_cls_and_kwargs=(cls, kwargs),
                                   callbacks=[OptimizerStateCallback(), witness])
    trainer.train()

    logged = logs_with(trainer, "optimizer_state_bytes")
    # refreshes at steps 1, 4, 7 force a log line; step 5 is the regular logging step
    assert witness.replaced_at == [1, 4, 7]
    assert sorted(logged) == [1, 4, 5, 7]
    assert [logged[s]["frugal_refreshes"] for s in (1, 4, 5, 7)] == [1, 2, 2, 3]
    assert [logged[s]["frugal_last_refresh_step"] for s in (1, 4, 5, 7)] == [1, 4, 4, 7]
    expected = expected_frugal_state_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    for entry in logged.values():
        assert entry["optimizer_state_bytes"] == expected
        assert entry["optimizer_state_bytes_per_param"] == pytest.approx(expected / params, abs=1e-4)
        assert "loss" in entry  # the figures ride on the training log lines


def test_state_callback_counts_8bit_state_and_attaches_before_reporters(tmp_path):
    model = build_tiny_llama(TINY, seed=0)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=5),
                                   train_dataset=TokenDataset(),
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "adamw8bit", lr=LR))
    callbacks = attach_callbacks(trainer, [OptimizerStateCallback()])
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("OptimizerStateCallback") == names.index("DefaultFlowCallback") + 1
    trainer.train()
    assert callbacks[0] in trainer.callback_handler.callbacks

    # 8-bit: 1 byte per element per moment + one fp32 absmax per 256-element block; 32-bit: 4 bytes (embeddings,
    # kept 32-bit by the factory, and tensors under 4096 elements).
    expected = 0
    for name, param in model.named_parameters():
        if "embed_tokens" in name or param.numel() < 4096:
            expected += 8 * param.numel()
        else:
            expected += 2 * (param.numel() + 4 * -(-param.numel() // 256))
    assert logs_with(trainer, "optimizer_state_bytes")[5]["optimizer_state_bytes"] == expected
    assert "frugal_refreshes" not in logs_with(trainer, "optimizer_state_bytes")[5]


class InjectNaN(transformers.TrainerCallback):
    """Puts a NaN into one gradient element before the optimizer step of ``at_step`` and records that parameter
    element after every step."""

    def __init__(self, param, at_step, index=(3, 5)):
        self.param, self.at_step, self.index, self.values = param, at_step, index, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at_step:
            self.param.grad[self.index] = float("nan")

    def on_step_end(self, args, state, control, **kwargs):
        self.values.append(float(self.param.detach()[self.index]))


def test_nonfinite_callback_counts_what_the_optimizer_skips(tmp_path):
    model = build_tiny_llama(TINY, seed=0)
    weight = model.model.layers[0].mlp.up_proj.weight
    inject = InjectNaN(weight, at_step=3)
    counter = NonFiniteGradientCallback()
    # no clipping: with it, the NaN norm would turn every gradient into NaN
    args = training_args(tmp_path, max_steps=6, logging_steps=3, max_grad_norm=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(),
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "adamw8bit", lr=LR),
                                   callbacks=[inject, counter])
    trainer.train()
    logged = logs_with(trainer, "nonfinite_grad_elements")
    assert sorted(logged) == [3, 6]
    assert logged[3]["nonfinite_grad_elements"] == 1 and logged[3]["nonfinite_grad_steps"] == 1
    assert logged[6]["nonfinite_grad_elements"] == 0 and logged[6]["nonfinite_grad_steps"] == 0
    # AdamW8bit skipped exactly that element at step 3 and kept training it afterwards
    values = inject.values
    assert values[2] == values[1] and values[1] != values[0] and values[3] != values[2]
    assert torch.isfinite(weight).all()


def test_nonfinite_callback_warns_for_frugal_projected_weights(tmp_path):
    model = build_tiny_llama(TINY, seed=0)
    inject = InjectNaN(model.model.layers[0].mlp.up_proj.weight, at_step=2)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2, max_grad_norm=0.0),
                                   train_dataset=TokenDataset(),
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "frugal", lr=LR),
                                   callbacks=[inject, NonFiniteGradientCallback()])
    with pytest.warns(RuntimeWarning, match="1 weight\\(s\\) projected by Frugal have NaN/Inf gradient elements"):
        trainer.train()


def test_quantized_state_warning_names_embeddings_and_tiny_tensors(tmp_path):
    model = build_tiny_llama(TINY, seed=0)
    # built by hand, every tensor quantized: the embedding and the norm scales (64 elements) are poor candidates
    optimizer = AdamW8bit(model.parameters(), lr=LR, min_8bit_size=0)
    check = QuantizedStateWarningCallback()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2),
                                   train_dataset=TokenDataset(), optimizers=(optimizer, None), callbacks=[check])
    with pytest.warns(UserWarning, match="quantized optimizer state on 4 parameter\\(s\\)"):
        trainer.train()
    reasons = {name: why for name, _, why in check.findings}
    assert set(reasons) == {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                            "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"}
    assert "embedding" in reasons["model.embed_tokens.weight"] and "tiny" in reasons["model.norm.weight"]

    # through the factory (embeddings 32-bit, tiny tensors 32-bit by default) there is nothing to report
    model = build_tiny_llama(TINY, seed=0)
    check = QuantizedStateWarningCallback()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=1),
                                   train_dataset=TokenDataset(), callbacks=[check],
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "frugal", lr=LR,
                                                                                     inner="adamw8bit"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train()
    assert check.findings == []


# --- Frugal: resume from a Trainer checkpoint ----------------------------------------------------------------
def _train_frugal(output_dir, resume_from=None):
    model = build_tiny_llama(TINY, seed=0)
    cls, kwargs = optimizer_cls_and_kwargs(model, "frugal", lr=LR, weight_decay=0.1, density=0.25, update_gap=3,
                                           inner="adamw8bit", inner_kwargs={"min_8bit_size": 1024})
    args = training_args(output_dir, max_steps=8, save_strategy="steps", save_steps=4, logging_steps=4,
                         lr_scheduler_type="linear")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(),
                                   optimizer_cls_and_kwargs=(cls, kwargs), callbacks=effllm_callbacks())
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer


def test_frugal_from_the_factory_resumes_to_the_same_trajectory(tmp_path):
    uninterrupted = _train_frugal(tmp_path / "run")
    optimizer = unwrapped(uninterrupted.optimizer)
    assert isinstance(optimizer, Frugal)
    assert any(state.get("inner", {}).get("state_bits") == 8 for state in optimizer.state.values())
    checkpoint = tmp_path / "run" / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("basis" in state for state in saved["state"].values())

    resumed = _train_frugal(tmp_path / "resumed", resume_from=checkpoint)
    assert resumed.state.global_step == 8
    for (name, a), (_, b) in zip(uninterrupted.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    # the refresh count survives the resume: steps 1, 4, 7
    assert logs_with(resumed, "frugal_refreshes")[8]["frugal_refreshes"] == 3
    assert (logs_with(resumed, "optimizer_state_bytes")[8]["optimizer_state_bytes"]
            == logs_with(uninterrupted, "optimizer_state_bytes")[8]["optimizer_state_bytes"])
