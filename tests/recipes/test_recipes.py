"""Every shipped recipe parses; a tiny quantize + eval recipe runs end to end."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from effllm.cli import main
from effllm.recipes import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_parses(path):
    recipe = Recipe.load(path)
    assert recipe.stages


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nstages:\n  - quantize: {bits: 4, out: o, groupsize: 64}\n")
    with pytest.raises(ValueError, match="unknown PTQ config keys"):
        Recipe.load(bad)
    bad.write_text("model: x\nstages:\n  - finetune: {}\n")
    with pytest.raises(ValueError, match="unknown stage 'finetune'"):
        Recipe.load(bad)
    bad.write_text("model: x\nstages:\n  - eval: {seqlen: 64, split: test}\n")
    with pytest.raises(ValueError, match="unknown keys \\['split'\\]"):
        Recipe.load(bad)
    result = CliRunner().invoke(main, ["run", str(bad)])
    assert result.exit_code == 2 and "unknown keys" in result.output


def test_quantize_eval_recipe_runs(tiny_model_dir, tmp_path):
    text = tiny_model_dir / "text.txt"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir / 'model'}\n"
        "stages:\n"
        f"  - quantize: {{method: rtn, bits: 4, group_size: 32, out: {tmp_path / 'q'}}}\n"
        f"  - eval: {{task: perplexity, dataset: {text}, seqlen: 64}}\n"
    )
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "q" / "results.json").read_text())
    assert [r["stage"] for r in rows] == ["quantize", "eval"] and rows[1]["perplexity"] > 1
    assert "| stage |" in result.output
