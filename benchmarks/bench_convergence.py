"""Loss curves of one tiny Llama trained with torch AdamW, effllm AdamW8bit, effllm AdamW with 4-bit states and
bitsandbytes AdamW8bit, from the same initial weights and the same batches (bytes of the shared corpus).

Writes the final-loss table as JSON (with every per-step loss, so the plot can be redrawn) and one PNG of the
smoothed curves, with the final losses in the legend and a lower panel showing each curve minus AdamW's.

    python benchmarks/bench_convergence.py                      # ~500 steps, a few minutes on a 2-core CPU
    python benchmarks/bench_convergence.py --steps 100 --no-plot  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from effllm.optim import AdamW8bit
from effllm.optim.state_memory import optimizer_state_bytes
from effllm.train import (
    TinyLMConfig,
    build_tiny_llama,
    load_bytes,
    random_batches,
    sequential_batches,
    train_lm,
    warmup_cosine,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("EFFLLM_SHARED", REPO.parent / "shared"))
DEFAULT_JSON = REPO / "benchmarks" / "results" / "convergence.json"
DEFAULT_PNG = REPO / "docs" / "optim_convergence.png"


@dataclass
class Settings:
    steps: int = 500
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 30
    max_grad_norm: float = 1.0
    seed: int = 0
    train_bytes: int = 4_000_000  # windows are drawn from the start of train.txt
    valid_bytes: int = 200_000
    valid_batches: int = 16
    final_window: int = 50  # final loss = mean training loss of the last steps
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256

    def model_config(self) -> TinyLMConfig:
        return TinyLMConfig(hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                            intermediate_size=self.intermediate_size, max_seq_len=self.seq_len)


def optimizer_factories(settings: Settings) -> dict:
    """Label -> factory(params). bitsandbytes is optional: absent, its curve is left out (and said so)."""
    common = dict(lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    factories = {
        "torch AdamW (32-bit)": lambda ps: torch.optim.AdamW(ps, **common),
        "effllm AdamW8bit": lambda ps: AdamW8bit(ps, **common),
        "effllm AdamW (4-bit states)": lambda ps: AdamW8bit(ps, **common, state_bits=4),
    }
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("bitsandbytes is not installed: its curve is left out (pip install 'effllm[dev]')", file=sys.stderr)
    else:
        factories["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, **common)
    return factories


state_bytes = optimizer_state_bytes  # any optimizer, bitsandbytes' shared maps counted once


def run_all(settings: Settings, corpus: Path) -> dict:
    train_tokens = load_bytes(corpus / "train.txt", settings.train_bytes)
    valid = sequential_batches(load_bytes(corpus / "valid.txt", settings.valid_bytes), settings.batch_size,
                               settings.seq_len, settings.valid_batches)
    runs = {}
    for label, make in optimizer_factories(settings).items():
        created = []

        def factory(params, make=make, created=created):
            created.append(make(params))
            return created[-1]

        model = build_tiny_llama(settings.model_config(), seed=settings.seed)
        batches = random_batches(train_tokens, settings.batch_size, settings.seq_len, settings.steps,
                                 seed=settings.seed)
        result = train_lm(model, factory, batches, valid_batches=valid, max_grad_norm=settings.max_grad_norm,
                          make_scheduler=lambda opt: warmup_cosine(opt, settings.warmup_steps, settings.steps))
        params = sum(p.numel() for p in model.parameters())
        runs[label] = {
            "final_loss": result.smoothed_final_loss(settings.final_window),
            "valid_loss": result.valid_loss,
            "seconds": result.seconds,
            "state_bytes_per_param": state_bytes(created[0]) / params,
            "losses": result.losses,
        }
        print(f"{label:30s} final {runs[label]['final_loss']:.4f}  valid {result.valid_loss:.4f}  "
              f"{result.seconds:.0f} s", flush=True)
    reference = runs["torch AdamW (32-bit)"]
    for run in runs.values():
        run["final_vs_adamw"] = run["final_loss"] / reference["final_loss"] - 1
        run["valid_vs_adamw"] = run["valid_loss"] / reference["valid_loss"] - 1
    return {
        "benchmark": "convergence",
        "command": "python benchmarks/bench_convergence.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": asdict(settings),
        "parameters": params,
        "runs": runs,
    }


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` steps (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results: dict, path: Path, window: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    reference = moving_average(runs["torch AdamW (32-bit)"]["losses"], window)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for label, run in runs.items():
        smoothed = moving_average(run["losses"], window)
        steps = range(1, len(smoothed) + 1)
        legend = f"{label}: final {run['final_loss']:.3f}, valid {run['valid_loss']:.3f}"
        top.plot(steps, smoothed, label=legend, linewidth=1.4)
        bottom.plot(steps, [a - b for a, b in zip(smoothed, reference)], linewidth=1.2)
    settings = results["settings"]
    top.set_ylabel(f"training loss (mean of last {window} steps)")
    top.set_title(f"Tiny Llama ({results['parameters'] / 1e6:.2f}M params, byte-level) on the shared corpus, "
                  f"seed {settings['seed']}", fontsize=10)
    # Leave out the first tenth of the run (loss falling from ~5.5), where the curves are indistinguishable.
    first_shown = max(window, len(reference) // 10)
    top.set_ylim(top=max(moving_average(r["losses"], window)[first_shown] for r in runs.values()))
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.axhline(0.0, color="black", linewidth=0.6)
    bottom.set_ylabel("minus AdamW")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(results: dict) -> str:
    rows = ["| optimizer | final train loss | vs AdamW | valid loss | vs AdamW | state bytes/param | wall s |",
            "|---|---|---|---|---|---|---|"]
    for label, run in results["runs"].items():
        rows.append(f"| {label} | {run['final_loss']:.4f} | {run['final_vs_adamw']:+.2%} | {run['valid_loss']:.4f} "
                    f"| {run['valid_vs_adamw']:+.2%} | {run['state_bytes_per_param']:.2f} | {run['seconds']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_SHARED / "corpus")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    settings = Settings(steps=args.steps, seed=args.seed)
    results = run_all(settings, args.corpus)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.json.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1))
    temporary.replace(args.json)  # atomic: never a half-written result
    if not args.no_plot:
        plot(results, args.png)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
