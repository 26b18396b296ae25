"""The GPU kernels compile for real GPUs, checked here without one (``kernels/offline_compile.py``).

The interpreter runs a kernel's Python, not the compiler: a layout the compiler rejects, or accesses that stay
scalar where they should be vectors, only show when Triton lowers the kernel to PTX and ``ptxas`` assembles it.
The suite runs under ``TRITON_INTERPRET=1``, which turns every kernel into an interpreted function, so the
compilation runs in a child process without it: every path of the optimizer update (masked programs, whole ones,
whole and aligned; 8, 4 and 32-bit states; fp32 and bf16 parameters) and the other layouts the GPU benchmark
times, for sm_90 (H100/H200), and 8-bit AdamW's paths for sm_80 (A100).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from effllm.kernels.offline_compile import OTHER_LAYOUT  # noqa: E402


def _offline(*args: str) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "effllm.kernels.offline_compile", "--json", *args],
                            capture_output=True, text=True, env=env, timeout=600)
    if "no NVIDIA backend" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def hopper() -> dict[str, dict]:
    return {report["label"]: report for report in _offline()}


def test_every_update_path_compiles_for_hopper_without_spills(hopper):
    labels = list(hopper)
    for case in ("adamw 8-bit fp32", "adamw 8-bit bf16", "adam 4-bit fp32", "lion 32-bit fp32"):
        for path in ("masked", "whole", "whole+aligned"):
            assert any(label.startswith(f"{case}, {path},") for label in labels), (case, path)
    assert len([label for label in labels if label.startswith(OTHER_LAYOUT)]) >= 4  # what the benchmark times
    for label, report in hopper.items():
        assert report["registers"] > 0 and 0 < report["common_path_per_element"] < report["instructions"]
        if "at most" in label:  # a register cap holds
            assert report["registers"] <= int(label.split("at most ")[1].split()[0]), report
        if not label.startswith(OTHER_LAYOUT):  # the launcher's layouts: a spill there is a performance bug
            assert report["spill_bytes"] == 0, report


def test_whole_aligned_programs_use_vector_accesses(hopper):
    """The point of whole programs: with aligned pointers, parameters, gradients and codes move as vectors
    (``ld.global.v2``/``v4``) instead of one element per instruction; masked programs cannot."""
    for case in ("adamw 8-bit fp32", "adam 4-bit fp32", "lion 32-bit fp32"):
        by_path = {label.split(", ")[1]: report for label, report in hopper.items() if label.startswith(case + ",")}
        assert by_path["whole+aligned"]["vector_accesses"] > 0, case
        assert by_path["masked"]["vector_accesses"] == 0, case
    one_warp_per_block = next(r for label, r in hopper.items() if label.startswith(OTHER_LAYOUT)
                              and "whole+aligned" in label and label.endswith("1024/program, 4 warps"))
    assert one_warp_per_block["vector_accesses"] >= 4  # param and grad loads, param store, codes


def test_update_compiles_for_ampere():
    reports = _offline("--capability", "80", "--launcher-only", "--case", "adamw 8-bit fp32")
    assert len(reports) == 3  # masked, whole, whole+aligned
    assert all(report["registers"] > 0 for report in reports)


def test_resident_warps_follow_registers_and_the_program_limit():
    from effllm.kernels.offline_compile import resident_warps

    assert resident_warps(32, 4) == 64  # the SM's 64 warps
    assert resident_warps(72, 1) == 28  # 2304 registers per warp
    assert resident_warps(32, 1) == 32  # 32 programs of one warp at most
    assert resident_warps(48, 2) == 42
