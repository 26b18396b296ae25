"""Where a small model's GPU optimizer step spends its host time: the step's wall time with the kernels queued
but not waited for, against fused AdamW's, and the Python functions that take it (cProfile).

On an H100 a 1M-parameter step of effllm's AdamW8bit took about 0.55 ms against 0.24 for torch's fused AdamW,
whatever the state width (docs/optim.md, "GPU kernel"): host time, not the kernels'. This says whose.

    python benchmarks/optim_gpu_host.py                   # needs a CUDA device; about 20 s
    python benchmarks/optim_gpu_host.py --device cpu      # the same on the CPU kernels (checks the script)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from effllm.bench import optim as bench

STEPS = 200


def host_ms(optimizer: torch.optim.Optimizer, synchronize) -> list[float]:
    """Wall time of each of STEPS steps without waiting for the device in between (what the host adds, as
    long as the device keeps up), in ms."""
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
    synchronize()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1M", help="parameters, as bench_optim.py takes them (default 1M)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--top", type=int, default=25, help="profile lines to print (default 25)")
    args = parser.parse_args()
    try:
        bench.check_device(args.device)
    except ValueError as error:
        raise SystemExit(f"optim_gpu_host.py: --device {error}") from None
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        sizes = bench.parse_sizes(args.size)
    except ValueError as error:
        raise SystemExit(f"optim_gpu_host.py: --size: {error}") from None
    if len(sizes) != 1:
        raise SystemExit(f"optim_gpu_host.py: --size {args.size!r} names {len(sizes)} sizes; give one, e.g. 1M")
    (size,) = sizes
    generator = torch.Generator().manual_seed(0)
    shapes = bench.param_shapes(size)
    found = {label: factory for label, factory in bench.candidates(include_bnb=False).items()
             if label in (bench.FUSED, bench.EFFLLM_8BIT, "effllm AdamW (32-bit states)")}
    optimizers = {}
    for label, factory in found.items():
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device)) for shape in shapes]
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(device) * 1e-2
        optimizers[label] = factory(params)
        for _ in range(3):  # states allocated, kernels compiled, plans made
            optimizers[label].step()
    synchronize()
    count = sum(p.numel() for p in next(iter(optimizers.values())).param_groups[0]["params"])
    print(f"{count / 1e6:.1f}M parameters in {len(shapes)} tensors on {device}; host time per step over "
          f"{STEPS} steps, not waiting for the device:")
    for label, optimizer in optimizers.items():
        times = host_ms(optimizer, synchronize)
        print(f"  {label:30s} median {statistics.median(times):.3f} ms, best {min(times):.3f} ms")
    own = optimizers[bench.EFFLLM_8BIT]
    profiler = cProfile.Profile()
    profiler.enable()
    host_ms(own, synchronize)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
    print(f"\n{bench.EFFLLM_8BIT}, {STEPS} steps under cProfile (cumulative time):")
    print(text.getvalue())


if __name__ == "__main__":
    main()
