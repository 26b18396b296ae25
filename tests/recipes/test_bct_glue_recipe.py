"""A compress + GLUE eval recipe end to end on a tiny local classifier and a local SST-2 copy."""

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import effllm
from effllm.cli import main
from effllm.compress.bct.layers import BCTLinear
from effllm.recipes import Recipe

# the GLUE fixtures live beside the GLUE tests; loaded by path (a plain module, no package)
_spec = importlib.util.spec_from_file_location("glue_fixtures_for_recipes",
                                               Path(__file__).resolve().parents[1] / "eval" / "glue_fixtures.py")
glue_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(glue_fixtures)


def test_compress_then_glue_recipe_runs(tmp_path):
    model = glue_fixtures.save_classifier(tmp_path / "classifier", num_labels=2)
    data = glue_fixtures.write_fixtures(tmp_path / "glue")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {model}\n"
        "stages:\n"
        f"  - compress: {{method: bct, weight_bits: 4, act_bits: 8, out: {tmp_path / 'bct'}}}\n"
        f"  - eval: {{task: glue:sst2, dataset: {data['sst2']}, batch_size: 4}}\n"
    )
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bct" / "results.json").read_text())
    assert [r["stage"] for r in rows] == ["compress", "eval"]
    assert rows[0]["weight_bits"] == 4 and rows[0]["ratio_vs_fp32"] > 3
    assert rows[1]["examples"] == len(glue_fixtures.SST2) and 0 <= rows[1]["accuracy"] <= 1
    assert isinstance(effllm.load(tmp_path / "bct").classifier, BCTLinear)  # the eval ran on the compressed model
    assert "| stage |" in result.output


def test_compress_stage_config_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\nstages:\n  - compress: {out: o, weight_bits: 9}\n")
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        Recipe.load(recipe)
    recipe.write_text("model: x\nstages:\n  - compress: {out: o, config: {linear_weights: {bitz: 4}}}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['bitz'\]"):
        Recipe.load(recipe)
    recipe.write_text("model: x\nstages:\n  - compress: {out: o, config: {}, weight_bits: 4}\n")
    with pytest.raises(ValueError, match="either 'config' or weight_bits"):
        Recipe.load(recipe)
    recipe.write_text("model: x\nstages:\n  - compress: {out: o, method: gptq}\n")
    with pytest.raises(ValueError, match="unknown compression method 'gptq'"):
        Recipe.load(recipe)
    recipe.write_text("model: x\nstages:\n  - eval: {task: 'glue:sst3'}\n")
    with pytest.raises(ValueError, match="unknown GLUE task"):
        Recipe.load(recipe)
