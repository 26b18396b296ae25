"""FRUGAL against AdamW, AdamW8bit and a GaLore-style low-rank Adam on the issue's small Llama, in one run.

Every optimizer trains the same model (4 blocks, hidden 256, byte tokens of the shared corpus, 3.3M parameters)
from the same initial weights on the same batches (8 x 128, lr 1e-3, no schedule, no clipping), with a
validation loss every ``--eval-every`` steps. Reported per optimizer: final validation loss, optimizer-state
bytes (``state_bytes()`` for effllm's optimizers; ``exp_avg`` + ``exp_avg_sq`` for torch's AdamW), and step
times. On a shared, loaded machine one optimizer's run can meet more load than another's, so the optimizer step
is also timed after training, round-robin over all optimizers (each on a fresh model with one gradient), best
of ``TIMING_ROUNDS`` after a warm-up round: the figure to compare. The in-run median of a whole step (forward +
backward + optimizer) is reported too, with the load average when each run started.

Each finished run is saved to ``--progress`` (benchmarks/results/frugal.progress.json) until all are done;
rerunning the same command after an interruption resumes there (the same settings are required).

The GaLore-style baseline is the FRUGAL reference's own GaLore setting: SVD subspace of density 0.25, no
state-free update, moments kept across refreshes, lr 1e-2 with the low-rank update scaled by 0.25.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_frugal.py   # the issue's 300 steps: 1-3 hours on a
                                                                     # shared 2-core CPU, depending on its load
    python benchmarks/bench_frugal.py --steps 20 --only AdamW --no-docs   # a quick look

Writes benchmarks/results/frugal.json (curves included, so the plot can be redrawn), docs/frugal_curves.png and
the ``frugal`` section of docs/benchmarks.md: the table with the reference code's figures beside ours (issue 6
measured them with the same model, data and settings) and the targets of issue 6.

``--reference-code PATH`` (a folder holding the FRUGAL authors' ``frugal/`` package, github.com/fzmushko/FRUGAL
c7ebe4c, e.g. ``git archive HEAD frugal | tar -x -C PATH``; it is imported from there, never copied here) runs the
reference optimizer in this harness next to ours, for the three Frugal settings (SVD rho=0.25, blocks rho=0.25,
rho=0), and writes the pairwise comparison into the results file (``reference_comparison``; the other runs there
are kept) and the ``frugal-reference`` section of docs/frugal.md. Runs already in the results file with the same
settings (ours in ``runs``, the reference's in ``reference_comparison``) are not trained again (``--retrain``).
The reference imports ``_dispatch_sqrt`` from ``torch.optim.optimizer``, which current torch no longer has: it is
put back at run time (``math.sqrt`` of a number, ``Tensor.sqrt`` of a tensor, as torch had it) before the import.

    OMP_NUM_THREADS=1 python benchmarks/bench_frugal.py --reference-code /tmp/frugal_ref
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from effllm.bench.harness import machine, machine_line, markdown_table, update_markdown_section, write_json
from effllm.optim import AdamW8bit, Frugal
from effllm.train import TinyLMConfig, build_tiny_llama, evaluate_loss, load_bytes, random_batches, sequential_batches

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("EFFLLM_SHARED", REPO.parent / "shared"))
DEFAULT_JSON = REPO / "benchmarks" / "results" / "frugal.json"
DEFAULT_PNG = REPO / "docs" / "frugal_curves.png"
DEFAULT_DOC = REPO / "docs" / "benchmarks.md"
DEFAULT_PROGRESS = REPO / "benchmarks" / "results" / "frugal.progress.json"
DEFAULT_REFERENCE_PROGRESS = REPO / "benchmarks" / "results" / "frugal.reference-progress.json"
DEFAULT_FRUGAL_DOC = REPO / "docs" / "frugal.md"

ADAMW = "AdamW"
GALORE = "GaLore-style (SVD ρ=0.25, no state-free, lr 1e-2)"
FRUGAL_025 = "Frugal ρ=0.25, inner AdamW"
FRUGAL_025_8BIT = "Frugal ρ=0.25, inner AdamW8bit"
FRUGAL_BLOCKS = "Frugal blocks ρ=0.25, inner AdamW"
FRUGAL_0 = "Frugal ρ=0, inner AdamW"
# The FRUGAL reference code (github.com/fzmushko/FRUGAL, c7ebe4c) on this CPU with the same model, data and
# settings, as issue 6 reports it: (final validation loss, optimizer-state MB as it counts them).
REFERENCE = {
    ADAMW: (2.340, 26.4),
    FRUGAL_025: (2.048, 9.2),
    FRUGAL_BLOCKS: (2.297, 7.4),
    FRUGAL_0: (2.341, 1.1),
    GALORE: (2.149, 9.2),
}
# Issue 6's targets.
TARGET_LOSS_GAP = 0.02
TARGET_MEMORY_FRUGAL = 0.55
TARGET_MEMORY_FRUGAL_8BIT = 0.15
TIMING_ROUNDS = 10
# The reference code's optimizers run in this harness (--reference-code), each beside our run of the same setting.
REF_SVD = "Reference FRUGAL SVD ρ=0.25 (GaloreAdamW)"
REF_BLOCKS = "Reference FRUGAL blocks ρ=0.25 (BlockAdamW, ascending order)"
REF_BLOCKS_RANDOM = "Reference FRUGAL blocks ρ=0.25 (BlockAdamW)"  # its default order: random
REF_0 = "Reference FRUGAL ρ=0 (GaloreAdamW density 0)"
# The reference projects a square weight's columns (its proj_side "std"), ours its rows (short side first, rows
# when they are not longer): this run gives the reference our choice (its "left") for square weights only.
REF_SVD_OUR_SIDE = "Reference FRUGAL SVD ρ=0.25, square weights projected on our side"
REFERENCE_PAIRS = ((FRUGAL_025, REF_SVD), (FRUGAL_BLOCKS, REF_BLOCKS), (FRUGAL_0, REF_0),
                   (FRUGAL_025, REF_SVD_OUR_SIDE), (FRUGAL_BLOCKS, REF_BLOCKS_RANDOM))


@dataclass
class Settings:
    steps: int = 300
    eval_every: int = 25
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    galore_lr: float = 1e-2
    galore_scale: float = 0.25
    density: float = 0.25
    update_gap: int = 200
    seed: int = 0
    train_bytes: int = 4_000_000  # windows are drawn from the start of train.txt
    valid_batches: int = 8
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688

    def model_config(self) -> TinyLMConfig:
        return TinyLMConfig(hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                            intermediate_size=self.intermediate_size, max_seq_len=self.seq_len)


def load_reference(path: Path):
    """The reference's ``frugal`` package from ``path`` (the folder holding ``frugal/``, or ``frugal/`` itself),
    after putting back ``torch.optim.optimizer._dispatch_sqrt``, which it imports and current torch lacks."""
    import torch.optim.optimizer as torch_optimizer

    if not hasattr(torch_optimizer, "_dispatch_sqrt"):
        def _dispatch_sqrt(x):  # torch <= 2.4's: the reference calls it on a float (bias correction)
            return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)

        torch_optimizer._dispatch_sqrt = _dispatch_sqrt
    path = Path(path).resolve()
    root = path.parent if (path / "__init__.py").exists() and path.name == "frugal" else path
    if not (root / "frugal" / "__init__.py").exists():
        raise SystemExit(f"--reference-code {path}: no frugal/__init__.py there")
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("frugal")
    finally:
        sys.path.remove(str(root))


def reference_candidates(s: Settings, reference) -> dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    """The reference's optimizers with our runs' settings: its AdamW inside (betas 0.9/0.999, eps 1e-8, bias
    correction, as ours), weight decay 0 (its default is 0.01), the weights of its ``prepare_proj_params``
    projected (every Linear in attention and MLP: the same weights as ours), update gap 200, moments reset at
    each refresh, signSGD on the rest at the same lr. Blocks: its "ascending" order takes round(density x
    count) consecutive weights per period, which here are ours (one Llama block's 7 weights, 25% of the
    projected elements, first block 0, then block 1); its default "random" order (``torch.randperm``, seeded
    here with the run's seed) too, for comparison."""
    common = dict(lr=s.lr, weight_decay=0.0, update_gap=s.update_gap, reset_statistics=True,
                  inactive_update_rule="sign_sgd", proj_params_lr_scale=1.0, inactive_lr_scale=1.0,
                  no_deprecation_warning=True)

    def svd(density):
        return lambda m: reference.GaloreAdamW(reference.prepare_proj_params(m), density=density, proj_side="std",
                                               proj_type="svd", **common)

    def blocks(order):
        def make(m):
            torch.manual_seed(s.seed)  # "random" draws with torch.randperm
            return reference.BlockAdamW(reference.prepare_proj_params(m), density=s.density, block_order=order,
                                        **common)
        return make

    def svd_our_side(m):
        regular, projected = reference.prepare_proj_params(m)
        square = [p for p in projected["params"] if p.shape[0] == p.shape[1]]
        groups = [regular, {"params": [p for p in projected["params"] if p.shape[0] != p.shape[1]],
                            "is_proj_params": True}, {"params": square, "is_proj_params": True}]
        optimizer = reference.GaloreAdamW(groups, density=s.density, proj_side="std", proj_type="svd", **common)
        optimizer.param_groups[2]["proj_side"] = "left"  # read when its projectors are made, at the first step
        return optimizer

    return {REF_SVD: svd(s.density), REF_BLOCKS: blocks("ascending"), REF_0: svd(0.0),
            REF_SVD_OUR_SIDE: svd_our_side, REF_BLOCKS_RANDOM: blocks("random")}


def candidates(s: Settings, reference=None) -> dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    """Label -> factory(model). No weight decay anywhere (the reference's default). With ``reference`` (the
    reference's ``frugal`` package), its optimizers too (after ours)."""
    frugal = dict(lr=s.lr, update_gap=s.update_gap, projection="svd", seed=s.seed)
    # In this order (the main comparisons first), so that an interrupted run already holds them.
    extra = reference_candidates(s, reference) if reference is not None else {}
    return {
        ADAMW: lambda m: torch.optim.AdamW(m.parameters(), lr=s.lr, weight_decay=0.0),
        FRUGAL_025: lambda m: Frugal(m, density=s.density, inner="adamw", **frugal),
        GALORE: lambda m: Frugal(m, lr=s.galore_lr, density=s.density, projection="svd", update_gap=s.update_gap,
                                 state_free="none", reset_state=False, state_full_lr_scale=s.galore_scale),
        FRUGAL_025_8BIT: lambda m: Frugal(m, density=s.density, inner="adamw8bit", **frugal),
        FRUGAL_0: lambda m: Frugal(m, density=0.0, inner="adamw", **frugal),
        FRUGAL_BLOCKS: lambda m: Frugal(m, density=s.density, inner="adamw", **{**frugal, "projection": "blocks"}),
        "AdamW8bit": lambda m: AdamW8bit(m.parameters(), lr=s.lr, weight_decay=0.0),
        "Frugal ρ=0, inner AdamW8bit": lambda m: Frugal(m, density=0.0, inner="adamw8bit", **frugal),
        **extra,
    }


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """effllm's own count where it has one; else every state tensor but the step counters."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for key, value in state.items() if torch.is_tensor(value) and key != "step")


def projection_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The reference's SVD bases (``state["projector"].ortho_matrix``), which its state count leaves out."""
    total = 0
    for state in optimizer.state.values():
        matrix = getattr(state.get("projector"), "ortho_matrix", None)
        for tensor in matrix if isinstance(matrix, list) else [matrix]:
            if torch.is_tensor(tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def train_one(make_optimizer, s: Settings, train_tokens: torch.Tensor, valid: list[torch.Tensor],
              initial_valid: float) -> dict:
    load_at_start = machine().get("load_average_1m")
    model = build_tiny_llama(s.model_config(), seed=s.seed)
    optimizer = make_optimizer(model)
    curve = [(0, initial_valid)]
    losses, step_seconds, optimizer_seconds = [], [], []
    model.train()
    batches = random_batches(train_tokens, s.batch_size, s.seq_len, s.steps, seed=s.seed)
    for step, batch in enumerate(batches, start=1):
        started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        before_optimizer = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        finished = time.perf_counter()
        step_seconds.append(finished - started)
        optimizer_seconds.append(finished - before_optimizer)
        losses.append(float(loss.detach()))
        if step % s.eval_every == 0 or step == s.steps:
            curve.append((step, evaluate_loss(model, valid)))
            print(f"  step {step:4d}  train {losses[-1]:.4f}  valid {curve[-1][1]:.4f}", flush=True)
    return {
        "final_valid_loss": curve[-1][1],
        "state_bytes": state_bytes(optimizer),
        **({"projection_bytes": projection_bytes(optimizer)} if not hasattr(optimizer, "state_bytes") else {}),
        "step_s_median": statistics.median(step_seconds),
        "optimizer_step_ms_median": statistics.median(optimizer_seconds) * 1e3,
        "load_average_1m_at_start": load_at_start,
        "valid_curve": curve,
        "train_losses": losses,
    }


def time_optimizer_steps(s: Settings, labels: list[str], batch: torch.Tensor,
                         rounds: int = TIMING_ROUNDS, reference=None) -> dict[str, float]:
    """Best optimizer-step milliseconds per label, the optimizers taking turns (so load hits all alike), each
    on a fresh model with one gradient. The warm-up round takes the first step's subspace choice (one SVD per
    weight, as every update_gap steps); the timed ones are the steps in between."""
    factories = candidates(s, reference)
    prepared = {}
    for label in labels:
        model = build_tiny_llama(s.model_config(), seed=s.seed)
        model(input_ids=batch, labels=batch).loss.backward()
        prepared[label] = factories[label](model)
    best = {label: float("inf") for label in labels}
    for round_index in range(rounds + 1):
        for label, optimizer in prepared.items():
            started = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - started
            if round_index:
                best[label] = min(best[label], elapsed * 1e3)
    return best


def run_all(s: Settings, corpus: Path, only: list[str] | None = None, progress: Path | None = None,
            reference=None, known_runs: dict | None = None) -> dict:
    """Train every candidate (or those in ``only``), then time their steps round-robin. With ``progress``,
    each finished run is saved there (atomically) and runs already saved with the same settings are not
    repeated: an interrupted benchmark goes on where it stopped. ``reference``: the reference's ``frugal``
    package, whose optimizers join the candidates. ``known_runs``: runs with these settings already measured
    (label -> run), not trained again."""
    train_tokens = load_bytes(corpus / "train.txt", s.train_bytes)
    valid = sequential_batches(load_bytes(corpus / "valid.txt"), s.batch_size, s.seq_len, s.valid_batches)
    # Every run starts from the same weights, so the step-0 validation loss is measured once.
    initial_valid = evaluate_loss(build_tiny_llama(s.model_config(), seed=s.seed), valid)
    parameters = sum(p.numel() for p in build_tiny_llama(s.model_config(), seed=s.seed).parameters())
    runs = {}
    if progress is not None and progress.exists():
        saved = json.loads(progress.read_text(encoding="utf-8"))
        if saved["settings"] != asdict(s):
            raise SystemExit(f"{progress} holds runs with other settings: delete it or run with those settings")
        runs = saved["runs"]
        print(f"resuming: {', '.join(runs)} already done ({progress})", flush=True)
    for label, run in (known_runs or {}).items():
        if label not in runs:
            runs[label] = {key: value for key, value in run.items() if key != "optimizer_step_ms_best"}
            print(f"{label}: taken from an earlier run with the same settings", flush=True)
    factories = candidates(s, reference)
    labels = [label for label in factories if not only or label in only]
    for label in labels:
        if label in runs:
            continue
        print(label, flush=True)
        runs[label] = run = train_one(factories[label], s, train_tokens, valid, initial_valid)
        print(f"  -> valid {run['final_valid_loss']:.4f}  state {run['state_bytes'] / 1e6:.2f} MB  "
              f"step {run['step_s_median']:.2f} s  optimizer {run['optimizer_step_ms_median']:.1f} ms", flush=True)
        if progress is not None:
            write_json(progress, {"settings": asdict(s), "runs": runs})
    runs = {label: runs[label] for label in labels}
    timing_batch = next(iter(random_batches(train_tokens, s.batch_size, s.seq_len, 1, seed=s.seed)))
    for label, milliseconds in time_optimizer_steps(s, labels, timing_batch, reference=reference).items():
        runs[label]["optimizer_step_ms_best"] = milliseconds
    if ADAMW in runs:
        reference = runs[ADAMW]
        for run in runs.values():
            run["valid_vs_adamw"] = run["final_valid_loss"] / reference["final_valid_loss"] - 1
            run["state_vs_adamw"] = run["state_bytes"] / reference["state_bytes"]
    return {"benchmark": "frugal", "command": shlex.join(["python", "benchmarks/bench_frugal.py", *sys.argv[1:]]),
            "machine": machine(), "settings": asdict(s), "parameters": parameters, "runs": runs,
            "targets": targets(runs)}


def targets(runs: dict) -> list[dict]:
    """Issue 6's targets, each with the measured figures and whether it is met."""
    if ADAMW not in runs:
        return []
    out = []
    for label, memory_target in ((FRUGAL_025, TARGET_MEMORY_FRUGAL), (FRUGAL_025_8BIT, TARGET_MEMORY_FRUGAL_8BIT)):
        run = runs.get(label)
        if run is None:
            continue
        out.append({"target": f"{label}: valid loss within {TARGET_LOSS_GAP:.0%} of AdamW",
                    "measured": f"{run['valid_vs_adamw']:+.2%}", "met": run["valid_vs_adamw"] <= TARGET_LOSS_GAP})
        out.append({"target": f"{label}: state <= {memory_target}x AdamW's",
                    "measured": f"{run['state_vs_adamw']:.3f}x", "met": run["state_vs_adamw"] <= memory_target})
        galore = runs.get(GALORE)
        if galore is not None:
            better = (run["final_valid_loss"] < galore["final_valid_loss"]
                      and run["state_bytes"] <= galore["state_bytes"])
            out.append({"target": f"{label}: lower valid loss than GaLore-style at equal or lower memory",
                        "measured": f"{run['final_valid_loss']:.4f} vs {galore['final_valid_loss']:.4f}, "
                                    f"{run['state_bytes'] / 1e6:.2f} vs {galore['state_bytes'] / 1e6:.2f} MB",
                        "met": better})
    return out


def markdown(results: dict) -> str:
    runs = results["runs"]
    rows = []
    for label, run in runs.items():
        reference = REFERENCE.get(label)
        rows.append([label, f"{run['final_valid_loss']:.4f}", f"{run.get('valid_vs_adamw', 0):+.2%}",
                     f"{reference[0]:.3f}" if reference else "",
                     f"{run['final_valid_loss'] - reference[0]:+.3f}" if reference else "",
                     f"{run['state_bytes'] / 1e6:.2f}",
                     f"{reference[1]:.1f}" if reference else "", f"{run.get('state_vs_adamw', 0):.3f}",
                     f"{run['optimizer_step_ms_best']:.1f}", f"{run['optimizer_step_ms_median']:.1f}",
                     f"{run['step_s_median']:.2f}"])
    table = markdown_table(["optimizer", "valid loss", "vs AdamW", "reference valid loss", "ours - reference",
                            "state MB", "reference state MB", "state vs AdamW",
                            f"optimizer step ms (best of {TIMING_ROUNDS}, round-robin)",
                            "optimizer step ms (in-run median)", "whole step s (in-run median)"], rows)
    verdicts = markdown_table(["target", "measured", "met"],
                              [[t["target"], t["measured"], "yes" if t["met"] else "**no**"]
                               for t in results["targets"]])
    s = results["settings"]
    return "\n".join([
        "## FRUGAL",
        "",
        f"Written by `benchmarks/bench_frugal.py`: `{results['command'].strip()}`.",
        f"Machine: {machine_line(results['machine'])}.",
        "Curves in [frugal_curves.png](frugal_curves.png), every figure and curve in `benchmarks/results/frugal.json`.",
        "",
        f"Llama, {s['num_layers']} blocks, hidden {s['hidden_size']}, {results['parameters']:,} parameters, byte "
        f"tokens of the shared corpus; {s['steps']} steps of {s['batch_size']} x {s['seq_len']}, lr {s['lr']:g} "
        f"(GaLore-style {s['galore_lr']:g}), no schedule, no clipping; Frugal: SVD subspace (unless blocks), "
        f"update gap {s['update_gap']}, signSGD; validation on {s['valid_batches']} batches of valid.txt.",
        "",
        table,
        "",
        verdicts,
        "",
        reference_line(runs),
        "",
        "Reference figures: the FRUGAL authors' code (github.com/fzmushko/FRUGAL, commit c7ebe4c) run on this "
        "CPU with the same model, data and settings, as issue 6 reports them (final values only; its state MB "
        "are what it counts, and its SVD projections really hold about 4x more, see docs/frugal.md).",
        "",
        "Step times come from a shared 2-core machine under load from other jobs: compare the round-robin "
        "optimizer-step column; the in-run medians also reflect how loaded the machine was during each run.",
    ])


def reference_line(runs: dict) -> str:
    """How far our final losses are from the reference's, beside a noise scale: the gap between AdamW and
    AdamW8bit, the same algorithm up to state rounding (one seed each, so a rough scale, not an interval)."""
    differences = {label: runs[label]["final_valid_loss"] - REFERENCE[label][0] for label in REFERENCE if label in runs}
    if not differences:
        return ""
    parts = ", ".join(f"{label} {difference:+.3f}" for label, difference in differences.items())
    line = f"Final validation loss, ours minus the reference's: {parts}."
    if ADAMW in runs and "AdamW8bit" in runs:
        gap = runs["AdamW8bit"]["final_valid_loss"] - runs[ADAMW]["final_valid_loss"]
        line += f" For scale, AdamW8bit minus AdamW (same algorithm, rounded states): {gap:+.3f}."
    return line


def max_curve_difference(a: dict, b: dict) -> float:
    """Largest absolute difference of two runs' validation losses over their common evaluation steps."""
    other = dict(map(tuple, b["valid_curve"]))
    return max(abs(loss - other[step]) for step, loss in a["valid_curve"] if step in other)


# Pairs of the same algorithm up to rounded (8-bit) states: their gaps give a rough scale of run-to-run noise.
NOISE_PAIRS = ((ADAMW, "AdamW8bit"), (FRUGAL_025, FRUGAL_025_8BIT), (FRUGAL_0, "Frugal ρ=0, inner AdamW8bit"))


def reference_comparison(runs: dict, noise_runs: dict) -> dict:
    """Ours against the reference per setting (``REFERENCE_PAIRS``) in ``runs``, with the noise scale from
    ``NOISE_PAIRS`` in ``noise_runs``."""
    pairs = []
    for ours_label, reference_label in REFERENCE_PAIRS:
        if ours_label not in runs or reference_label not in runs:
            continue
        ours, reference = runs[ours_label], runs[reference_label]
        pairs.append({
            "ours": ours_label, "reference": reference_label,
            "final_valid_loss_ours": ours["final_valid_loss"],
            "final_valid_loss_reference": reference["final_valid_loss"],
            "final_difference": ours["final_valid_loss"] - reference["final_valid_loss"],
            "max_abs_curve_difference": max_curve_difference(ours, reference),
            "state_bytes_ours": ours["state_bytes"], "state_bytes_reference": reference["state_bytes"],
            "projection_bytes_reference": reference.get("projection_bytes", 0),
        })
    noise = [{"a": a, "b": b, "final_difference": noise_runs[b]["final_valid_loss"] - noise_runs[a]["final_valid_loss"],
              "max_abs_curve_difference": max_curve_difference(noise_runs[a], noise_runs[b])}
             for a, b in NOISE_PAIRS if a in noise_runs and b in noise_runs]
    return {"pairs": pairs, "noise": noise}


def reference_markdown(section: dict) -> str:
    """The ``frugal-reference`` section of docs/frugal.md."""
    comparison = section["comparison"]
    rows = [[pair["ours"], pair["reference"], f"{pair['final_valid_loss_ours']:.4f}",
             f"{pair['final_valid_loss_reference']:.4f}",
             f"{pair['final_difference']:+.4f}", f"{pair['max_abs_curve_difference']:.4f}",
             f"{pair['state_bytes_ours'] / 1e6:.2f}", f"{pair['state_bytes_reference'] / 1e6:.2f}",
             f"{pair['projection_bytes_reference'] / 1e6:.2f}"] for pair in comparison["pairs"]]
    table = markdown_table(["ours", "reference", "valid loss ours", "valid loss reference", "ours - reference",
                            "max abs curve difference", "state MB ours", "state MB reference (its count)",
                            "reference's SVD bases MB (not in its count)"], rows)
    noise = markdown_table(["pair (same algorithm, 8-bit states)", "final difference", "max abs curve difference"],
                           [[f"{n['b']} - {n['a']}", f"{n['final_difference']:+.4f}",
                             f"{n['max_abs_curve_difference']:.4f}"] for n in comparison["noise"]])
    s = section["settings"]
    return "\n".join([
        "### Side by side with the reference code in one harness",
        "",
        f"Written by `benchmarks/bench_frugal.py`: `{section['command'].strip()}`.",
        f"Machine: {machine_line(section['machine'])}.",
        "",
        "The FRUGAL authors' optimizers (github.com/fzmushko/FRUGAL, commit c7ebe4c, imported from a checkout "
        "of its `frugal/` folder; `torch.optim.optimizer._dispatch_sqrt`, which it imports and current torch "
        "lacks, put back at run time) trained in our harness: the same model, initial weights, batches, "
        f"seed {s['seed']}, {s['steps']} steps, lr {s['lr']:g}, no schedule, weight decay 0, update gap "
        f"{s['update_gap']}, moments reset at refreshes, signSGD on the rest. SVD: `GaloreAdamW` density "
        f"{s['density']:g} (also with square weights projected on our side, rows, where the reference takes "
        f"columns); blocks: `BlockAdamW` density {s['density']:g}, order ascending (the same blocks as ours: "
        "one Llama block's 7 weights per period, block 0 then block 1) and its default random (blocks drawn "
        "with torch.randperm, seeded); rho=0: `GaloreAdamW` density 0. Curve differences are over the "
        "validation points every "
        f"{s['eval_every']} steps. State MB: `state_bytes()` for ours, the state tensors but the step "
        "counters for the reference (its projector objects are not tensors in its state).",
        "",
        table,
        "",
        "Noise scale (one seed each, so a rough scale, not an interval): pairs from the full run in "
        "`benchmarks/results/frugal.json` that differ only in rounded 8-bit states.",
        "",
        noise,
    ])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (curves, memory) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.4, 1]})
    for label, run in runs.items():
        steps, losses = zip(*run["valid_curve"])
        line, = curves.plot(steps, losses, marker="o", markersize=3, linewidth=1.3, label=label)
        memory.scatter(run["state_bytes"] / 1e6, run["final_valid_loss"], color=line.get_color(), s=40)
        memory.annotate(label, (run["state_bytes"] / 1e6, run["final_valid_loss"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    # Leave out the first evaluation (the untrained model), where all curves coincide far above the rest.
    later = [loss for run in runs.values() for step, loss in run["valid_curve"] if step > 0]
    curves.set_ylim(min(later) - 0.05, max(later) + 0.05)
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss (nats/byte)")
    curves.legend(fontsize=7)
    curves.grid(alpha=0.3)
    memory.set_xscale("log")
    memory.set_xlim(right=memory.get_xlim()[1] * 4)  # room for the labels of the largest states
    memory.set_xlabel("optimizer-state memory (MB, log scale)")
    memory.set_ylabel("final validation loss")
    memory.grid(alpha=0.3, which="both")
    s = results["settings"]
    fig.suptitle(f"Llama {results['parameters'] / 1e6:.1f}M params, byte tokens, {s['steps']} steps of "
                 f"{s['batch_size']}x{s['seq_len']}, seed {s['seed']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--eval-every", type=int, default=Settings.eval_every)
    parser.add_argument("--update-gap", type=int, default=Settings.update_gap)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--only", action="append", help="run only this label (repeatable; for a quick look)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_SHARED / "corpus")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="markdown file with the frugal section")
    parser.add_argument("--no-docs", action="store_true", help="write neither the JSON, the PNG nor the doc")
    parser.add_argument("--from-json", action="store_true",
                        help="train nothing: redraw the PNG and rewrite the doc section from the results file")
    parser.add_argument("--reference-code", type=Path,
                        help="folder holding the FRUGAL reference's frugal/ package: run its optimizers beside ours "
                             "for the three Frugal settings (add --only to choose labels)")
    parser.add_argument("--retrain", action="store_true",
                        help="with --reference-code: train every run again instead of taking those measured with "
                             "the same settings from --json")
    parser.add_argument("--frugal-doc", type=Path, default=DEFAULT_FRUGAL_DOC,
                        help="markdown file with the frugal-reference section")
    parser.add_argument("--progress", type=Path, default=DEFAULT_PROGRESS,
                        help="finished runs are kept here until the whole benchmark is done; a rerun with the "
                             "same settings resumes from it")
    args = parser.parse_args(argv)
    settings = Settings(steps=args.steps, eval_every=args.eval_every, update_gap=args.update_gap, seed=args.seed)
    if args.from_json:
        results = json.loads(args.json.read_text(encoding="utf-8"))
        plot(results, args.png)
        update_markdown_section(args.doc, "frugal", markdown(results))
        if "reference_comparison" in results:
            update_markdown_section(args.frugal_doc, "frugal-reference",
                                    reference_markdown(results["reference_comparison"]))
        return 0
    if args.reference_code is not None:
        return run_reference(args, settings)
    progress = None if args.no_docs else args.progress
    results = run_all(settings, args.corpus, args.only, progress)
    text = markdown(results)
    print(text)
    if args.no_docs:
        return 0
    write_json(args.json, results)
    if not args.no_plot:
        plot(results, args.png)
    update_markdown_section(args.doc, "frugal", text)
    if not args.only:
        progress.unlink(missing_ok=True)  # complete: the results file holds everything
    return 0


def run_reference(args, settings: Settings) -> int:
    """--reference-code: the reference's optimizers beside ours; the comparison goes into the results file
    (its other runs kept) and docs/frugal.md."""
    reference = load_reference(args.reference_code)
    saved = json.loads(args.json.read_text(encoding="utf-8")) if args.json.exists() else None
    known = {}
    if saved is not None and saved["settings"] == asdict(settings) and not args.retrain:
        known = {label: saved["runs"][label] for label, _ in REFERENCE_PAIRS if label in saved["runs"]}
    earlier = (saved or {}).get("reference_comparison")
    if earlier is not None and earlier["settings"] == asdict(settings) and not args.retrain:
        known.update({label: run for label, run in earlier["runs"].items() if label not in known})
    progress = None if args.no_docs else (
        DEFAULT_REFERENCE_PROGRESS if args.progress == DEFAULT_PROGRESS else args.progress)
    only = args.only or list(dict.fromkeys(label for pair in REFERENCE_PAIRS for label in pair))
    results = run_all(settings, args.corpus, only, progress, reference=reference, known_runs=known)
    noise_runs = saved["runs"] if saved is not None and saved["settings"] == asdict(settings) else results["runs"]
    section = {key: results[key] for key in ("command", "machine", "settings", "runs")}
    section["taken_from_earlier_runs"] = sorted(known)
    section["comparison"] = reference_comparison(results["runs"], noise_runs)
    text = reference_markdown(section)
    print(text)
    if args.no_docs:
        return 0
    out = saved if saved is not None else {"benchmark": "frugal", "settings": asdict(settings), "runs": {}}
    out["reference_comparison"] = section
    write_json(args.json, out)
    update_markdown_section(args.frugal_doc, "frugal-reference", text)
    progress.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
