"""The shared benchmark harness and the optimizer benchmark, on sizes small enough to run in seconds."""

from __future__ import annotations

import json
import math

import pytest

from effllm.bench import harness, optim


def test_best_time_takes_the_fastest_run_and_respects_the_budget():
    durations = iter([0.0, 0.03, 0.01, 0.02])  # warm-up, then three timed runs

    def step():
        import time

        time.sleep(next(durations))

    best, runs = harness.best_time(step, repeats=3, warmup=1)
    assert runs == 3 and 0.01 <= best < 0.02
    best, runs = harness.best_time(lambda: None, repeats=1000, warmup=0, budget_s=0.0)
    assert runs == 1


def test_markdown_sections_are_replaced_in_place_and_others_kept(tmp_path):
    doc = tmp_path / "benchmarks.md"
    harness.update_markdown_section(doc, "optim", "first optim")
    harness.update_markdown_section(doc, "other", "other body")
    harness.update_markdown_section(doc, "optim", "second optim")
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "second optim" in text and "first optim" not in text and "other body" in text
    assert text.index("second optim") < text.index("other body")  # the section stayed where it was
    assert text.count("<!-- bench:optim:begin -->") == 1


def test_a_section_without_its_end_marker_is_an_error(tmp_path):
    doc = tmp_path / "broken.md"
    doc.write_text("<!-- bench:optim:begin -->\nhalf a section\n")
    with pytest.raises(ValueError, match="no end marker"):
        harness.update_markdown_section(doc, "optim", "body")


def test_machine_names_cpu_cores_and_torch():
    info = harness.machine()
    assert info["cpu"] and info["logical_cores"] >= 1 and info["torch_threads"] >= 1 and info["torch"]
    assert info["torch"] in harness.machine_line(info)


def test_param_shapes_are_transformer_blocks_of_about_the_requested_size():
    for size in (1_000_000, 16_000_000, 100_000_000):
        shapes = optim.param_shapes(size)
        count = sum(math.prod(shape) for shape in shapes)
        assert abs(count - size) / size < 0.05
        assert all(dim % optim.MATRIX_ALIGN == 0 for shape in shapes for dim in shape)


def test_sizes_parse_counts_and_model_names_and_name_a_bad_item():
    assert optim.parse_sizes("1M, 16k,2500,smollm2-135M") == [1_000_000, 16_000, 2500, "smollm2-135m"]
    for bad in ("1X", "0", "-1M", "gpt9", ""):
        with pytest.raises(ValueError, match="is not a size"):
            optim.parse_sizes(bad)


def test_smollm2_shapes_are_those_of_the_model_built_from_its_config():
    """The model (built on the meta device, no weights) from SmolLM2-135M's published config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = sorted(tuple(p.shape) for p in model.parameters())
    assert sorted(optim.param_shapes("smollm2-135m")) == expected
    assert sum(math.prod(shape) for shape in expected) == 134_515_008


def test_a_named_size_is_labelled_with_its_model_in_the_table(tmp_path):
    rows = [{"size": "smollm2-135m", "params": 134_515_008, "optimizer": label, "step_ms": 10.0, "timed_steps": 3,
             "state_bytes_per_param": 2.03, "ratio_to_fused": 1.5, "best_ratio_to_fused": 1.5}
            for label in (optim.FUSED, optim.EFFLLM_8BIT)]
    section = optim.markdown(rows, harness.machine(), "pytest")
    assert "| 134.5M (smollm2-135m shapes) |" in section
    assert "met at 134.5M (smollm2-135m shapes)" in section


def test_optim_benchmark_runs_and_writes_json_csv_and_its_section(tmp_path, monkeypatch):
    monkeypatch.setattr(optim, "WARMUP_STEPS", 1)
    rows = optim.run([200_000], repeats=1, include_bnb=False)
    labels = {row["optimizer"] for row in rows}
    assert {"torch AdamW (fused)", "effllm AdamW8bit"} <= labels
    own = next(row for row in rows if row["optimizer"] == "effllm AdamW8bit")
    fused = next(row for row in rows if row["optimizer"] == "torch AdamW (fused)")
    assert own["step_ms"] > 0 and fused["ratio_to_fused"] == 1.0
    assert 2.0 < own["state_bytes_per_param"] < 2.1  # codes and absmax; the small norm vectors keep fp32
    assert fused["state_bytes_per_param"] >= 8.0
    json_path, doc = tmp_path / "optim.json", tmp_path / "benchmarks.md"
    optim.write(rows, str(json_path), str(doc), command="pytest")
    payload = json.loads(json_path.read_text())
    assert payload["rows"] == rows and payload["machine"]["cpu"]
    assert json_path.with_suffix(".csv").read_text().startswith("size,params,optimizer")
    assert "| parameters |" in doc.read_text() and "`pytest`" in doc.read_text()


def _gpu_rows():
    labels = ("torch AdamW (fused)", optim.BNB, "effllm AdamW8bit")
    rows = []
    for params, times in ((1_000_000, (0.1, 0.4, 0.5)), (100_000_000, (0.9, 3.1, 1.3))):
        for label, ms in zip(labels, times):
            rows.append({"size": params, "params": params, "optimizer": label, "step_ms": ms, "timed_steps": 20,
                         "state_bytes_per_param": 2.03, "ratio_to_fused": round(ms / times[0], 3)})
    return rows


def test_cuda_figures_get_their_own_section_and_the_verdict_against_bitsandbytes(tmp_path):
    doc = tmp_path / "benchmarks.md"
    optim.write(_gpu_rows(), str(tmp_path / "optim_cuda.json"), str(doc), command="pytest", device="cuda")
    optim.write(_gpu_rows(), None, str(doc), command="pytest", device="cpu")
    text = doc.read_text()
    assert "<!-- bench:optim_cuda:begin -->" in text and "<!-- bench:optim:begin -->" in text
    cuda = text[text.index("<!-- bench:optim_cuda:begin -->"):text.index("<!-- bench:optim_cuda:end -->")]
    assert "faster than bitsandbytes: met at 100.0M; not met at 1.0M" in cuda
    assert "| 1.0M | 0.10 | 0.40 | 0.50 |" in cuda  # sub-millisecond GPU times keep two decimals
    assert json.loads((tmp_path / "optim_cuda.json").read_text())["device"] == "cuda"


def test_gpu_roofline_bytes_and_verdicts():
    from effllm.bench import optim_gpu

    assert optim_gpu.step_bytes(4, 4, 4, None) == 28  # fp32 AdamW: param r+w, grad, two states r+w
    assert optim_gpu.step_bytes(4, 4, 1, 256) == 16 + 2 * 2 * 4 / 256
    assert optim_gpu.step_bytes(2, 2, 1, 256) == 10 + 2 * 2 * 4 / 256
    result = {"copy_gb_per_s": 4000.0, "numel": 1 << 28, "rows": [
        {"case": optim_gpu.EFFLLM_8BIT, "ms": 2.0, "bytes_per_element": 16.06, "gb_per_s": 2000, "of_bound": 0.5},
        {"case": optim_gpu.BNB, "ms": 6.0, "bytes_per_element": 16.06, "gb_per_s": 700, "of_bound": 0.17},
        {"case": "torch AdamW (fused), bf16 params", "error": "RuntimeError: no"}]}
    text = optim_gpu.markdown(result, {"gpu": "Some GPU", "cpu": "x", "logical_cores": 2, "torch_threads": 2,
                                       "torch": "2"}, "pytest")
    assert "at ≥ 80% of the bandwidth bound: NOT met (50%)" in text
    assert "faster than bitsandbytes: met (3.00× bitsandbytes' speed)" in text
    assert "| torch AdamW (fused), bf16 params | RuntimeError: no |" in text


def test_ratio_to_fused_is_the_median_of_ratios_within_rounds():
    # Round 2 was a busy spell for both; the best times (1.0 and 1.0) come from different rounds.
    mine, fused = [2.0, 6.0, 1.0, 2.2, None], [1.0, 3.0, 0.4, 1.1, 1.0]
    assert optim._median_ratio(mine, fused) == 2.0  # ratios 2.0, 2.0, 2.5, 2.0; the sat-out round is skipped
    assert optim._median_ratio([None], [1.0]) is None


def test_the_plot_is_written_and_linked_from_its_section(tmp_path):
    rows = [{"size": size, "params": size, "optimizer": label, "step_ms": ms, "timed_steps": 3,
             "state_bytes_per_param": 2.03, "ratio_to_fused": ms / fused}
            for size, fused in ((1_000_000, 1.0), (4_000_000, 3.0))
            for label, ms in ((optim.FUSED, fused), (optim.EFFLLM_8BIT, 1.6 * fused))]
    doc = tmp_path / "benchmarks.md"
    doc.write_text("<!-- bench:optim:begin -->\n<!-- bench:optim:end -->\n")
    optim.write(rows, None, str(doc), command="pytest", png_path=str(tmp_path / "step.png"))
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plot: [step.png](step.png)." in doc.read_text()
    assert not list(tmp_path.glob("*.tmp.png"))  # written whole, then renamed


def _process_rows(ratio_1m, ratio_4m):
    rows = []
    for params, ratio in ((1_000_000, ratio_1m), (4_000_000, ratio_4m)):
        for label, ms in ((optim.FUSED, 1.0), (optim.EFFLLM_8BIT, ratio)):
            rows.append({"size": params, "params": params, "optimizer": label, "step_ms": ms, "timed_steps": 3,
                         "state_bytes_per_param": 2.03, "ratio_to_fused": ms, "best_ratio_to_fused": ms})
        rows.append({"size": params, "params": params, "optimizer": optim.BNB, "error": "ImportError: no"})
    return rows


def test_processes_combine_as_medians_with_the_range_and_the_slowest_process_named():
    combined = optim.combine_processes([_process_rows(1.5, 2.2), _process_rows(1.7, 1.6), _process_rows(1.6, 1.8)])
    own = {row["params"]: row for row in combined if row["optimizer"] == optim.EFFLLM_8BIT}
    assert own[4_000_000]["ratio_to_fused"] == 1.8 and own[4_000_000]["ratio_to_fused_range"] == [1.6, 2.2]
    assert own[4_000_000]["ratio_to_fused_by_process"] == [2.2, 1.6, 1.8] and own[4_000_000]["processes"] == 3
    assert own[1_000_000]["step_ms"] == 1.6
    assert [row["error"] for row in combined if row["optimizer"] == optim.BNB] == ["ImportError: no"] * 2
    section = optim.markdown(combined, harness.machine(), "pytest")
    assert "| 4.0M | 1.00 | 1.80 | ImportError: no | **1.80×** | 1.60-2.20× | 1.80× |" in section
    assert "met at 1.0M, 4.0M; the slowest single process: 2.20× at 4.0M." in section
    assert optim.combine_processes([_process_rows(1.5, 2.2)]) == _process_rows(1.5, 2.2)  # one process: as is


def test_the_benchmark_runs_in_fresh_processes(monkeypatch):
    rows = optim.run_in_processes([20_000], processes=2, repeats=1, include_bnb=False, threads=1)
    own = next(row for row in rows if row["optimizer"] == optim.EFFLLM_8BIT)
    assert own["processes"] == 2 and len(own["ratio_to_fused_by_process"]) == 2
    assert own["ratio_to_fused_range"][0] <= own["ratio_to_fused"] <= own["ratio_to_fused_range"][1]
    with pytest.raises(ValueError, match="processes must be at least 1"):
        optim.run_in_processes([20_000], processes=0)
