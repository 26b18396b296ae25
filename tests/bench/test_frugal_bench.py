"""bench_frugal on a tiny Llama and a tiny corpus: every candidate runs, targets are judged from the figures, and
an interrupted benchmark resumes from its progress file without training the finished runs again."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_frugal.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_frugal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def corpus(tmp_path):
    text = ("The quick brown fox jumps over the lazy dog. " * 200).encode()
    (tmp_path / "train.txt").write_bytes(text)
    (tmp_path / "valid.txt").write_bytes(text[::-1])
    return tmp_path


def tiny(bench, steps=2):
    return bench.Settings(steps=steps, eval_every=1, batch_size=2, seq_len=16, train_bytes=5000, valid_batches=2,
                          hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, update_gap=2)


def test_every_candidate_runs_and_targets_follow_the_figures(bench, corpus):
    results = bench.run_all(tiny(bench), corpus)
    runs = results["runs"]
    assert list(runs) == list(bench.candidates(tiny(bench)))
    for run in runs.values():
        assert [step for step, _ in run["valid_curve"]] == [0, 1, 2]
        assert run["state_bytes"] > 0 and run["optimizer_step_ms_best"] > 0
    assert runs[bench.FRUGAL_025_8BIT]["state_bytes"] < runs[bench.FRUGAL_025]["state_bytes"] \
        < runs[bench.ADAMW]["state_bytes"]
    for target in results["targets"]:
        if "within" in target["target"]:
            label = target["target"].split(":")[0]
            assert target["met"] == (runs[label]["valid_vs_adamw"] <= bench.TARGET_LOSS_GAP)
    text = bench.markdown(results)
    assert "2.340" in text and "ours minus the reference's" in text  # the reference's figures beside ours


def test_an_interrupted_run_resumes_from_its_progress_file(bench, corpus, tmp_path, monkeypatch):
    progress = tmp_path / "progress.json"
    s = tiny(bench)
    bench.run_all(s, corpus, only=[bench.ADAMW], progress=progress)
    saved = json.loads(progress.read_text())
    assert list(saved["runs"]) == [bench.ADAMW]

    trained = []
    original = bench.train_one
    monkeypatch.setattr(bench, "train_one", lambda make, *args: trained.append(make) or original(make, *args))
    results = bench.run_all(s, corpus, only=[bench.ADAMW, bench.FRUGAL_0], progress=progress)
    assert len(trained) == 1  # only the run not yet done
    assert results["runs"][bench.ADAMW]["valid_curve"] == saved["runs"][bench.ADAMW]["valid_curve"]
    assert list(json.loads(progress.read_text())["runs"]) == [bench.ADAMW, bench.FRUGAL_0]

    with pytest.raises(SystemExit, match="other settings"):
        bench.run_all(tiny(bench, steps=3), corpus, only=[bench.ADAMW], progress=progress)


FAKE_REFERENCE = '''
import torch
from torch.optim.optimizer import _dispatch_sqrt  # as the reference does: the bench must provide it


def prepare_proj_params(model):
    projected = [m.weight for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ("attn" in name or "mlp" in name)]
    ids = {id(p) for p in projected}
    return [{"params": [p for p in model.parameters() if id(p) not in ids], "is_proj_params": False},
            {"params": projected, "is_proj_params": True}]


class GaloreAdamW(torch.optim.AdamW):
    def __init__(self, params, lr, weight_decay, no_deprecation_warning=False, **options):
        assert _dispatch_sqrt(4.0) == 2.0
        super().__init__([{"params": group["params"]} for group in params], lr=lr, weight_decay=weight_decay)


BlockAdamW = GaloreAdamW
'''


def test_reference_code_runs_beside_ours_and_keeps_the_other_runs(bench, corpus, tmp_path):
    """--reference-code with a stand-in for the reference's frugal/ package (the real one is not needed)."""
    package = tmp_path / "ref" / "frugal"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_REFERENCE)
    s = tiny(bench)
    results_file, doc = tmp_path / "frugal.json", tmp_path / "frugal.md"
    earlier = bench.run_all(s, corpus, only=[bench.FRUGAL_025, bench.ADAMW, "AdamW8bit"])
    results_file.write_text(json.dumps(earlier))
    args = bench.argparse.Namespace(reference_code=package.parent, json=results_file, frugal_doc=doc, corpus=corpus,
                                    only=[bench.FRUGAL_025, bench.REF_SVD, bench.REF_SVD_OUR_SIDE], retrain=False,
                                    no_docs=False, progress=tmp_path / "progress.json")
    try:
        assert bench.run_reference(args, s) == 0
    finally:
        sys.modules.pop("frugal", None)
    saved = json.loads(results_file.read_text())
    assert list(saved["runs"]) == list(earlier["runs"])  # the full run's figures are kept
    section = saved["reference_comparison"]
    assert section["taken_from_earlier_runs"] == [bench.FRUGAL_025]
    assert [pair["reference"] for pair in section["comparison"]["pairs"]] == [bench.REF_SVD, bench.REF_SVD_OUR_SIDE]
    assert [n["b"] for n in section["comparison"]["noise"]] == ["AdamW8bit"]
    assert "Side by side with the reference code" in doc.read_text()
    assert not (tmp_path / "progress.json").exists()
