"""``effllm bench optim``: optimizer step time and state memory, side by side in one process.

For each size, one set of parameters shaped like transformer blocks (four [d, d] attention matrices, the
[4d, d] and [d, 4d] MLP matrices and two norm vectors per block) and one set of gradients; every optimizer
starts from copies of the same parameters and steps with the same gradients. The optimizers of a size take
their steps in turn (round-robin) after warm-up (the first steps allocate state), so that the machine's busy
spells do not land on one of them alone; step time is the best of N, and the ratio to fused AdamW the median
over rounds of the two steps' ratio within a round (steadier on a noisy machine than a ratio of two best
times, which may come from different rounds). State memory counts every
distinct tensor an optimizer keeps in ``optimizer.state`` (codes, absmax, quantization maps, moments, step
counters).

Where a process's tensors land in memory moves effllm's step by up to 1.5x on the 2-vCPU machine
(docs/optim.md, "Memory layout"), and one process is one draw of it. ``run_in_processes`` runs the whole
benchmark in several fresh processes, one after the other, and reports the median over them, with the range of
the ratios (as pyperf runs its worker processes, for the same reason).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .harness import machine, machine_line, markdown_table, save_figure, update_markdown_section, write_csv, write_json

NAME = "optim"
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
BLOCK_MATRICES = 12  # d*d units per block: 4 attention + 2 * 4 MLP
MATRIX_ALIGN = 32  # hidden sizes are multiples of this, as in real models
MAX_BLOCK_WIDTH = 4096  # wider than this, a size becomes several blocks
WARMUP_STEPS = 2
BUDGET_S = 5.0  # timing stops after this much time per optimizer and size (bitsandbytes is slow on CPU)
GC_MIN_PARAMS = 10_000_000  # collect garbage between sizes from this size on (a collection costs ~0.1 s)
FLUSH_BYTES = 256 << 20  # well above this CPU's 32 MiB L3 and an H200's 60 MB L2
CACHE_STATES = ("cold", "warm")
BUSY_LOAD_PER_CORE = 0.5  # a load average above this per CPU marks the figures as taken on a busy machine
TARGET_STATE_BYTES = 2.04
TARGET_RATIO_TO_FUSED = 2.0
DEFAULT_SIZES = "1M,4M,16M,64M,100M,smollm2-135m"
EFFLLM_8BIT = "effllm AdamW8bit"
FUSED = "torch AdamW (fused)"
BNB = "bitsandbytes AdamW8bit"


SIZE_UNITS = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def _smollm2_135m_shapes() -> list[tuple[int, ...]]:
    """SmolLM2-135M's parameters (its config: 30 layers of width 576, 9 query and 3 key/value heads of 64, MLP
    1536, a tied 49152-token embedding): 272 tensors, as many as a real model hands its optimizer."""
    width, kv_width, mlp, vocab, layers = 576, 192, 1536, 49152, 30
    layer = [(width, width), (kv_width, width), (kv_width, width), (width, width),  # q, k, v, o
             (mlp, width), (mlp, width), (width, mlp), (width,), (width,)]  # gate, up, down, two norms
    return [(vocab, width), *layer * layers, (width,)]


# Named sizes: a real model's own parameter shapes instead of transformer blocks of a given total.
MODEL_SHAPES = {"smollm2-135m": _smollm2_135m_shapes}


def parse_sizes(text: str) -> list[int | str]:
    """``"1M,16M,smollm2-135m"`` -> ``[1000000, 16000000, "smollm2-135m"]``; ValueError naming a bad item."""
    sizes: list[int | str] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in MODEL_SHAPES:
            sizes.append(item)
            continue
        try:
            size = int(float(item[:-1]) * SIZE_UNITS[item[-1]]) if item[-1:] in SIZE_UNITS else int(item)
        except (ValueError, IndexError):
            size = 0
        if size <= 0:
            raise ValueError(f"{item!r} is not a size: write parameter counts such as 1M,16M,100M or one of "
                             f"{', '.join(MODEL_SHAPES)}")
        sizes.append(size)
    return sizes


def check_device(device: str) -> None:
    """ValueError naming the problem when ``device`` is not a torch device, or is CUDA on a machine without one."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"{device!r} is not a torch device; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("cuda, but no CUDA device is visible here; use cpu")


def param_shapes(size: int | str) -> list[tuple[int, ...]]:
    """Shapes of about ``size`` parameters in transformer blocks of width d (a multiple of 32), or a named
    model's own shapes (``MODEL_SHAPES``)."""
    if isinstance(size, str):
        return MODEL_SHAPES[size]()
    blocks = 1
    while True:
        width = max(MATRIX_ALIGN, round(math.sqrt(size / (BLOCK_MATRICES * blocks)) / MATRIX_ALIGN) * MATRIX_ALIGN)
        if width <= MAX_BLOCK_WIDTH:
            break
        blocks += 1
    block = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width), (width,), (width,)]
    return block * blocks


def candidates(include_bnb: bool = True) -> dict[str, Callable | str]:
    """Label -> factory(params), or a string saying why the candidate is missing."""
    from effllm.optim import AdamW8bit

    found: dict[str, Callable | str] = {
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True),
        FUSED: lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True),
    }
    if include_bnb:
        try:
            import bitsandbytes as bnb
        except ImportError:
            found[BNB] = "not installed"
        else:
            found[BNB] = lambda ps: bnb.optim.AdamW8bit(ps, **HYPER)
    found[EFFLLM_8BIT] = lambda ps: AdamW8bit(ps, **HYPER)
    found["effllm AdamW (4-bit states)"] = lambda ps: AdamW8bit(ps, **HYPER, state_bits=4)
    found["effllm AdamW (32-bit states)"] = lambda ps: AdamW8bit(ps, **HYPER, state_bits=32)
    return found


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensors in ``optimizer.state`` (a map shared by all parameters counts once)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


class CacheFlush:
    """Evicts the caches before a timed step by reading and writing a buffer several times the size of the last
    level cache: in training, the forward and backward passes run between two optimizer steps, so the
    optimizer's states (and mostly its parameters) are not in cache when it steps. Without it, the order of
    the candidates in a round decides how much of a small model each one finds in cache."""

    def __init__(self, device: torch.device):
        self.buffer = torch.zeros(FLUSH_BYTES // 4, device=device)

    def __call__(self) -> None:
        self.buffer.add_(1.0)  # read and written through the caches (a plain fill may bypass them)


def _round_robin(optimizers: dict[str, torch.optim.Optimizer], repeats: int, synchronize,
                 flush=None) -> dict[str, list]:
    """label -> seconds of each timed step, one per round (None for a round it sat out). Every optimizer steps
    once per round, in turn, so a busy spell of the machine hits all of them rather than whichever was being
    timed alone; a candidate stops being timed once it has spent BUDGET_S seconds (bitsandbytes is slow on
    CPU). ``flush``, if given, runs (untimed) before each timed step."""
    sync = synchronize or (lambda: None)
    flush = flush or (lambda: None)
    for _ in range(WARMUP_STEPS - 1):  # run() took the first
        for optimizer in optimizers.values():
            optimizer.step()
    sync()
    times: dict[str, list] = {label: [] for label in optimizers}
    spent = dict.fromkeys(optimizers, 0.0)
    for _ in range(max(1, repeats)):
        for label, optimizer in optimizers.items():
            if times[label] and spent[label] >= BUDGET_S:
                times[label].append(None)
                continue
            flush()
            sync()
            start = time.perf_counter()
            optimizer.step()
            sync()
            elapsed = time.perf_counter() - start
            times[label].append(elapsed)
            spent[label] += elapsed
    return times


def _median_ratio(times: list, reference: list) -> float | None:
    """Median over rounds of this step's time over the reference's in the same round: a busy spell slows both
    steps of a round, so the ratio is steadier than a ratio of two best times taken in different rounds."""
    ratios = [mine / theirs for mine, theirs in zip(times, reference) if mine is not None and theirs is not None]
    return statistics.median(ratios) if ratios else None


def run(sizes: list[int], repeats: int = 5, include_bnb: bool = True, device: str = "cpu",
        cache: str = "cold") -> list[dict]:
    """One row per (size, optimizer): step_ms, timed_steps, state_bytes_per_param, ratio_to_fused. The
    optimizers of one size are timed round-robin (``_round_robin``) after all of them are built, each step
    from cold caches (``CacheFlush``) unless ``cache="warm"``."""
    if cache not in CACHE_STATES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_STATES)}, got {cache!r}")
    device = torch.device(device)
    flush = CacheFlush(device) if cache == "cold" else None
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    found = candidates(include_bnb)
    rows = []
    for size in sizes:
        generator = torch.Generator().manual_seed(0)
        shapes = param_shapes(size)
        initial = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
        grads = [(torch.randn(shape, generator=generator) * 1e-2).to(device) for shape in shapes]
        count = sum(p.numel() for p in initial)
        load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        size_rows, optimizers = {}, {}
        for label, factory in found.items():
            row = size_rows[label] = {"size": size, "params": count, "optimizer": label, "cache": cache,
                                      "load_average_1m": load}
            if isinstance(factory, str):
                row["error"] = factory
                continue
            params = [torch.nn.Parameter(p.clone()) for p in initial]
            for param, grad in zip(params, grads):
                param.grad = grad
            try:
                optimizers[label] = factory(params)
                optimizers[label].step()  # a candidate that cannot step is reported, not timed
            except Exception as error:  # noqa: BLE001 - one failing candidate must not lose the others
                row["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
                optimizers.pop(label, None)
        times = _round_robin(optimizers, repeats, synchronize, flush)
        for label, own in times.items():
            optimizer, timed = optimizers[label], [t for t in own if t is not None]
            numel = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
            size_rows[label].update(step_ms=round(min(timed) * 1e3, 3),
                                    median_ms=round(statistics.median(timed) * 1e3, 3), timed_steps=len(timed),
                                    state_bytes_per_param=round(state_bytes(optimizer) / numel, 4))
            ratio = _median_ratio(own, times[FUSED]) if FUSED in times else None
            if ratio is not None:
                size_rows[label]["ratio_to_fused"] = round(ratio, 3)
        for row in size_rows.values():
            print(f"{count / 1e6:7.1f}M  {row['optimizer']:30s}  " + (f"{row['step_ms']:9.2f} ms  "
                  f"{row['state_bytes_per_param']:.3f} B/param" if "step_ms" in row else row["error"]), flush=True)
        fused = size_rows.get(FUSED, {}).get("step_ms")
        for row in size_rows.values():
            if fused and "step_ms" in row:
                row["best_ratio_to_fused"] = round(row["step_ms"] / fused, 3)
        rows += size_rows.values()
        del initial, grads, optimizers
        if count >= GC_MIN_PARAMS:
            gc.collect()  # free this size's parameters and states before the next size allocates its own
    return rows


def run_in_processes(sizes: list[int | str], processes: int, repeats: int = 5, include_bnb: bool = True,
                     device: str = "cpu", cache: str = "cold", threads: int | None = None) -> list[dict]:
    """``run`` in ``processes`` fresh Python processes, one after the other, combined by ``combine_processes``.
    Each process allocates its own tensors, so each is an independent draw of their placement in memory."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="effllm-bench-optim-") as folder:
        for index in range(processes):
            out = Path(folder) / f"process{index}.json"
            command = [sys.executable, "-m", __name__, "--sizes", ",".join(map(str, sizes)), "--repeats",
                       str(repeats), "--device", device, "--cache", cache, "--out", str(out)]
            command += [] if include_bnb else ["--no-bnb"]
            command += ["--threads", str(threads)] if threads else []
            print(f"process {index + 1} of {processes}", flush=True)
            subprocess.run(command, check=True)
            runs.append(json.loads(out.read_text()))
    return combine_processes(runs)


# Figures of a row that are combined as the median over processes.
PER_PROCESS_MEDIANS = ("step_ms", "median_ms", "ratio_to_fused", "best_ratio_to_fused")


def combine_processes(runs: list[list[dict]]) -> list[dict]:
    """One row per (size, optimizer) from the rows of several processes: step times and ratios are the
    median over the processes that timed it (``processes``), the ratio to fused AdamW also has its range
    (``ratio_to_fused_range``) and each process's value (``ratio_to_fused_by_process``). An optimizer that
    failed in every process keeps its error."""
    if len(runs) == 1:
        return runs[0]
    grouped: dict[tuple, list[dict]] = {}
    for rows in runs:
        for row in rows:
            grouped.setdefault((row["params"], row["optimizer"]), []).append(row)
    combined = []
    for same in grouped.values():
        timed = [row for row in same if "step_ms" in row]
        row = dict(timed[0] if timed else same[0])
        if timed:
            row["processes"] = len(timed)
            for key in PER_PROCESS_MEDIANS:
                values = [other[key] for other in timed if key in other]
                if values:
                    row[key] = round(statistics.median(values), 3)
            ratios = [other["ratio_to_fused"] for other in timed if "ratio_to_fused" in other]
            if ratios:
                row["ratio_to_fused_range"] = [min(ratios), max(ratios)]
                row["ratio_to_fused_by_process"] = ratios
        combined.append(row)
    return combined


@dataclass
class TargetRatios:
    """effllm 8-bit's step against the target's reference, by parameter count: on CPU the median of the rounds'
    ratios to fused AdamW (at most ``bound``), on GPU the ratio of best times to bitsandbytes' (below 1)."""

    ratios: dict[int, float]
    bound: float
    label: str
    verdict: str
    strict: bool  # the ratio must stay below the bound, not just reach it

    def meets(self, value: float) -> bool:
        return value < self.bound if self.strict else value <= self.bound


def target_ratios(rows: list[dict], device: str) -> TargetRatios:
    timed = {(row["params"], row["optimizer"]): row for row in rows if "step_ms" in row}
    own = {count: row for (count, label), row in timed.items() if label == EFFLLM_8BIT}
    if torch.device(device).type == "cpu":
        return TargetRatios({count: row["ratio_to_fused"] for count, row in own.items() if "ratio_to_fused" in row},
                            TARGET_RATIO_TO_FUSED, f"{EFFLLM_8BIT} / fused AdamW (median of rounds)",
                            f"8-bit step ≤ {TARGET_RATIO_TO_FUSED:g}× fused AdamW", strict=False)
    return TargetRatios({count: row["step_ms"] / timed[(count, BNB)]["step_ms"] for count, row in own.items()
                         if (count, BNB) in timed}, 1.0, f"{EFFLLM_8BIT} / {BNB} (best times)",
                        "8-bit step faster than bitsandbytes", strict=True)


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def _size_label(row: dict) -> str:
    """A table's size cell: the parameter count, with the model's name for a named size."""
    count = _millions(row["params"])
    return f"{count} ({row['size']} shapes)" if isinstance(row.get("size"), str) else count


def section_name(device: str) -> str:
    """The docs/benchmarks.md section of a device's figures (CPU and GPU tables live side by side)."""
    return NAME if torch.device(device).type == "cpu" else f"{NAME}_{torch.device(device).type}"


def markdown(rows: list[dict], info: dict, command: str, device: str = "cpu", plot_name: str | None = None) -> str:
    """The optimizer section of docs/benchmarks.md for ``device``."""
    on_gpu = torch.device(device).type != "cpu"
    labels = list(dict.fromkeys(row["optimizer"] for row in rows))
    sizes = list(dict.fromkeys(row["params"] for row in rows))
    cell = {(row["params"], row["optimizer"]): row for row in rows}
    size_label = {row["params"]: _size_label(row) for row in rows}

    def time_cell(count, label):
        row = cell.get((count, label), {})
        if "step_ms" not in row:
            return row.get("error", "")
        return f"{row['step_ms']:.2f}" if row["step_ms"] < 10 else f"{row['step_ms']:.1f}"

    def ratio(count, key):
        row = cell.get((count, EFFLLM_8BIT), {})
        return f"{row[key]:.2f}×" if key in row else ""

    def ratio_range(count):
        low, high = cell.get((count, EFFLLM_8BIT), {}).get("ratio_to_fused_range", (None, None))
        return f"{low:.2f}-{high:.2f}×" if low is not None else ""

    processes = max((row.get("processes", 1) for row in rows), default=1)
    ratio_header = ("effllm 8-bit / fused (median of rounds)" if processes == 1 else
                    f"effllm 8-bit / fused (median over {processes} processes of each one's median of rounds)")
    times = markdown_table(
        ["parameters", *labels, ratio_header, *(["range over processes"] if processes > 1 else []),
         "(best / best)"],
        [[size_label[count], *(time_cell(count, label) for label in labels), f"**{ratio(count, 'ratio_to_fused')}**",
          *([ratio_range(count)] if processes > 1 else []), ratio(count, "best_ratio_to_fused")] for count in sizes])
    largest = sizes[-1]
    memory = markdown_table(["optimizer", f"state bytes / parameter ({_millions(largest)})"],
                            [[label, f"{cell[(largest, label)]['state_bytes_per_param']:.3f}"]
                             for label in labels if "state_bytes_per_param" in cell.get((largest, label), {})])
    verdicts = []
    own = [row for row in rows if row["optimizer"] == EFFLLM_8BIT and "step_ms" in row]
    if own:
        worst_bytes = max(row["state_bytes_per_param"] for row in own)
        verdicts.append(f"state ≤ {TARGET_STATE_BYTES} bytes/parameter: "
                        f"{'met' if worst_bytes <= TARGET_STATE_BYTES else 'NOT met'} ({worst_bytes:.3f} at most)")
        target = target_ratios(rows, device)
        met = [size_label[count] for count, value in target.ratios.items() if target.meets(value)]
        missed = [size_label[count] for count, value in target.ratios.items() if not target.meets(value)]
        verdicts.append(f"{target.verdict}: met at {', '.join(met) or 'no size'}"
                        + (f"; not met at {', '.join(missed)}" if missed else ""))
        worst = max(((row["ratio_to_fused_range"][1], row["params"]) for row in own
                     if "ratio_to_fused_range" in row), default=None)
        if worst and not on_gpu:  # a user's process is one draw: say what the unluckiest one saw
            verdicts.append(f"the slowest single process: {worst[0]:.2f}× at {size_label[worst[1]]}")
    # The load when the run started: later samples count the benchmark's own threads (a 1-minute average).
    load, cores = (rows[0].get("load_average_1m") if rows else None), info.get("logical_cores") or 1
    note = ""
    if load is not None and load > BUSY_LOAD_PER_CORE * cores and not on_gpu:
        note = (f"Note: other processes kept the machine busy when it started (load average {load} on {cores} "
                "CPUs): multi-threaded times, torch's above all, are inflated and noisy; rerun on a quiet machine "
                "before trusting a ratio.")
    date = datetime.date.today().isoformat()
    return "\n".join([
        "## Optimizer step" + (f" on {info.get('gpu') or device}" if on_gpu else ""),
        "",
        f"Written by `benchmarks/bench_optim.py` on {date}: `{command}`.",
        f"Machine: {machine_line(info)}.",
        "",
        *([f"Each size ran in {processes} fresh processes, one after the other: where a process's tensors land "
           "in memory moves a step's time (docs/optim.md, \"Memory layout\"), so each process is one draw. Times "
           "are the median over the processes of each one's best; the ratio is the median over the processes of "
           "each one's ratio, with their range beside it.", ""] if processes > 1 else []),
        "AdamW step time in milliseconds (lr 1e-3, weight decay 0.01), best of "
        f"{max((row.get('timed_steps', 0) for row in rows), default=0)} after {WARMUP_STEPS} warm-up steps "
        f"(slow candidates stop after {BUDGET_S:g} s of timing); every optimizer starts from the same parameters, "
        "shaped like transformer blocks (a named size: that model's own shapes), and steps with the same "
        "gradients, in one process run; the optimizers "
        "of a size take their timed steps in turn (round-robin), so a busy spell of the machine hits them all. "
        "The ratio to fused AdamW is the median over rounds of the two steps' ratio within a round (the target's "
        "figure); the ratio of the two best times is shown beside it. " + (
            f"Each timed step starts from cold caches ({FLUSH_BYTES >> 20} MiB read and written before it, untimed), "
            "as in training, where the forward and backward passes run between two steps."
            if rows and rows[0].get("cache", "cold") == "cold" else
            "Caches were not flushed between steps (`--cache warm`): small models run from cache."),
        "",
        times,
        *(["", f"Plot: [{plot_name}]({plot_name})."] if plot_name else []),
        "",
        memory,
        "",
        "Targets: " + "; ".join(verdicts) + "." if verdicts else "",
        *(["", note] if note else []),
    ])


def plot(rows: list[dict], path: str | Path, device: str = "cpu") -> None:
    """Step time against parameter count for every optimizer (log-log), and effllm 8-bit's ratio to fused
    AdamW against the 2x target, as a PNG (written to a temporary file, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [row for row in rows if "step_ms" in row]
    on_gpu = torch.device(device).type != "cpu"
    fig, (times, ratios) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    for label in dict.fromkeys(row["optimizer"] for row in timed):
        own = sorted((row["params"], row["step_ms"]) for row in timed if row["optimizer"] == label)
        times.plot(*zip(*own), marker="o", linewidth=1.4, label=label)
    processes = max((row.get("processes", 1) for row in timed), default=1)
    times.set(xscale="log", yscale="log", ylabel="step time, ms (best of the rounds"
              + (f",\nmedian of {processes} processes)" if processes > 1 else ")"))
    cache = timed[0].get("cache", "cold") if timed else "cold"
    run = "in one run" if processes == 1 else f"in each of {processes} processes"
    times.set_title(f"Optimizer step on {device}, side by side {run} ({cache} caches)", fontsize=10)
    times.legend(fontsize=8)
    times.grid(alpha=0.3, which="both")
    target = target_ratios(rows, device)
    if target.ratios:
        own = sorted(target.ratios.items())
        ratios.plot(*zip(*own), marker="o", color="tab:red", label=target.label)
        spread = sorted((row["params"], *row["ratio_to_fused_range"]) for row in timed
                        if row["optimizer"] == EFFLLM_8BIT and "ratio_to_fused_range" in row)
        if spread and not on_gpu:  # each process is one draw of memory placement: show them all
            counts, lows, highs = zip(*spread)
            ratios.vlines(counts, lows, highs, color="tab:red", alpha=0.5, linewidth=3, label="range over processes")
        ratios.axhline(target.bound, color="black", linewidth=0.8, linestyle="--", label="target")
        highest = max([value for _, value in own] + [high for *_, high in spread if not on_gpu])
        ratios.set_ylim(0, max(target.bound * 1.25, highest * 1.1))
        ratios.legend(fontsize=8)
    for row in timed:  # name the real models' shapes where they sit
        if isinstance(row.get("size"), str) and row["optimizer"] == EFFLLM_8BIT:
            times.annotate(row["size"], (row["params"], row["step_ms"]), fontsize=7, xytext=(4, -10),
                           textcoords="offset points")
    ratios.set(xscale="log", xlabel="parameters", ylabel="ratio")
    ratios.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _process_main(argv: list[str] | None = None) -> None:
    """One process of ``run_in_processes``: its rows as JSON in --out."""
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description="one process of the benchmark")
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--cache", choices=CACHE_STATES, required=True)
    parser.add_argument("--no-bnb", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(parse_sizes(args.sizes), repeats=args.repeats, include_bnb=not args.no_bnb, device=args.device,
               cache=args.cache)
    Path(args.out).write_text(json.dumps(rows))


def write(rows: list[dict], json_path: str | None, markdown_path: str | None,
          command: str = "effllm bench optim", device: str = "cpu", png_path: str | None = None) -> None:
    """Print the table; write JSON (and CSV beside it), the markdown section and the plot where paths are
    given (the section links the plot when both are in one folder)."""
    info = machine()
    info["load_average_1m_at_end"] = info.pop("load_average_1m", None)
    if rows and rows[0].get("load_average_1m") is not None:
        info["load_average_1m"] = rows[0]["load_average_1m"]  # machine_line reports it as the start's
    if png_path:
        plot(rows, png_path, device)
    linked = png_path and markdown_path and Path(png_path).parent.resolve() == Path(markdown_path).parent.resolve()
    section = markdown(rows, info, command, device, plot_name=Path(png_path).name if linked else None)
    print(section)
    if json_path:
        write_json(json_path, {"benchmark": section_name(device), "device": device, "command": command,
                               "machine": info, "hyper": HYPER, "warmup_steps": WARMUP_STEPS,
                               "budget_s": BUDGET_S, "rows": rows})
        write_csv(Path(json_path).with_suffix(".csv"), rows)
    if markdown_path:
        update_markdown_section(markdown_path, section_name(device), section)


if __name__ == "__main__":
    _process_main()
