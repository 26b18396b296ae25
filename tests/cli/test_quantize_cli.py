import json

import pytest
from click.testing import CliRunner

import effllm
from effllm.cli import main
from effllm.quant.quant_linear import QuantLinear


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_quantize_then_eval(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    result = run("quantize", tiny_model_dir / "model", "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib", tiny_model_dir / "text.txt", "--nsamples", "4", "--seqlen", "32", "--out", out)
    assert result.exit_code == 0, result.output
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["method"] == "gptq" and qconfig["recipe"]["calib"].endswith("text.txt")
    assert not (tmp_path / "q.checkpoint").exists()
    model = effllm.load(out)
    assert isinstance(model.model.layers[0].self_attn.o_proj, QuantLinear)

    figures = tmp_path / "ppl.json"
    result = run("eval", out, "--dataset", tiny_model_dir / "text.txt", "--seqlen", "64", "--json", figures)
    assert result.exit_code == 0, result.output
    ppl = json.loads(figures.read_text())
    assert ppl["windows"] > 0 and 1 < ppl["perplexity"] < 1e4
    result = run("eval", tiny_model_dir / "model", "--dataset", tiny_model_dir / "text.txt", "--seqlen", "64",
                 "--json", tmp_path / "fp.json")
    fp = json.loads((tmp_path / "fp.json").read_text())
    assert abs(fp["perplexity"] - ppl["perplexity"]) / fp["perplexity"] < 0.2  # 4-bit stays near fp


@pytest.mark.parametrize("args, message", [
    (["--bits", "9"], "weight bits"),
    (["--group-size", "48"], "does not divide"),
    (["--act-bits", "2"], "activation bits"),
    (["--method", "gptq"], "needs calibration text"),
    (["--method", "gptq", "--calib", "EMPTY"], "empty"),
    (["--option", "nonsense"], "KEY=VALUE"),
    (["--method", "gptq", "--calib", "TEXT", "--option", "dampening=0.1"], "unknown gptq options"),
])
def test_bad_input_is_one_line_error_and_no_output(tiny_model_dir, tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else str(tiny_model_dir / "text.txt") if a == "TEXT" else a for a in args]
    out = tmp_path / "q"
    result = run("quantize", tiny_model_dir / "model", "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists() and not (tmp_path / "q.checkpoint").exists()


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    result = run("quantize", folder, "--out", tmp_path / "q")
    assert result.exit_code == 2 and "no weights" in result.output


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    result = run("quantize", tmp_path / "bert", "--out", tmp_path / "q")
    assert result.exit_code != 0
    assert not (tmp_path / "q").exists()


def test_existing_output_refused(tiny_model_dir, tmp_path):
    (tmp_path / "q").mkdir()
    result = run("quantize", tiny_model_dir / "model", "--out", tmp_path / "q")
    assert result.exit_code == 2 and "already exists" in result.output
