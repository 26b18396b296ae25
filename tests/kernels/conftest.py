"""Every kernel test runs on each backend available here: the torch reference, the C kernels for CPU
tensors (when a compiler is present), Triton under the interpreter (when TRITON_INTERPRET=1), and CUDA."""

from __future__ import annotations

import pytest
import torch
from effllm.kernels import cpu_kernels_available, triton_available, triton_interpreting


def available_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs that can run in this process."""
    pairs = [("torch", "cpu")]
    if cpu_kernels_available():
        pairs.append(("cpu", "cpu"))
    if triton_available() and triton_interpreting():
        pairs.append(("triton", "cpu"))
    if torch.cuda.is_available() and triton_available() and not triton_interpreting():
        pairs.append(("triton", "cuda"))
    return pairs


@pytest.fixture(params=available_backends(), ids=lambda pair: f"{pair[0]}-{pair[1]}")
def backend(request, monkeypatch) -> tuple[str, str]:
    """Forces ``EFFLLM_KERNEL`` to one backend for the test; yields (backend, device)."""
    name, device = request.param
    monkeypatch.setenv("EFFLLM_KERNEL", name)
    return name, device


@pytest.fixture(params=[device for name, device in available_backends() if name == "triton"])
def triton_device(request) -> str:
    """Each device Triton kernels run on here: ``cpu`` under the interpreter, ``cuda`` on a GPU."""
    return request.param
