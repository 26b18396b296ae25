"""GPU roofline of the optimizer update: how close each fused update comes to the memory-bandwidth bound.

One large parameter (default 256M elements, several times the GPU's L2 cache), one step at a time, timed
with CUDA events (median of many steps after warm-up). The bound of a step is the fewest bytes it must move
(each parameter, gradient and state byte read once and the written ones written once, see ``STEP_BYTES``)
over the device-to-device copy bandwidth measured in the same run; ``of_bound`` is that bound time over the
measured time (1.0 = at the copy's speed). effllm, bitsandbytes and torch's fused AdamW are measured side by
side, and so are the blockwise quantize and dequantize kernels the 8-bit states are made of.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
from collections.abc import Callable

import torch

from .harness import machine, machine_line, markdown_table, update_markdown_section, write_json
from .optim import BNB, EFFLLM_8BIT, HYPER

NAME = "optim_gpu"
WARMUP_STEPS = 3
TIMED_STEPS = 20
COPY_BYTES = 2 << 30  # each copy reads and writes 2 GiB
TARGET_OF_BOUND = 0.8


NUMEL_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_numel(text: str) -> int:
    """``256M`` -> 256 * 2**20 (k, M, G are powers of 1024); an argparse ``type``: bad input is a usage error."""
    cleaned = text.strip().lower()
    try:
        numel = int(float(cleaned[:-1]) * NUMEL_UNITS[cleaned[-1]]) if cleaned[-1:] in NUMEL_UNITS else int(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an element count; write e.g. 256M or 1048576") from None
    if numel <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the element count must be positive")
    return numel


def step_bytes(param_bytes: int, grad_bytes: int, state_bytes: float, blocksize: int | None, states: int = 2) -> float:
    """Fewest bytes per element of one step: parameter read and written, gradient read, each state read and
    written (``state_bytes`` per element), and each state's fp32 absmax per block read and written."""
    absmax = 0.0 if blocksize is None else states * 2 * 4 / blocksize
    return 2 * param_bytes + grad_bytes + states * 2 * state_bytes + absmax


def median_ms(fn: Callable[[], object], warmup: int = WARMUP_STEPS, timed: int = TIMED_STEPS) -> float:
    """Median milliseconds of one call of ``fn``, each timed alone with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(timed):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and bytes written."""
    source = torch.randn(COPY_BYTES // 4, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source))
    return 2 * COPY_BYTES / (ms * 1e-3)


def _optimizer_cases(include_bnb: bool) -> list[tuple[str, torch.dtype, float, Callable]]:
    """(label, parameter dtype, bytes per element, factory(params)) of every optimizer step measured."""
    from effllm.optim import AdamW8bit

    fp32, bf16 = torch.float32, torch.bfloat16
    cases = [
        ("torch AdamW (fused)", fp32, step_bytes(4, 4, 4, None), lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)),
        ("effllm AdamW (32-bit states)", fp32, step_bytes(4, 4, 4, None),
         lambda ps: AdamW8bit(ps, **HYPER, state_bits=32)),
        (EFFLLM_8BIT, fp32, step_bytes(4, 4, 1, 256), lambda ps: AdamW8bit(ps, **HYPER)),
        ("effllm AdamW (4-bit states)", fp32, step_bytes(4, 4, 0.5, 128),
         lambda ps: AdamW8bit(ps, **HYPER, state_bits=4)),
        (EFFLLM_8BIT + ", bf16 params", bf16, step_bytes(2, 2, 1, 256), lambda ps: AdamW8bit(ps, **HYPER)),
        ("torch AdamW (fused), bf16 params", bf16, step_bytes(2, 2, 2, None),
         lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)),
    ]
    if include_bnb:
        try:
            import bitsandbytes as bnb
        except ImportError:
            cases.append((BNB, fp32, 0.0, "not installed"))
        else:
            cases.append((BNB, fp32, step_bytes(4, 4, 1, 256), lambda ps: bnb.optim.AdamW8bit(ps, **HYPER)))
            cases.append((BNB + ", bf16 params", bf16, step_bytes(2, 2, 1, 256),
                          lambda ps: bnb.optim.AdamW8bit(ps, **HYPER)))
    return cases


def _kernel_cases(numel: int) -> list[tuple[str, float, Callable]]:
    """(label, bytes per element, zero-argument call) of the blockwise quantize/dequantize kernels."""
    from effllm.kernels.blockwise import dequantize_blockwise, quantize_blockwise
    from effllm.quant import dynamic_map

    qmap = dynamic_map(signed=True).cuda()
    values = torch.randn(numel, device="cuda")
    codes, absmax = quantize_blockwise(values, qmap, 256)
    return [
        ("effllm quantize_blockwise (fp32 -> 8-bit)", 4 + 1 + 4 / 256, lambda: quantize_blockwise(values, qmap, 256)),
        ("effllm dequantize_blockwise (8-bit -> fp32)", 1 + 4 + 4 / 256,
         lambda: dequantize_blockwise(codes, absmax, qmap, 256)),
    ]


def run(numel: int = 256 << 20, include_bnb: bool = True) -> dict:
    """Copy bandwidth and one row per case: ms, bytes/element, GB/s, of_bound."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench optim-gpu needs a CUDA device; none is visible here")
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []

    def add(label: str, ms: float, per_element: float) -> None:
        seconds = ms * 1e-3
        row = {"case": label, "numel": numel, "ms": round(ms, 4), "bytes_per_element": round(per_element, 4),
               "gb_per_s": round(per_element * numel / seconds / 1e9, 1),
               "of_bound": round(per_element * numel / bandwidth / seconds, 3)}
        rows.append(row)
        print(f"{label:45s} {ms:8.3f} ms {row['gb_per_s']:8.1f} GB/s {row['of_bound']:6.1%} of bound", flush=True)

    generator = torch.Generator(device="cuda").manual_seed(0)
    for label, dtype, per_element, factory in _optimizer_cases(include_bnb):
        if isinstance(factory, str):
            rows.append({"case": label, "error": factory})
            continue
        param = torch.nn.Parameter(torch.randn(numel, device="cuda", dtype=dtype, generator=generator))
        param.grad = torch.randn(numel, device="cuda", dtype=dtype, generator=generator) * 1e-2
        try:
            optimizer = factory([param])
            add(label, median_ms(optimizer.step), per_element)
        except Exception as error:  # noqa: BLE001 - one failing candidate must not lose the others
            rows.append({"case": label, "error": f"{type(error).__name__}: {error}".splitlines()[0]})
            print(f"{label:45s} {rows[-1]['error']}", flush=True)
        optimizer = param = None
        gc.collect()
        torch.cuda.empty_cache()
    for label, per_element, call in _kernel_cases(numel):
        add(label, median_ms(call), per_element)
    return {"copy_gb_per_s": round(bandwidth / 1e9, 1), "numel": numel, "rows": rows}


def markdown(result: dict, info: dict, command: str) -> str:
    """The GPU roofline section of docs/benchmarks.md."""
    rows = result["rows"]
    by_case = {row["case"]: row for row in rows}
    table = markdown_table(
        ["case", "ms / step", "bytes / element", "GB/s", "of bandwidth bound"],
        [[row["case"], f"{row['ms']:.3f}", f"{row['bytes_per_element']:.3f}", f"{row['gb_per_s']:.0f}",
          f"{row['of_bound']:.0%}"] if "ms" in row else [row["case"], row["error"], "", "", ""] for row in rows])
    verdicts = []
    own, theirs = by_case.get(EFFLLM_8BIT, {}), by_case.get(BNB, {})
    if "ms" in own:
        verdicts.append(f"effllm AdamW8bit at ≥ {TARGET_OF_BOUND:.0%} of the bandwidth bound: "
                        f"{'met' if own['of_bound'] >= TARGET_OF_BOUND else 'NOT met'} ({own['of_bound']:.0%})")
        if "ms" in theirs:
            verdicts.append(f"faster than bitsandbytes: {'met' if own['ms'] < theirs['ms'] else 'NOT met'} "
                            f"({theirs['ms'] / own['ms']:.2f}× bitsandbytes' speed)")
    return "\n".join([
        f"## Optimizer update on {info.get('gpu')}: bandwidth roofline",
        "",
        f"Written by `benchmarks/bench_optim_gpu.py` on {datetime.date.today().isoformat()}: `{command}`.",
        f"Machine: {machine_line(info)}.",
        "",
        f"One parameter of {result['numel'] / 2**20:.0f}Mi elements; median of {TIMED_STEPS} steps after "
        f"{WARMUP_STEPS} warm-up steps, CUDA events. Bandwidth bound = fewest bytes a step moves over the "
        f"device-to-device copy bandwidth measured in the same run ({result['copy_gb_per_s']:.0f} GB/s, bytes "
        "read + written); 8-bit states move 1 byte per element each way plus an fp32 absmax per 256-element block.",
        "",
        table,
        "",
        ("Targets: " + "; ".join(verdicts) + ".") if verdicts else "",
    ])


def write(result: dict, json_path: str | None, markdown_path: str | None, command: str) -> None:
    info = machine()
    section = markdown(result, info, command)
    print(section)
    if json_path:
        write_json(json_path, {"benchmark": NAME, "command": command, "machine": info, "hyper": HYPER, **result})
    if markdown_path:
        update_markdown_section(markdown_path, NAME, section)
