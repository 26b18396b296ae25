"""The one benchmark harness: timing, the machine's description, and writing results.

* ``best_time``: best of N runs after warm-up (the least disturbed run is the closest to what the code
  costs; other processes only ever add time), with an optional time budget for slow candidates.
* ``machine``: CPU model, cores, threads, torch version, GPU name, load average: what a reader needs to
  judge the numbers.
* ``write_json`` / ``write_csv``: machine-readable results, written atomically.
* ``update_markdown_section``: each benchmark owns one section of a markdown file (``docs/benchmarks.md``),
  between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``; rerunning one benchmark replaces
  its section and leaves the others alone.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

DOC_TITLE = "# Benchmarks\n\nEach section is written by the benchmark it names; rerun the command to refresh it.\n"


def best_time(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    budget_s: float | None = None,
    synchronize: Callable[[], object] | None = None,
) -> tuple[float, int]:
    """(best seconds of one call, number of timed calls). Stops early, after at least one timed call, once
    ``budget_s`` seconds have been spent timing. ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs
    before each clock read so asynchronous work is counted."""
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best, runs, spent = float("inf"), 0, 0.0
    while runs < max(1, repeats):
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        best, runs, spent = min(best, elapsed), runs + 1, spent + elapsed
        if budget_s is not None and spent >= budget_s:
            break
    return best, runs


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where it does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        return None
    cores = set()
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores) or None


def machine() -> dict:
    """What ran the benchmark."""
    from effllm import __version__

    info = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "effllm": __version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


def machine_line(info: dict) -> str:
    """One line for a document: CPU, cores, threads, torch, GPU."""
    cores = f"{info['physical_cores']} cores" if info.get("physical_cores") else f"{info['logical_cores']} CPUs"
    parts = [info["cpu"], cores, f"{info['torch_threads']} torch threads", f"torch {info['torch']}"]
    if info.get("gpu"):
        parts.append(info["gpu"])
    if info.get("load_average_1m") is not None:
        parts.append(f"load average {info['load_average_1m']} when it started")
    return ", ".join(parts)


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike):
    """A temporary path beside ``path`` to write to; renamed onto ``path`` only if the block succeeds, so readers
    see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _write_atomically(path: str | os.PathLike, text: str) -> None:
    with _atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as out:
        out.write(text)


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG at ``path``, written whole, then renamed."""
    with _atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    _write_atomically(path, json.dumps(payload, indent=2) + "\n")


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """One line per row; the columns are the union of the rows' keys, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomically(path, buffer.getvalue())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def update_markdown_section(path: str | os.PathLike, name: str, body: str) -> None:
    """Replace (or append) the section owned by benchmark ``name`` in the markdown file at ``path``."""
    begin, end = _markers(name)
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else DOC_TITLE
    section = f"{begin}\n{body.strip()}\n{end}"
    start = text.find(begin)
    if start >= 0:
        stop = text.find(end, start)
        if stop < 0:
            raise ValueError(f"{path}: section {name!r} has a begin marker but no end marker")
        text = text[:start] + section + text[stop + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    _write_atomically(path, text)
