"""``effllm compress --method bct`` on tiny models saved from configs: the folder loads back with identical outputs."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

import effllm
from effllm.cli import main
from effllm.compress.bct import BCTConfig, compress
from effllm.compress.bct.layers import BCTLinear, BCTTiedLinear

VOCAB = 120


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _bert(kind: str):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return (BertForSequenceClassification if kind == "classifier" else BertModel)(config).eval()


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    models = {kind: _bert(kind) for kind in ("classifier", "encoder")}
    for kind, model in models.items():
        model.save_pretrained(root / kind)
    return root, models


def _ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind, args, expected", [
    ("classifier", [], BCTConfig()),
    ("encoder", ["--weight-bits", "4", "--act-bits", "8"], BCTConfig.uniform(4, 8)),
])
def test_compress_saves_a_folder_that_loads_with_identical_outputs(bert_dirs, tmp_path, kind, args, expected):
    root, models = bert_dirs
    out = tmp_path / "bct"
    result = run("compress", root / kind, "--method", "bct", *args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "overall:" in result.output and "linear_weights" in result.output  # the compression report
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["method"] == "bct"
    assert BCTConfig.from_dict(config["quantization_config"]["bct"]) == expected
    assert json.loads((out / "compression_report.json").read_text())["total"]["bytes"] > 0
    loaded = effllm.load(out).eval()
    assert type(loaded) is type(models[kind])  # the checkpoint's own architecture (classifier head kept)
    reference = compress(copy.deepcopy(models[kind]), expected)
    with torch.no_grad():
        got, want = loaded(_ids()), reference(_ids())
    key = "logits" if kind == "classifier" else "last_hidden_state"
    assert torch.equal(got[key], want[key])


def test_config_file_and_options(bert_dirs, tmp_path):
    root, _ = bert_dirs
    config_file = tmp_path / "bct.yaml"
    config_file.write_text("linear_weights: {bits: 6, blocksize: 32}\nactivations: {bits: null}\n")
    result = run("compress", root / "classifier", "--config", config_file, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    saved = BCTConfig.from_dict(json.loads((tmp_path / "a" / "bct_config.json").read_text()))
    assert saved.linear_weights.bits == 6 and saved.linear_weights.blocksize == 32 and saved.activations.bits is None
    result = run("compress", root / "classifier", "--weight-bits", "none", "--blocksize", "16", "--act-blocksize",
                 "32", "--scale-format", "float32", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    saved = BCTConfig.from_dict(json.loads((tmp_path / "b" / "bct_config.json").read_text()))
    assert saved.linear_weights.bits is None and saved.embeddings.blocksize == 16
    assert saved.residual.blocksize == 32 and saved.linear_weights.scale_format == "float32"
    loaded = effllm.load(tmp_path / "b")
    assert isinstance(loaded.classifier, BCTLinear) and isinstance(loaded.classifier.weight_packed, torch.nn.Parameter)


def test_llama_with_tied_head_through_the_cli(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
                     ).save_pretrained(tmp_path / "llama")
    result = run("compress", tmp_path / "llama", "--weight-bits", "4", "--out", tmp_path / "bct")
    assert result.exit_code == 0, result.output
    loaded = effllm.load(tmp_path / "bct")
    assert isinstance(loaded.lm_head, BCTTiedLinear)
    # a model folder with a tokenizer keeps it
    result = run("compress", tiny_model_dir / "model", "--out", tmp_path / "with-tokenizer")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "with-tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--config", "CONFIG", "--weight-bits", "4"], "either --config or --weight-bits"),
    (["--config", "CONFIG"], "unknown keys ['bitz']"),
    (["--weight-bits", "9"], "bits must be an integer in 2..8"),
    (["--weight-bits", "four"], "--weight-bits 'four'"),
    (["--blocksize", "0"], "blocksize must be a positive integer"),
])
def test_bad_input_is_one_line_error_and_no_output(bert_dirs, tmp_path, args, message):
    root, _ = bert_dirs
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("linear_weights: {bitz: 4}\n")
    out = tmp_path / "bct"
    result = run("compress", root / "classifier", *[config_file if a == "CONFIG" else a for a in args], "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_unsupported_architecture_and_existing_output(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(
        tmp_path / "gpt2")
    result = run("compress", tmp_path / "gpt2", "--out", tmp_path / "bct")
    assert result.exit_code == 2 and "BCT does not support GPT2LMHeadModel (model_type 'gpt2')" in result.output
    assert not (tmp_path / "bct").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bct")]  # no staging folder left behind
    (tmp_path / "taken").mkdir()
    result = run("compress", tmp_path / "gpt2", "--out", tmp_path / "taken")
    assert result.exit_code == 2 and "already exists" in result.output


PARAGRAPHS = "\n\n".join(f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3)
                         for i in range(12))


def test_calibrated_rounding_through_the_cli(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm.compress.bct.calibration_data import calibration_batches

    (tmp_path / "calib.txt").write_text(PARAGRAPHS)
    model_dir = tiny_model_dir / "model"
    args = ["--weight-bits", "4", "--rounding", "gptq", "--calib", tmp_path / "calib.txt", "--nsamples", 8,
            "--seqlen", 48]
    result = run("compress", model_dir, *args, "--out", tmp_path / "gptq")
    assert result.exit_code == 0, result.output
    config = BCTConfig.from_dict(json.loads((tmp_path / "gptq" / "config.json").read_text())
                                 ["quantization_config"]["bct"])
    assert config.linear_weights.rounding == "gptq"
    # the same as compressing in process with the same calibration batches
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = calibration_batches(tokenizer, tmp_path / "calib.txt", 8, 48)
    reference = compress(AutoModelForCausalLM.from_pretrained(model_dir).eval(), config, calib=batches)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(effllm.load(tmp_path / "gptq")(ids).logits, reference(ids).logits)
        nearest = compress(AutoModelForCausalLM.from_pretrained(model_dir).eval(), BCTConfig.uniform(4, 8))
        assert not torch.equal(nearest(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("args, message", [
    (["--rounding", "gptq"], "--rounding gptq needs calibration text"),
    (["--calib", "CALIB"], "--calib is only used by --rounding gptq"),
    (["--rounding", "gptq", "--calib", "MISSING"], "does not exist"),
])
def test_calibration_options_are_checked_before_any_work(bert_dirs, tmp_path, args, message):
    root, _ = bert_dirs
    (tmp_path / "calib.txt").write_text(PARAGRAPHS)
    paths = {"CALIB": tmp_path / "calib.txt", "MISSING": tmp_path / "nothing.txt"}
    out = tmp_path / "bct"
    result = run("compress", root / "classifier", "--weight-bits", "4", *[paths.get(a, a) for a in args],
                 "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()
