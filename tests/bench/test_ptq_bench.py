"""The PTQ benchmark's runner on a tiny local model: rows for every asked pair, none for pairs already done."""

from effllm.bench.ptq import PTQBenchConfig, run


def _config(tiny_model_dir, **overrides):
    text = str(tiny_model_dir / "text.txt")
    return PTQBenchConfig(model=str(tiny_model_dir / "model"), calib=text, nsamples=2, calib_seqlen=32,
                          eval_text=text, eval_max_chars=4000, eval_seqlens=(64,), settings=("W4A16 g64",),
                          methods=("rtn",), **overrides)


def test_rows_measure_perplexity_bits_and_time(tiny_model_dir):
    seen = []
    rows = run(_config(tiny_model_dir), progress=False, on_row=seen.append)
    assert [(r["method"], r["setting"]) for r in rows] == [("fp32", "fp32"), ("rtn", "W4A16 g64")]
    assert seen == rows
    fp32, rtn = rows
    assert fp32["bits_per_weight"] == 32.0
    # 4-bit codes plus one fp16 scale and zero per 64 weights
    assert 4.0 < rtn["bits_per_weight"] < 5.0
    assert rtn["ppl@64"] != fp32["ppl@64"] and rtn["ppl@64"] > 1.0
    assert rtn["seconds"] >= 0 and rtn["peak_rss_gb"] > 0


def test_pairs_already_done_are_not_measured_again(tiny_model_dir):
    rows = run(_config(tiny_model_dir), progress=False, done=frozenset({("fp32", "fp32"), ("rtn", "W4A16 g64")}))
    assert rows == []
    rows = run(_config(tiny_model_dir), progress=False, done=frozenset({("fp32", "fp32")}))
    assert [(r["method"], r["setting"]) for r in rows] == [("rtn", "W4A16 g64")]


def _bench_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ptq.py"
    spec = importlib.util.spec_from_file_location("bench_ptq_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method, setting, ppl, seconds=10.0):
    return {"method": method, "setting": setting, "ppl@512": ppl, "seconds": seconds}


def test_targets_are_judged_from_the_rows():
    bench = _bench_script()
    rows = [_row("fp32", "fp32", 10.0), _row("rtn", "W4A16 g64", 14.0), _row("gptq", "W4A16 g64", 12.0),
            _row("gptq (llm-compressor)", "W4A16 g64", 11.5), _row("cbq", "W4A16 g64", 10.5, seconds=2000.0),
            _row("rtn", "W3A16 g64", 30.0), _row("gptq", "W3A16 g64", 20.0), _row("cbq", "W3A16 g64", 21.0)]
    lines = "\n".join(bench.target_lines(rows))
    assert "| W4A16 g64: CBQ < GPTQ < RTN | 10.50 / 12.00 / 14.00 | yes |" in lines
    assert "| W3A16 g64: CBQ < GPTQ < RTN | 21.00 / 20.00 / 30.00 | no |" in lines
    assert "| W4A16 g64: effllm GPTQ <= llm-compressor GPTQ | 12.00 vs 11.50 | no |" in lines
    assert "| CBQ W4A16 g64 within 1.08x of fp32 | 1.050x | yes |" in lines
    assert "| CBQ W3A16 g64 within 1.5x of fp32 | 2.100x | no |" in lines
    assert "33.3 min at most | no |" in lines
    assert "W2A16" not in lines  # nothing measured there: no verdict
    assert bench.target_lines([_row("fp32", "fp32", 10.0)]) == []


def test_llm_compressor_rows_sort_before_ours():
    bench = _bench_script()
    rows = [_row("cbq", "W4A16 g64", 1), _row("gptq", "W4A16 g64", 1), _row("gptq (llm-compressor)", "W4A16 g64", 1),
            _row("fp32", "fp32", 1)]
    assert [r["method"] for r in sorted(rows, key=bench.row_order)] == ["fp32", "gptq (llm-compressor)", "gptq",
                                                                          "cbq"]
