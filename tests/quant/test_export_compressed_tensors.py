"""compressed-tensors export: plain transformers, in a process that never imports effllm, loads the folder with
effllm's exact dequantized weights and the same logits; bad cases fail cleanly and leave no folder.

One subprocess loads every exported folder (transformers' import dominates its cost) through both of
transformers' compressed-tensors paths and reports which one ran: "packed" (the default ``from_pretrained``:
weights stay packed until a forward pre-hook decompresses them) and "dequantize"
(``CompressedTensorsConfig(dequantize=True)``: decompressed while loading).
"""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

pytest.importorskip("compressed_tensors")  # the `export` extra (installed by `dev`)

import effllm  # noqa: E402
from effllm.cli import main  # noqa: E402
from effllm.ptq.gptq import GPTQ  # noqa: E402
from effllm.ptq.rtn import RTN  # noqa: E402
from effllm.ptq.runner import quantize_blocks  # noqa: E402
from effllm.quant.export_compressed_tensors import export_compressed_tensors  # noqa: E402
from effllm.quant.quant_linear import QuantLinear  # noqa: E402
from effllm.quant.weight_quant import WeightQuantSpec  # noqa: E402

# name: (method, bits, group_size, symmetric, dtype): RTN and GPTQ at W4 g32 and W8 per-channel, symmetric and
# asymmetric grids both covered; then widths vLLM does not serve (3, 2) and a half-precision model.
CASES = {
    "rtn-w4g32-asym": ("rtn", 4, 32, False, torch.float32),
    "rtn-w8ch-sym": ("rtn", 8, None, True, torch.float32),
    "gptq-w4g32-sym": ("gptq", 4, 32, True, torch.float32),
    "gptq-w8ch-asym": ("gptq", 8, None, False, torch.float32),
    "rtn-w3g32-sym": ("rtn", 3, 32, True, torch.float32),
    "rtn-w2g16-asym": ("rtn", 2, 16, False, torch.float32),
    "gptq-w4g32-asym-bf16": ("gptq", 4, 32, False, torch.bfloat16),
}
SAMPLE_LAYER = "model.layers.0.self_attn.q_proj"

LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

jobs = json.loads(open(sys.argv[1]).read())
ids = torch.load(sys.argv[2])
results = {}
for job in jobs:
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if job["path"] == "dequantize" else {}
    model = AutoModelForCausalLM.from_pretrained(job["folder"], **kwargs).eval()
    layer = model.get_submodule(job["sample"])
    loaded = sorted(name for name, _ in layer.named_parameters())
    with torch.no_grad():
        logits = model(ids).logits
    results[job["key"]] = dict(
        loaded_params=loaded, forward_params=sorted(name for name, _ in layer.named_parameters()),
        layer_class=type(layer).__name__, status=str(getattr(layer, "quantization_status", None)),
        dtype=str(model.dtype), logits=logits,
        weights={name: model.get_submodule(name).weight.detach().clone() for name in job["layers"]})
results["modules"] = sorted(m for m in ("effllm", "compressed_tensors") if m in sys.modules)
torch.save(results, sys.argv[3])
"""


def quantized_model(model_dir, method, bits, group_size, symmetric, dtype):
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    calib = torch.randint(0, model.config.vocab_size, (4, 32))
    algorithm = GPTQ() if method == "gptq" else RTN()
    quantize_blocks(model, calib, WeightQuantSpec(bits, group_size, symmetric), algorithm, progress=False)
    return model


def quant_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory):
    """Every case quantized, its effllm logits, and its compressed-tensors folder; plus one folder from the CLI
    (RTN W4 g32, asymmetric) beside its effllm-format twin."""
    root = tmp_path_factory.mktemp("ct")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    built = {}
    for name, case in CASES.items():
        model = quantized_model(tiny_model_dir / "model", *case)
        with torch.no_grad():
            logits = model(ids).logits
        folder = export_compressed_tensors(model, root / name)
        with torch.no_grad():
            after = model(ids).logits
        built[name] = dict(model=model, logits=logits, logits_after_export=after, folder=folder, case=case)

    common = ("quantize", tiny_model_dir / "model", "--method", "rtn", "--bits", "4", "--group-size", "32")
    cli = {fmt: run_cli(*common, "--format", fmt, "--out", root / f"cli-{fmt}")
           for fmt in ("compressed-tensors", "effllm")}
    # an effllm folder, loaded back through effllm's transformers quantizer, exports too
    twin = effllm.load(root / "cli-effllm").eval()
    with torch.no_grad():
        twin_logits = twin(ids).logits
    export_compressed_tensors(twin, root / "from-effllm-folder")
    return dict(root=root, ids=ids, built=built, cli=cli, twin=twin, twin_logits=twin_logits)


@pytest.fixture(scope="module")
def loaded(exports):
    """Load every folder in a fresh process that never imports effllm."""
    root, jobs = exports["root"], []
    for name, entry in exports["built"].items():
        paths = ("packed", "dequantize") if entry["case"][3] else ("dequantize",)
        for path in paths:
            jobs.append(dict(key=f"{name}/{path}", folder=str(entry["folder"]), path=path, sample=SAMPLE_LAYER,
                             layers=sorted(quant_layers(entry["model"]))))
    for key, folder in (("cli", "cli-compressed-tensors"), ("from-effllm-folder", "from-effllm-folder")):
        jobs.append(dict(key=f"{key}/dequantize", folder=str(root / folder), path="dequantize", sample=SAMPLE_LAYER,
                         layers=[]))
    (root / "jobs.json").write_text(json.dumps(jobs))
    torch.save(exports["ids"], root / "ids.pt")
    (root / "loader.py").write_text(LOADER)
    result = subprocess.run([sys.executable, str(root / "loader.py"), str(root / "jobs.json"), str(root / "ids.pt"),
                             str(root / "results.pt")], capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(root / "results.pt")


def test_loader_process_never_imported_effllm(loaded):
    assert loaded["modules"] == ["compressed_tensors"]


@pytest.mark.parametrize("name", CASES)
def test_folder_is_compressed_tensors_pack_quantized(exports, name):
    _, bits, group_size, symmetric, _ = CASES[name]
    folder = exports["built"][name]["folder"]
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert qconfig["ignore"] == ["lm_head"]
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == bits and weights["symmetric"] == symmetric and weights["type"] == "int"
    assert weights["strategy"] == ("channel" if group_size is None else "group")
    assert weights.get("group_size") == group_size
    from safetensors import safe_open

    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as tensors:
        keys = set(tensors.keys())
        assert tensors.get_slice(f"{SAMPLE_LAYER}.weight_packed").get_dtype() == "I32"
        scale_dtype = tensors.get_slice(f"{SAMPLE_LAYER}.weight_scale").get_dtype()
    assert f"{SAMPLE_LAYER}.weight" not in keys
    assert (f"{SAMPLE_LAYER}.weight_zero_point" in keys) == (not symmetric)  # symmetric: zero point implied
    assert scale_dtype == {torch.float32: "F32", torch.bfloat16: "BF16"}[CASES[name][4]]


@pytest.mark.parametrize("name", CASES)
def test_transformers_dequantizes_to_effllm_weights_and_logits(exports, loaded, name):
    entry = exports["built"][name]
    for path in ("packed", "dequantize") if entry["case"][3] else ("dequantize",):
        got = loaded[f"{name}/{path}"]
        for layer_name, layer in quant_layers(entry["model"]).items():
            assert torch.equal(got["weights"][layer_name], layer.dequantized_weight()), (path, layer_name)
        expected = entry["logits"]
        assert got["logits"].dtype == expected.dtype
        # identical weights; what is left is effllm's matmul kernel vs F.linear (order of summation, and in
        # bf16 the rounding of the output: one bf16 step near 1 is 0.0078)
        tolerance = 1e-4 if expected.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got["logits"], expected, rtol=tolerance, atol=tolerance, msg=f"{name}/{path}")


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[3]])
def test_default_load_keeps_weights_packed_until_the_first_forward(loaded, name):
    got = loaded[f"{name}/packed"]
    assert got["layer_class"] == "Linear"
    assert got["loaded_params"] == ["weight_packed", "weight_scale", "weight_shape"]
    assert got["forward_params"] == ["weight", "weight_scale", "weight_shape"]
    assert got["status"] == "QuantizationStatus.DECOMPRESSED"


@pytest.mark.parametrize("name", CASES)
def test_dequantize_load_gives_plain_linears(loaded, name):
    got = loaded[f"{name}/dequantize"]
    assert got["loaded_params"] == ["weight"] and got["status"] == "None"


def test_export_leaves_the_effllm_model_as_it_was(exports):
    for entry in exports["built"].values():
        model = entry["model"]
        assert isinstance(model.get_submodule(SAMPLE_LAYER), QuantLinear)
        assert not hasattr(model, "ct_decompress_hook") and model.hf_quantizer is None
        assert torch.equal(entry["logits_after_export"], entry["logits"])


def test_cli_format_compressed_tensors(exports, loaded):
    cli, root = exports["cli"], exports["root"]
    for fmt, result in cli.items():
        assert result.exit_code == 0, (fmt, result.output)
    assert "CompressedTensorsConfig(dequantize=True)" in cli["compressed-tensors"].output  # asymmetric hint
    folder = root / "cli-compressed-tensors"
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    recipe = json.loads((folder / "effllm_quantization.json").read_text())
    assert recipe["method"] == "rtn" and recipe["bits"] == 4 and recipe["group_size"] == 32
    assert (folder / "tokenizer.json").is_file()
    assert not (root / "cli-compressed-tensors.checkpoint").exists()
    torch.testing.assert_close(loaded["cli/dequantize"]["logits"], exports["twin_logits"], rtol=1e-4, atol=1e-4)


def test_folder_loaded_by_effllm_exports_with_the_same_logits(exports, loaded):
    got = loaded["from-effllm-folder/dequantize"]
    torch.testing.assert_close(got["logits"], exports["twin_logits"], rtol=1e-4, atol=1e-4)
    qconfig = json.loads((exports["root"] / "from-effllm-folder" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"  # effllm's own quantization_config left behind
    twin = exports["twin"]  # and given back to the model afterwards
    assert twin.hf_quantizer is not None and twin.config.quantization_config.quant_method == "effllm"
    assert isinstance(twin.get_submodule(SAMPLE_LAYER), QuantLinear)


def test_cli_refuses_activation_quantization_before_any_work(tmp_path):
    # MODEL does not exist: the export check must answer before the model is even looked at
    out = tmp_path / "q"
    result = run_cli("quantize", tmp_path / "no-such-model", "--act-bits", "8", "--format", "compressed-tensors",
                     "--out", out)
    assert result.exit_code == 2, result.output
    assert "Error: compressed-tensors export is weight-only" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_names_the_extra_when_compressed_tensors_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # makes `import compressed_tensors` fail
    result = run_cli("quantize", tmp_path / "no-such-model", "--format", "compressed-tensors", "--out",
                     tmp_path / "q")
    assert result.exit_code == 2 and "effllm[export]" in result.output
    assert list(tmp_path.iterdir()) == []


def small_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def small_rtn_model():
    model = small_llama()
    quantize_blocks(model, torch.randint(0, 64, (2, 8)), WeightQuantSpec(4, 16), RTN(), progress=False)
    return model


def test_unquantized_model_is_refused(tmp_path):
    model = small_llama()
    with pytest.raises(ValueError, match="no QuantLinear"):
        export_compressed_tensors(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_zero_point_outside_the_grid_is_refused(tmp_path):
    model = small_rtn_model()
    model.get_submodule(SAMPLE_LAYER).zeros[0, 0] = 16  # 4-bit zero points live in 0..15
    with pytest.raises(ValueError, match="zero points above 15"):
        export_compressed_tensors(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
    assert isinstance(model.get_submodule(SAMPLE_LAYER), QuantLinear)


def test_failed_save_leaves_no_output_and_restores_the_model(tmp_path, monkeypatch):
    model = small_rtn_model()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        before = model(ids).logits

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export_compressed_tensors(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
    assert all(isinstance(model.get_submodule(name), QuantLinear) for name in quant_layers(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "q").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_compressed_tensors(small_rtn_model(), tmp_path / "q")
