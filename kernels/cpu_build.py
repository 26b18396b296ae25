"""Build and load the C kernels that serve CPU tensors.

On first use the sources in ``csrc/`` are compiled with the system C compiler (``$CC``, else ``gcc``/``cc``)
into one shared library, like inductor and Triton compile their kernels: plain C and OpenMP, no torch
headers, about a second. The library is cached in ``$EFFLLM_CACHE_DIR`` (default ``~/.cache/effllm/kernels``)
under a folder named by a hash of the sources, the compiler, the flags and the CPU (``-march=native``), and
written atomically (a temporary file, then ``os.replace``), so processes building at the same time (pytest-xdist
workers, DDP ranks) never load a half-written file. Without a compiler, or when the build fails, ``library()``
returns None after one warning and every op runs its torch reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
LIBRARY_NAME = "libeffllm_cpu.so"
# -ffp-contract=off: no fused multiply-adds beyond those written out, so each operation rounds as torch's
# elementwise ops do. -fno-math-errno (sqrtf) and -fno-trapping-math (selects of values computed on both
# sides) let the loops vectorise; neither changes a result, only errno and floating-point exception flags.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off",
         "-fno-math-errno", "-fno-trapping-math")
DEFAULT_COMPILERS = ("gcc", "cc")
BUILD_TIMEOUT_S = 300
_HASH_CHARS = 16


class BuildError(RuntimeError):
    """The C kernels could not be compiled or loaded."""


def cache_root() -> Path:
    root = os.environ.get("EFFLLM_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "effllm" / "kernels"


def find_compiler(name: str | None = None) -> str:
    """Absolute path of the C compiler: ``name``, else ``$CC``, else the first of gcc, cc on PATH."""
    candidates = [name] if name else ([os.environ["CC"]] if os.environ.get("CC") else list(DEFAULT_COMPILERS))
    for candidate in candidates:
        path = shutil.which(candidate)
        if path:
            return path
    raise BuildError(f"no C compiler found (tried {', '.join(candidates)}); set CC or install gcc")


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.c"))


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    lines = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags", "Features")):
                    lines.append(line.strip())
                if len(lines) == 3:
                    break
    except OSError:
        lines.append(platform.processor())
    return "\n".join(lines)


def build_key(compiler: str) -> str:
    """Hash of everything the library's bytes depend on."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"cannot run the C compiler {compiler}: {error}") from None
    digest = hashlib.sha256()
    for part in (compiler, version, " ".join(FLAGS), _cpu_signature()):
        digest.update(part.encode() + b"\0")
    for path in sorted(SOURCE_DIR.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:_HASH_CHARS]


def build(compiler: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the compiled library, compiling it first unless the cache already holds it."""
    compiler_path = find_compiler(compiler)
    target = Path(cache_dir or cache_root()) / build_key(compiler_path) / LIBRARY_NAME
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
        os.close(handle)
    except OSError as error:
        raise BuildError(f"cannot write the kernel cache {target.parent}: {error}; set EFFLLM_CACHE_DIR") from None
    command = [compiler_path, *FLAGS, f"-I{SOURCE_DIR}", *map(str, sources()), "-o", temporary]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise BuildError(f"{Path(compiler_path).name} failed: {' | '.join(detail[:5])}")
        os.replace(temporary, target)  # atomic: others see no file or the whole file
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"cannot run {compiler_path}: {error}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def load(path: str | os.PathLike) -> ctypes.CDLL:
    """Loads a built library and declares its kernels' signatures."""
    from . import _cpu_abi

    try:
        return _cpu_abi.declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as error:
        raise BuildError(f"cannot load {path}: {error}") from None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded C kernel library (built on first call), or None after one warning when unavailable."""
    try:
        return load(build())
    except BuildError as error:
        warnings.warn(f"effllm: C kernels for CPU tensors unavailable, using the torch reference ({error})",
                      RuntimeWarning, stacklevel=2)
        return None
