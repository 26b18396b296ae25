"""Compile the Triton kernels for NVIDIA GPUs on a machine without one, and report what the compiler made.

The interpreter (``TRITON_INTERPRET=1``) runs a kernel's Python, not the compiler: layouts, vectorised accesses,
register allocation and spills only show when Triton lowers the kernel to PTX and ``ptxas`` assembles it.
Triton's Linux wheels carry ``ptxas`` and ``cuobjdump``, so this runs anywhere:

    python -m effllm.kernels.offline_compile            # the optimizer update's launch configurations, sm_90
    python -m effllm.kernels.offline_compile --json     # the same as JSON (tests/kernels/test_triton_compile.py)

Registers and instruction counts say nothing of time on their own; they are what to look at between two
measurements on a GPU (a kernel that spills, or whose loads stay scalar, is the first suspect).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _optim_update_triton as update
from .optim_update import STATES, Hyper
from .quant_maps import make_map

HOPPER, AMPERE = 90, 80
WARP_SIZE = 32
# Per SM on sm_80 and sm_90: the register file, registers allocated per warp in steps of this many, and the most
# warps and programs (thread blocks) resident at once.
REGISTERS_PER_SM, REGISTER_ALLOCATION_UNIT = 65536, 256
MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM = 64, 32
FLOAT = "fp32"
# The update kernel's runtime arguments as the launcher passes them (tensors are pointers).
UPDATE_ARGUMENT_TYPES = dict(
    table_ptr="*i64", work_ptr="*i32", qmap1_ptr="*fp32", mid1_ptr="*fp32", n_mid1="i32",
    qmap2_ptr="*fp32", mid2_ptr="*fp32", n_mid2="i32", lr=FLOAT, beta1=FLOAT, beta2=FLOAT,
    eps=FLOAT, weight_decay=FLOAT, one_minus_beta1=FLOAT, one_minus_beta2=FLOAT, one_minus_dampening=FLOAT,
    decay_factor=FLOAT, step_size=FLOAT, bias_correction2_sqrt=FLOAT, bias_correction2_reciprocal=FLOAT,
    blocksize="i32")
_VECTOR_ACCESS = re.compile(r"\b(?:ld|st)\.global(?:\.\w+)*\.v[24]\b")


class OfflineCompileError(RuntimeError):
    """The kernels cannot be compiled here (interpreter mode, or a Triton without its NVIDIA backend)."""


def _tools_dir() -> Path:
    return Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"


def check_available() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise OfflineCompileError("TRITON_INTERPRET=1 makes every kernel an interpreted function; unset it")
    if not (_tools_dir() / "ptxas").exists():
        raise OfflineCompileError(f"no ptxas in {_tools_dir()}: this Triton build has no NVIDIA backend")


def compile_for(kernel, argument_types: dict, constexprs: dict, num_warps: int, capability: int = HOPPER,
                max_registers: int | None = None):
    """``kernel`` (a ``@triton.jit`` function) compiled to a cubin for an NVIDIA GPU of compute ``capability``,
    with at most ``max_registers`` registers per thread if given."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: "constexpr" if name in constexprs else argument_types[name] for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, WARP_SIZE),
                          options={"num_warps": num_warps, "maxnreg": max_registers, "enable_fp_fusion": False})


@dataclass(frozen=True)
class CompiledReport:
    """What ``ptxas`` made of one configuration. ``instructions`` counts the whole kernel once; ``common_path``
    counts what a program runs when no division takes its slow path (the kernel's body up to its exit, less the
    blocks branched over that call a subroutine), per element of the program: on a GPU whose issue slots are
    the limit, time per element follows it."""

    label: str
    registers: int
    spill_bytes: int  # local memory per thread: registers that did not fit
    shared_bytes: int
    instructions: int
    common_path_per_element: float
    vector_accesses: int  # global loads and stores of 2 or 4 elements per instruction, in the PTX
    resident_warps: int  # per SM, as registers and the program limit allow (shared memory is not the limit here)


def resident_warps(registers: int, num_warps: int) -> int:
    """Warps of programs of ``num_warps`` warps that one SM holds at once with ``registers`` per thread."""
    per_warp = -(-registers * WARP_SIZE // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    programs = min(REGISTERS_PER_SM // (per_warp * num_warps), MAX_WARPS_PER_SM // num_warps, MAX_PROGRAMS_PER_SM)
    return programs * num_warps


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")  # /*address*/ instruction;
_PREDICATED_BRANCH = re.compile(r"@!?U?P\w+\s+BRA\s+(0x[0-9a-f]+)")


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of every instruction in ``cuobjdump -sass`` output, padding NOPs left out."""
    lines = ((int(address, 16), text.strip()) for address, text in _SASS_LINE.findall(sass))
    return [(address, text) for address, text in lines if not text.startswith("NOP")]


def common_path_instructions(instructions: list[tuple[int, str]]) -> int:
    """Instructions of the kernel's body up to its last exit, less the slow-path blocks: the ones a predicated
    branch jumps over that contain a call (IEEE division's and square root's rare cases)."""
    end = max(address for address, text in instructions if text.endswith("EXIT"))
    body = [(address, text) for address, text in instructions if address <= end]
    skipped: set[int] = set()
    for address, text in body:
        branch = _PREDICATED_BRANCH.match(text)
        if branch:
            jumped = [(a, t) for a, t in body if address < a < int(branch.group(1), 16)]
            if any("CALL" in t for _, t in jumped):
                skipped.update(a for a, _ in jumped)
    return len(body) - len(skipped)


def report(label: str, compiled, elements_per_program: int, num_warps: int) -> CompiledReport:
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(_tools_dir() / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(_tools_dir() / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL|SHARED):(\d+)", usage))
    instructions = sass_instructions(sass)
    per_element = round(common_path_instructions(instructions) * WARP_SIZE * num_warps / elements_per_program, 1)
    vectors = len(_VECTOR_ACCESS.findall(compiled.asm["ptx"]))
    registers = int(fields.get("REG", 0))
    return CompiledReport(label, registers, int(fields.get("LOCAL", 0)), int(fields.get("SHARED", 0)),
                          len(instructions), per_element, vectors, resident_warps(registers, num_warps))


LAUNCHER_CAP = "launcher's"  # update_constexprs' default register cap: the launcher's (None means no cap)


def update_constexprs(algo: str, bits: int, blocksize: int, *, whole: bool, aligned: bool, p_dtype=torch.float32,
                      map_kinds: tuple[str, str] = ("dynamic", "dynamic"), rows: int | None = None,
                      num_warps: int | None = None, max_registers: int | None | str = LAUNCHER_CAP):
    """The update kernel's constexprs and layout (``_optim_update_triton._Layout``) as
    ``_optim_update_triton._launch`` sets them for a step with weight decay past the first, the states' maps of
    ``map_kinds`` (first moment signed, second unsigned), or with ``rows`` blocks per program in ``num_warps``
    warps of at most ``max_registers`` registers (None: no cap; by default the launcher's)."""
    layout = update._layout(bits, blocksize)
    layout = dataclasses.replace(layout, rows=rows or layout.rows, num_warps=num_warps or layout.num_warps,
                                 max_registers=layout.max_registers if max_registers == LAUNCHER_CAP
                                 else max_registers)
    hyper = Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=2)
    has_states = STATES[algo]
    cpu, placeholder = torch.device("cpu"), torch.zeros(1, dtype=torch.int64)
    maps = tuple(update._map_args(make_map(kind, signed, bits) if bits != 32 and has else None, cpu, placeholder)
                 for kind, signed, has in zip(map_kinds, (True, False), has_states))
    constexprs = update._launch_constexprs(algo, bits, hyper, layout, maps, has_states, p_dtype, p_dtype,
                                           aligned=aligned)
    return dict(constexprs, WHOLE=whole), layout


# (label, algorithm, state bits, blocksize, parameter dtype, map kinds as BlockwiseOptimizer picks them)
UPDATE_CASES = [("adamw 8-bit fp32", "adamw", 8, 256, torch.float32, ("dynamic", "dynamic")),
                ("adamw 8-bit bf16", "adamw", 8, 256, torch.bfloat16, ("dynamic", "dynamic")),
                ("adam 4-bit fp32", "adam", 4, 128, torch.float32, ("dynamic", "linear_nozero")),
                ("lion 32-bit fp32", "lion", 32, 0, torch.float32, ("dynamic", "dynamic"))]
PATHS = [("masked", False, False), ("whole", True, False), ("whole+aligned", True, True)]
# Other layouts of the 8-bit AdamW program (blocks per program, warps, register cap; None: no cap), timed in
# benchmarks/optim_gpu_variants.py. The launcher's (256/1 under a cap of 64) holds 8 elements per thread, so a
# block's maxima need no shared memory; so do 512/2 and 1024/4. 256/4 was the launcher's until an H100 timed them.
# Programs of one warp are held to 32 warps per SM by the program limit, which 64 registers already allow.
LAYOUTS = [(1, 4, None), (1, 4, 32), (1, 1, None), (1, 1, 56), (1, 2, None), (1, 2, 40), (2, 2, None), (2, 2, 48),
           (2, 4, None), (4, 4, None)]
OTHER_LAYOUT = "other layout: "  # label prefix of those (the rest are the launcher's own layouts)


def update_reports(capability: int = HOPPER, other_layouts: bool = True, cases: list[str] | None = None
                   ) -> list[CompiledReport]:
    """Every path of the update kernel for each case in ``UPDATE_CASES`` (or those labelled in ``cases``) at the
    launcher's layout, then (with ``other_layouts``) 8-bit AdamW's whole programs, with and without alignment
    hints, at each of ``LAYOUTS``."""
    check_available()
    reports = []
    for case_label, algo, bits, blocksize, p_dtype, map_kinds in UPDATE_CASES:
        if cases is not None and case_label not in cases:
            continue
        for path_label, whole, aligned in PATHS:
            constexprs, layout = update_constexprs(algo, bits, blocksize, whole=whole, aligned=aligned,
                                                   p_dtype=p_dtype, map_kinds=map_kinds)
            compiled = compile_for(update._optim_update_kernel, UPDATE_ARGUMENT_TYPES, constexprs, layout.num_warps,
                                   capability, layout.max_registers)
            elements = constexprs["ROWS"] * constexprs["TILE"]
            reports.append(report(f"{case_label}, {path_label}, {_layout_label(elements, layout)}", compiled,
                                  elements, layout.num_warps))
    for rows, num_warps, max_registers in LAYOUTS if other_layouts else []:
        for path_label, aligned in (("whole", False), ("whole+aligned", True)):
            constexprs, layout = update_constexprs("adamw", 8, 256, whole=True, aligned=aligned, rows=rows,
                                                   num_warps=num_warps, max_registers=max_registers)
            compiled = compile_for(update._optim_update_kernel, UPDATE_ARGUMENT_TYPES, constexprs, num_warps,
                                   capability, max_registers)
            label = f"{OTHER_LAYOUT}adamw 8-bit fp32, {path_label}, {_layout_label(rows * 256, layout)}"
            reports.append(report(label, compiled, rows * 256, num_warps))
    return reports


def _layout_label(elements: int, layout) -> str:
    cap = f", at most {layout.max_registers} registers" if layout.max_registers else ""
    return f"{elements}/program, {layout.num_warps} warp{'s' if layout.num_warps > 1 else ''}{cap}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=HOPPER, help="compute capability (default 90: H100/H200)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--launcher-only", action="store_true", help="only the layouts the launcher uses")
    parser.add_argument("--case", action="append", choices=[case[0] for case in UPDATE_CASES],
                        help="only this case (repeatable; default: all)")
    args = parser.parse_args(argv)
    print(f"Triton {triton.__version__}", file=sys.stderr)
    try:
        reports = update_reports(args.capability, other_layouts=not args.launcher_only, cases=args.case)
    except OfflineCompileError as error:
        raise SystemExit(f"offline_compile: {error}") from None
    if args.json:
        print(json.dumps([asdict(r) for r in reports]))
        return
    print(f"| optimizer update (sm_{args.capability}) | registers | resident warps per SM | spill bytes | "
          "instructions | common path per element | vector accesses |")
    print("|---|---|---|---|---|---|---|")
    for r in reports:
        print(f"| {r.label} | {r.registers} | {r.resident_warps} | {r.spill_bytes} | {r.instructions} | "
              f"{r.common_path_per_element} | {r.vector_accesses} |")


if __name__ == "__main__":
    main()
