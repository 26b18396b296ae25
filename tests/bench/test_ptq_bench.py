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
