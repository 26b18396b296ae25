"""The train stage: a tiny version of recipes/pretrain_small.yaml (Frugal + inner AdamW8bit) runs through
``effllm run``, saves a model whose byte tokenizer lets the eval stage measure the validation text to the same
perplexity the train stage reported; its options are checked when the recipe loads."""

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from effllm.cli import main
from effllm.recipes import Recipe

WORDS = "the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly".split()
BATCH, SEQ, EVAL_BATCHES = 2, 32, 3


def corpus(folder):
    """train.txt and valid.txt of ASCII words (so characters are bytes)."""
    generator = torch.Generator().manual_seed(0)
    folder.mkdir()
    for name, count in (("train.txt", 3000), ("valid.txt", 300)):
        picks = torch.randint(0, len(WORDS), (count,), generator=generator).tolist()
        (folder / name).write_text(" ".join(WORDS[i] for i in picks))
    return folder


def tiny_recipe(tmp_path, **train_overrides):
    train = dict(data=str(corpus(tmp_path / "corpus")),
                 model=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_seq_len=SEQ),
                 optimizer="frugal",
                 optimizer_kwargs=dict(density=0.25, inner="adamw8bit", update_gap=3,
                                       inner_kwargs={"min_8bit_size": 0}),
                 steps=6, batch_size=BATCH, seq_len=SEQ, lr=3e-3, warmup=2, eval_interval=3,
                 eval_batches=EVAL_BATCHES, out=str(tmp_path / "model"))
    train.update(train_overrides)
    evaluate = dict(task="perplexity", dataset=str(tmp_path / "corpus" / "valid.txt"), seqlen=SEQ,
                    max_chars=BATCH * SEQ * EVAL_BATCHES, batch_size=BATCH)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "stages": [{"train": train}, {"eval": evaluate}]}))
    return path


def test_tiny_pretrain_recipe_runs_through_effllm_run(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tiny_recipe(tmp_path))])
    assert result.exit_code == 0, result.output
    train, evaluated = json.loads((tmp_path / "model" / "results.json").read_text())
    assert train["stage"] == "train" and train["optimizer"] == "frugal" and train["steps"] == 6
    assert train["valid_perplexity"] == pytest.approx(math.exp(train["valid_loss"]))
    assert 1 < train["valid_perplexity"] < 256  # better than uniform over bytes after 6 steps
    assert train["optimizer_state_bytes"] > 0 and train["step_ms"] > 0
    log = json.loads((tmp_path / "model" / "train_log.json").read_text())
    assert [point["step"] for point in log["valid_curve"]] == [3, 6] and len(log["train_losses"]) == 6
    # the saved folder is a Hugging Face model with a byte tokenizer: the eval stage's perplexity of the same
    # windows of valid.txt is the train stage's final validation perplexity
    assert evaluated["stage"] == "eval" and evaluated["windows"] == BATCH * EVAL_BATCHES
    assert evaluated["perplexity"] == pytest.approx(train["valid_perplexity"], rel=1e-4)
    saved_config = json.loads((tmp_path / "model" / "train_config.json").read_text())
    assert saved_config["optimizer_kwargs"]["inner"] == "adamw8bit"
    assert "| train |" in result.output


def test_state_bytes_reported_are_the_optimizers(tmp_path):
    """adamw8bit with every tensor 8-bit except the embedding (kept 32-bit): bytes from the shapes."""
    recipe = tiny_recipe(tmp_path, optimizer="adamw8bit", optimizer_kwargs={"min_8bit_size": 0}, steps=2,
                         eval_interval=2)
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "model" / "results.json").read_text())[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    expected = 0
    for name, param in model.named_parameters():
        n = param.numel()
        expected += 8 * n if "embed_tokens" in name else 2 * (n + 4 * -(-n // 256))
    assert train["optimizer_state_bytes"] == expected


@pytest.mark.parametrize("override, message", [
    (dict(model={"hidden": 32}), "unknown model keys \\['hidden'\\]"),
    (dict(optimizer="sgd"), "unknown optimizer 'sgd'"),
    (dict(optimizer_kwargs={"rho": 0.25}), "optimizer_kwargs \\['rho'\\] not accepted by frugal"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(epochs=1), "unknown keys \\['epochs'\\]"),
])
def test_train_stage_options_are_checked_when_the_recipe_loads(tmp_path, override, message):
    recipe = tiny_recipe(tmp_path, **override)
    with pytest.raises(ValueError, match=message):
        Recipe.load(recipe)
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2


def test_existing_output_is_not_overwritten(tmp_path):
    recipe = tiny_recipe(tmp_path)
    (tmp_path / "model").mkdir()
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2 and "already exists" in result.output
