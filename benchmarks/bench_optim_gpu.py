"""GPU roofline of the optimizer update: effllm's fused AdamW kernels (32-, 8- and 4-bit states), bitsandbytes
AdamW8bit and torch's fused AdamW on one large parameter, each against the memory-bandwidth bound measured in
the same run (a device-to-device copy). Needs a CUDA device.

    python benchmarks/bench_optim_gpu.py                  # 256Mi elements, about a minute
    python benchmarks/bench_optim_gpu.py --numel 64M

Writes benchmarks/results/optim_gpu.json and the optim_gpu section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from effllm.bench import optim_gpu

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NUMEL = "256M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", default=DEFAULT_NUMEL, type=optim_gpu.parse_numel,
                        help="elements of the parameter (default 256M = 256 * 2**20)")
    parser.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "optim_gpu.json"))
    parser.add_argument("--markdown", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_optim_gpu.py: no CUDA device is visible here; run it on a machine with a GPU")
    result = optim_gpu.run(args.numel, include_bnb=not args.no_bnb)
    default = optim_gpu.parse_numel(DEFAULT_NUMEL)
    command = "python benchmarks/bench_optim_gpu.py" + (f" --numel {args.numel}" if args.numel != default else "")
    layout = os.environ.get("EFFLLM_TRITON_OPTIM_LAYOUT", "").strip()
    if layout:  # a layout set for tuning (kernels/_optim_update_triton.py) is part of what was measured
        command = f"EFFLLM_TRITON_OPTIM_LAYOUT={layout} {command}"
        result["triton_layout"] = layout
    optim_gpu.write(result, args.json, args.markdown, command)


if __name__ == "__main__":
    main()
