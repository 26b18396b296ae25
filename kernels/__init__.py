"""GPU/CPU hot paths of effllm, each op beside its pure-torch reference.

Backend choice for every op:

* ``"triton"``: Triton kernels; chosen for CUDA tensors when Triton is importable. With
  ``EFFLLM_KERNEL=triton`` on CPU tensors it runs under the Triton interpreter (``TRITON_INTERPRET=1``),
  which is how CI checks the kernels without a GPU.
* ``"cpu"``: small C kernels compiled on first use (like inductor does) for CPU tensors; the fast CPU path.
* ``"torch"``: the ``*_ref`` functions: the specification, and the fallback everywhere.

``EFFLLM_KERNEL=auto|torch|triton|cpu`` overrides the automatic choice. This module imports neither
CUDA nor Triton: they are touched only when a kernel is first used.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cpu")
_ENV_VAR = "EFFLLM_KERNEL"


def requested_backend() -> str:
    """The backend asked for through ``EFFLLM_KERNEL`` (default ``auto``)."""
    choice = os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{_ENV_VAR}={choice!r} is not a kernel backend; use one of {', '.join(BACKENDS)}")
    return choice


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(tensor: torch.Tensor) -> str:
    """The backend that runs an op whose main operand is ``tensor``."""
    choice = requested_backend()
    if choice == "auto":
        if tensor.is_cuda and triton_available():
            return "triton"
        if tensor.device.type == "cpu" and cpu_kernels_available():
            return "cpu"
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("EFFLLM_KERNEL=triton but Triton is not installed: pip install 'effllm[triton]'")
        if tensor.device.type == "cpu" and not triton_interpreting():
            raise RuntimeError("EFFLLM_KERNEL=triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1")
        return "triton"
    if choice == "cpu":
        if tensor.device.type != "cpu":
            return "torch"
        if not cpu_kernels_available():
            raise RuntimeError("EFFLLM_KERNEL=cpu but the C kernels could not be built (is a C compiler installed?)")
        return "cpu"
    return "torch"


def cpu_kernels_available() -> bool:
    """Whether the compiled C kernels for CPU tensors can be loaded (built on first call)."""
    from . import cpu_build

    return cpu_build.library() is not None


def describe() -> dict[str, str]:
    """What runs where: used by ``effllm env``."""
    info = {"requested": requested_backend(), "triton": "yes" if triton_available() else "no"}
    info["cpu tensors"] = backend_for(torch.empty(0))
    if torch.cuda.is_available():
        info["cuda tensors"] = backend_for(torch.empty(0, device="cuda"))
    return info
