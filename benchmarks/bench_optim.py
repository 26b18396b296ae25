"""Optimizer step time and state bytes per parameter: torch AdamW (foreach, fused), bitsandbytes AdamW8bit and
effllm AdamW8bit (and its 4- and 32-bit states), measured side by side in one run.

    python benchmarks/bench_optim.py                     # 1M..100M, then SmolLM2-135M; minutes on 2 cores
    python benchmarks/bench_optim.py --sizes 1M,16M      # a quick look
    python benchmarks/bench_optim.py --sizes smollm2-135m  # a real model's 272 tensors
    python benchmarks/bench_optim.py --processes 3       # three fresh processes, their median and range

Writes benchmarks/results/optim.json (and .csv), docs/optim_step_time.png and the optimizer section of
docs/benchmarks.md; ``--replot`` redraws the PNG from the JSON alone.
Same as ``effllm bench optim --json benchmarks/results/optim.json --markdown docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from effllm.bench import optim

REPO = Path(__file__).resolve().parents[1]
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=optim.DEFAULT_SIZES,
                        help=f"parameter counts, or a model's shapes (smollm2-135m) (default {optim.DEFAULT_SIZES})")
    parser.add_argument("--repeats", type=int, default=5, help="best of N after warm-up (default 5)")
    parser.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    parser.add_argument("--threads", type=int, help="torch (and effllm kernel) threads (default: torch's choice)")
    parser.add_argument("--processes", type=int, default=1,
                        help="run it all in N fresh processes and report their median and range (default 1: "
                             "this process); each process is one draw of where its tensors land in memory")
    parser.add_argument("--cache", choices=optim.CACHE_STATES, default="cold",
                        help="cold (default): caches flushed before each timed step, as in training; warm: not")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu); CUDA figures get their own section")
    parser.add_argument("--json", help="default benchmarks/results/optim.json (optim_cuda.json on CUDA)")
    parser.add_argument("--markdown", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--png", help="default docs/optim_step_time.png (optim_step_time_cuda.png on CUDA)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --json's rows")
    args = parser.parse_args()
    try:
        sizes = optim.parse_sizes(args.sizes)
    except ValueError as error:
        raise SystemExit(f"bench_optim.py: --sizes: {error}") from None
    try:
        section = optim.section_name(args.device)
    except RuntimeError:
        raise SystemExit(f"bench_optim.py: --device {args.device!r} is not a torch device; use cpu or cuda") from None
    json_path = args.json or str(REPO / "benchmarks" / "results" / f"{section}.json")
    png_path = args.png or str(REPO / "docs" / f"optim_step_time{section[len(optim.NAME):]}.png")
    if args.replot:  # from saved rows: no device needed
        if not Path(json_path).is_file():
            raise SystemExit(f"bench_optim.py: --replot: no results at {json_path}; run the benchmark first or "
                             "pass --json")
        optim.plot(json.loads(Path(json_path).read_text())["rows"], png_path, args.device)
        return
    try:
        optim.check_device(args.device)
    except ValueError as error:
        raise SystemExit(f"bench_optim.py: --device {error}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.processes < 1:
        raise SystemExit(f"bench_optim.py: --processes must be at least 1, got {args.processes}")
    if args.processes == 1:
        rows = optim.run(sizes, repeats=args.repeats, include_bnb=not args.no_bnb, device=args.device,
                         cache=args.cache)
    else:
        rows = optim.run_in_processes(sizes, args.processes, repeats=args.repeats, include_bnb=not args.no_bnb,
                                      device=args.device, cache=args.cache, threads=args.threads)
    command = "python benchmarks/bench_optim.py"
    command += f" --sizes {args.sizes}" if args.sizes != optim.DEFAULT_SIZES else ""
    command += f" --threads {args.threads}" if args.threads else ""
    command += f" --repeats {args.repeats}" if args.repeats != 5 else ""
    command += f" --device {args.device}" if args.device != "cpu" else ""
    command += f" --cache {args.cache}" if args.cache != "cold" else ""
    command += f" --processes {args.processes}" if args.processes != 1 else ""
    optim.write(rows, json_path, args.markdown, command=command, device=args.device, png_path=png_path)


if __name__ == "__main__":
    main()
