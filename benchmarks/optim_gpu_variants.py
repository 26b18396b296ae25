"""Where the GPU optimizer update spends its time: variants of the 8-bit AdamW kernel timed side by side.

Each variant is a copy of ``kernels/_optim_update_triton.py``'s kernel with one part swapped (its jitted helpers
are re-jitted with other globals) or with other launch settings; every variant is also run once on a smaller
parameter and compared bit for bit with the first (searched) one, so a faster exact variant can be adopted and a
diagnostic one (marked ``diag``, results not exact by design) says what removing that part would buy.

    python benchmarks/optim_gpu_variants.py               # needs a CUDA device (10 variants took 30 s on an H200)
    python benchmarks/optim_gpu_variants.py --numel 64M
    TRITON_INTERPRET=1 python benchmarks/optim_gpu_variants.py --check-only   # no GPU: does every variant run?
    ncu --metrics l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum \
        python benchmarks/optim_gpu_variants.py --numel 16M --only "(now)"    # sectors per load: the gathers' spread

Prints a table (ms, share of the bandwidth bound measured in the same run, exact or not). docs/optim.md, "GPU
kernel", records what it showed.
"""

from __future__ import annotations

import argparse
import os
import types

import torch
import triton
import triton.language as tl
from effllm.kernels import _optim_update_triton as update
from effllm.kernels._blockwise_triton import map_code, search_steps
from effllm.kernels.blockwise import num_blocks
from effllm.kernels.dynamic_codes import SEARCHED
from effllm.kernels.optim_update import Hyper, ParamSlot
from effllm.kernels.quant_maps import dynamic_map

from effllm.bench.optim_gpu import copy_bandwidth, median_ms, parse_numel, step_bytes

CHECK_NUMEL = (8 << 20) + 1031  # a tail block too: whole and masked programs
CHECK_NUMEL_INTERPRETED = 4 * 256 * 3 + 1031  # --check-only on the CPU (interpreter)
BYTES_PER_ELEMENT = step_bytes(4, 4, 1, 256)


def rejit(function, **globals_override):
    """A new jitted copy of ``function`` that sees ``globals_override`` instead of its module's globals."""
    source = function.fn
    namespace = dict(source.__globals__, **globals_override)
    copy = types.FunctionType(source.__code__, namespace, source.__name__, source.__defaults__, source.__closure__)
    copy.__module__, copy.__qualname__ = source.__module__, source.__qualname__
    copy.__annotations__ = dict(source.__annotations__)  # tl.constexpr parameters are found through these
    return triton.jit(copy)


@triton.jit
def encode_nothing(x, mid_ptr, n_mid, BITS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                   COMPUTED: tl.constexpr, SIGNED: tl.constexpr):
    return (x * 100.0 + 128.0).to(tl.int32) & 255


@triton.jit
def load_without_gather(state_addr, absmax_addr, qmap_ptr, block, block_mask, offs, mask, byte_offs, byte_mask,
                        BITS: tl.constexpr, ALIGNED: tl.constexpr):
    code = tl.load(update._data_pointer(state_addr, tl.uint8, ALIGNED) + offs, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(absmax_addr.to(tl.pointer_type(tl.float32)) + block, mask=block_mask, other=0.0)
    return code.to(tl.float32) * 0.00390625 * absmax[:, None]


@triton.jit
def store_without_reduction(new, state_addr, absmax_addr, mid_ptr, n_mid, block, block_mask, offs,
                            mask, byte_offs, byte_mask, BITS: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
                            SEARCH_STEPS: tl.constexpr, COMPUTED: tl.constexpr, SIGNED: tl.constexpr,
                            ALIGNED: tl.constexpr):
    """Requantizes against the block's old absmax: no cross-warp maximum (and its barrier) per state."""
    absmax = tl.load(absmax_addr.to(tl.pointer_type(tl.float32)) + block, mask=block_mask, other=1.0)
    scale = tl.where(absmax > 0, absmax, 1.0)
    code = map_code(tl.minimum(tl.maximum(tl.math.div_rn(new, scale[:, None]), -1.0), 1.0), mid_ptr, n_mid,
                         BITS, SEARCH_STEPS, COMPUTED, SIGNED)
    tl.store(update._data_pointer(state_addr, tl.uint8, ALIGNED) + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def work_from_program_id(table_ptr, work_ptr, ROWS: tl.constexpr, WHOLE: tl.constexpr):
    """Block ``program_id * ROWS`` of the first parameter: no work-table load (exact for one parameter)."""
    return table_ptr, tl.program_id(0).to(tl.int64) * ROWS


_ALL_MASKED: dict[int, update._LaunchTables] = {}


def tables_all_masked(tensors, numels, layout, device):
    """Every program through the masked path with no alignment hints: the kernel before whole programs (built
    once per set of tables, so that the timed steps do not rebuild them)."""
    tables = _TABLES(tensors, numels, layout, device)
    if id(tables) not in _ALL_MASKED:
        programs = [triton.cdiv(num_blocks(n, layout.rows_len), layout.rows) for n in numels]
        work, bases = update._work_table([0] * len(numels), programs)
        pointers = tables.pointers.clone()
        pointers[:, update.COL_PARTIAL_BASE.value] = bases.to(device)
        _ALL_MASKED[id(tables)] = update._LaunchTables(pointers, work[:0].to(device), work.to(device), False)
    return _ALL_MASKED[id(tables)]


_TABLES = update._tables
# Every layout variant names its warps and register cap (None: ptxas's choice), so that it stays the same layout
# when the launcher's default changes.
UNCAPPED = dict(registers=None)
VARIANTS = {
    "searched, 2048/program, 8 warps (before)": dict(searched=True, elements=2048, warps=8, **UNCAPPED),
    "computed, 256/program, 4 warps, all masked": dict(tables=tables_all_masked, warps=4, **UNCAPPED),
    "computed, 256/program, 1 warp, 64 registers (now)": dict(),
    "computed, 256/program, 1 warp, 64 registers, hints": dict(hints=True),
    "computed, 256/program, 1 warp, 56 registers": dict(registers=56),
    "computed, 256/program, 1 warp, 72 registers": dict(registers=72),
    "computed, 256/program, 1 warp": dict(warps=1, **UNCAPPED),
    "computed, 256/program, 1 warp, alignment hints": dict(warps=1, hints=True, **UNCAPPED),
    "computed, 256/program, 4 warps (until session 10)": dict(warps=4, **UNCAPPED),
    "computed, 256/program, 4 warps, alignment hints": dict(warps=4, hints=True, **UNCAPPED),
    "computed, 256/program, 4 warps, 32 registers": dict(warps=4, registers=32),
    "computed, 512/program, 4 warps": dict(elements=512, warps=4, **UNCAPPED),
    "computed, 256/program, 2 warps": dict(warps=2, **UNCAPPED),
    "computed, 256/program, 2 warps, alignment hints": dict(warps=2, hints=True, **UNCAPPED),
    "computed, 256/program, 2 warps, 40 registers": dict(warps=2, registers=40),
    "computed, 512/program, 2 warps": dict(elements=512, warps=2, **UNCAPPED),
    "computed, 512/program, 2 warps, 64 registers": dict(elements=512, warps=2, registers=64),
    "computed, 1024/program, 4 warps": dict(elements=1024, warps=4, **UNCAPPED),
    "computed, 1024/program, 4 warps, 64 registers": dict(elements=1024, warps=4, registers=64),
    # Diagnostics at the launcher's layout:
    "diag: no state-value gathers": dict(load=load_without_gather),
    "diag: no encoding": dict(encode=encode_nothing),
    "diag: neither gathers nor encoding": dict(encode=encode_nothing, load=load_without_gather),
    # The work table is read before anything else: what does that dependent load cost a program?
    "diag: no work-table load (one parameter)": dict(work=work_from_program_id),
    "diag: no absmax reductions": dict(store=store_without_reduction),
}
_SETTINGS = ("QUANTIZED_ELEMENTS_PER_PROGRAM", "QUANTIZED_WARPS", "QUANTIZED_MAX_REGISTERS",
             "_optim_update_kernel", "map_code_constexprs", "_tables", "ALIGNMENT_HINTS")


def apply(spec: dict) -> dict:
    """Patch the kernel module for one variant; returns what to restore."""
    saved = {name: getattr(update, name) for name in _SETTINGS}
    if spec.get("searched"):
        update.map_code_constexprs = lambda qmap, device: dict(SEARCH_STEPS=search_steps(qmap.numel()),
                                                                COMPUTED=SEARCHED, BITS=0, SIGNED=False)
    if "elements" in spec:
        update.QUANTIZED_ELEMENTS_PER_PROGRAM = spec["elements"]
    if "warps" in spec:
        update.QUANTIZED_WARPS = spec["warps"]
    if "tables" in spec:
        update._tables = spec["tables"]
    if "hints" in spec:
        update.ALIGNMENT_HINTS = spec["hints"]
    if "registers" in spec:
        update.QUANTIZED_MAX_REGISTERS = spec["registers"]
    if {"encode", "load", "store", "work"} & spec.keys():
        store = rejit(spec.get("store", update._store_state), map_code=spec.get("encode", update.map_code))
        update._optim_update_kernel = rejit(update._optim_update_kernel, _store_state=store,
                                            _load_state=spec.get("load", update._load_state),
                                            _work_item=spec.get("work", update._work_item))
    return saved


LAYOUT_KEYS = {"elements", "warps", "registers", "hints"}


def layout_label(spec: dict) -> str | None:
    """The variant's layout as EFFLLM_TRITON_OPTIM_LAYOUT spells it (with ``spec`` applied), or None for a variant
    that changes more than the layout."""
    if not spec.keys() <= LAYOUT_KEYS:
        return None
    layout = update._layout(8, 256)
    return update.LayoutOverride(layout.rows * layout.tile, layout.num_warps, layout.max_registers,
                                 layout.alignment_hints).label()


def restore(saved: dict) -> None:
    for name, value in saved.items():
        setattr(update, name, value)


def make_slot(numel: int, seed: int, device: str = "cuda") -> ParamSlot:
    generator = torch.Generator(device=device).manual_seed(seed)
    blocks = (numel + 255) // 256

    def codes():
        return torch.randint(0, 256, (numel,), device=device, generator=generator, dtype=torch.uint8)

    return ParamSlot(torch.randn(numel, device=device, generator=generator),
                     torch.randn(numel, device=device, generator=generator) * 1e-2, codes(), codes(),
                     torch.rand(blocks, device=device, generator=generator) * 0.1,
                     torch.rand(blocks, device=device, generator=generator) * 1e-3)


def checked_result(checked: ParamSlot, maps, hyper) -> list[torch.Tensor]:
    """One step of the current variant on a copy of ``checked``: parameter, codes and absmax as bytes."""
    slot = ParamSlot(*(tensor.clone() for tensor in vars(checked).values()))
    update.optim_update_many_triton("adamw", [slot], *maps, hyper, 8, 256)
    return [slot.param.view(torch.uint8), slot.state1, slot.state2, slot.absmax1.view(torch.uint8),
            slot.absmax2.view(torch.uint8)]


def check_only(device: str, hyper: Hyper) -> None:
    """Every variant on a small parameter, no timing: runs on the CPU under TRITON_INTERPRET=1, so a broken
    variant shows before a GPU session is spent on it."""
    maps = (dynamic_map(True, 8, device), dynamic_map(False, 8, device))
    checked = make_slot(CHECK_NUMEL_INTERPRETED, seed=1, device=device)
    reference = None
    for name, spec in VARIANTS.items():
        saved = apply(spec)
        try:
            result = checked_result(checked, maps, hyper)
            label = layout_label(spec) or "-"
        finally:
            restore(saved)
        reference = reference or result
        exact = all(torch.equal(a, b) for a, b in zip(result, reference))
        print(f"{name:48s} exact {exact!s:5s}  layout {label}", flush=True)


class RecordingKernel:
    """Stands in for the update kernel and keeps what each launch compiled (registers and spills per variant)."""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.kernel[grid](*args, **kwargs)
            self.compiled.append(compiled)
            return compiled

        return launch

    def registers(self) -> str:
        """Registers (and spills) of the kernels launched, e.g. "78" or "40/34" (whole programs, then tails)."""
        seen = []
        for compiled in self.compiled:
            regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", 0)
            label = "?" if regs is None else f"{regs}" + (f"+{spills} spilled" if spills else "")
            if label not in seen:
                seen.append(label)
        return "/".join(seen) or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", default="256M", type=parse_numel,
                        help="elements of the timed parameter (default 256M = 256 * 2**20)")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the variants whose name contains TEXT (repeatable; e.g. under Nsight Compute); "
                             "exactness is then judged against the first of them")
    parser.add_argument("--check-only", action="store_true",
                        help="run each variant once on a small parameter and say whether it is exact, no timing "
                             "(on the CPU with TRITON_INTERPRET=1 when there is no GPU)")
    args = parser.parse_args()
    os.environ.pop(update.LAYOUT_VARIABLE, None)  # the variants set their own layouts
    if args.only:
        chosen = {name: spec for name, spec in VARIANTS.items() if any(text in name for text in args.only)}
        if not chosen:
            raise SystemExit(f"optim_gpu_variants.py: no variant name contains {' or '.join(args.only)!r}")
        VARIANTS.clear()
        VARIANTS.update(chosen)
    hyper = Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=5)
    if args.check_only:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("optim_gpu_variants.py --check-only: no GPU here; "
                             "set TRITON_INTERPRET=1 to run on the CPU")
        return check_only("cuda" if torch.cuda.is_available() else "cpu", hyper)
    if not torch.cuda.is_available():
        raise SystemExit("optim_gpu_variants.py: no CUDA device is visible here; run it on a machine with a GPU")
    numel = args.numel
    maps = (dynamic_map(True, 8, "cuda"), dynamic_map(False, 8, "cuda"))
    bound_ms = BYTES_PER_ELEMENT * numel / copy_bandwidth() * 1e3
    timed, checked = make_slot(numel, seed=0), make_slot(CHECK_NUMEL, seed=1)
    reference, layouts = None, []  # (ms, layout label) of the exact variants that only change the layout
    print(f"{'variant':48s} {'ms':>8s} {'of bound':>9s}  exact  registers")
    for name, spec in VARIANTS.items():
        saved = apply(spec)
        recorder = update._optim_update_kernel = RecordingKernel(update._optim_update_kernel)
        try:
            ms = median_ms(lambda: update.optim_update_many_triton("adamw", [timed], *maps, hyper, 8, 256),
                           warmup=2, timed=10)
            result = checked_result(checked, maps, hyper)
            reference = reference or result
            exact = all(torch.equal(a, b) for a, b in zip(result, reference))
            print(f"{name:48s} {ms:8.3f} {bound_ms / ms:9.1%}  {exact!s:5s}  {recorder.registers()}", flush=True)
            label = layout_label(spec)
            if exact and label is not None:
                layouts.append((ms, label))
        finally:
            restore(saved)
    if layouts:
        ms, label = min(layouts)
        # benchmarks/gpu_check.sh reads this line: EFFLLM_TRITON_OPTIM_LAYOUT=<label> times the whole optimizer so.
        print(f"fastest exact layout: {label} ({ms:.3f} ms, {bound_ms / ms:.1%} of bound); "
              f"the launcher's: {layout_label({})}")


if __name__ == "__main__":
    main()
