"""Where the GPU optimizer update spends its time: variants of the 8-bit AdamW kernel timed side by side.

Each variant is a copy of ``kernels/_optim_update_triton.py``'s kernel with one part swapped (its jitted helpers
are re-jitted with other globals) or with other launch settings; every variant is also run once on a smaller
parameter and compared bit for bit with the first (searched) one, so a faster exact variant can be adopted and a
diagnostic one (marked ``diag``, results not exact by design) says what removing that part would buy.

    python benchmarks/optim_gpu_variants.py               # needs a CUDA device; about 30 s on an H200
    python benchmarks/optim_gpu_variants.py --numel 64M

Prints a table (ms, share of the bandwidth bound measured in the same run, exact or not). docs/optim.md, "GPU
kernel", records what it showed.
"""

from __future__ import annotations

import argparse
import types

import torch
import triton
import triton.language as tl
from effllm.kernels import _optim_update_triton as update
from effllm.kernels._blockwise_triton import map_code
from effllm.kernels.optim_update import Hyper, ParamSlot
from effllm.kernels.quant_maps import dynamic_map

from effllm.bench.optim_gpu import copy_bandwidth, median_ms, parse_numel, step_bytes

CHECK_NUMEL = 8 << 20
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
def encode_nothing(x, mid_ptr, n_mid, dynamic_ptr, BITS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                   COMPUTED: tl.constexpr, SIGNED: tl.constexpr):
    return (x * 100.0 + 128.0).to(tl.int32) & 255


@triton.jit
def load_without_gather(state_addr, absmax_addr, qmap_ptr, block, block_mask, offs, mask, byte_offs, byte_mask,
                        BITS: tl.constexpr):
    code = tl.load(state_addr.to(tl.pointer_type(tl.uint8)) + offs, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(absmax_addr.to(tl.pointer_type(tl.float32)) + block, mask=block_mask, other=0.0)
    return code.to(tl.float32) * 0.00390625 * absmax[:, None]


@triton.jit
def store_with_reciprocal(new, state_addr, absmax_addr, mid_ptr, n_mid, dynamic_ptr, block, block_mask, offs, mask,
                          byte_offs, byte_mask, BITS: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
                          SEARCH_STEPS: tl.constexpr, COMPUTED: tl.constexpr, SIGNED: tl.constexpr):
    absmax = tl.max(tl.where(mask, tl.abs(new), 0.0), axis=1)
    scale = tl.where(absmax > 0, absmax, 1.0)
    code = map_code(new * (1.0 / scale)[:, None], mid_ptr, n_mid, dynamic_ptr, BITS, SEARCH_STEPS, COMPUTED, SIGNED)
    tl.store(state_addr.to(tl.pointer_type(tl.uint8)) + offs, code.to(tl.uint8), mask=mask)
    tl.store(absmax_addr.to(tl.pointer_type(tl.float32)) + block, absmax, mask=block_mask)


@triton.jit
def store_without_reduction(new, state_addr, absmax_addr, mid_ptr, n_mid, dynamic_ptr, block, block_mask, offs,
                            mask, byte_offs, byte_mask, BITS: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
                            SEARCH_STEPS: tl.constexpr, COMPUTED: tl.constexpr, SIGNED: tl.constexpr):
    """Requantizes against the block's old absmax: no cross-warp maximum (and its barrier) per state."""
    absmax = tl.load(absmax_addr.to(tl.pointer_type(tl.float32)) + block, mask=block_mask, other=1.0)
    scale = tl.where(absmax > 0, absmax, 1.0)
    code = map_code(tl.minimum(tl.maximum(tl.math.div_rn(new, scale[:, None]), -1.0), 1.0), mid_ptr, n_mid,
                         dynamic_ptr, BITS, SEARCH_STEPS, COMPUTED, SIGNED)
    tl.store(state_addr.to(tl.pointer_type(tl.uint8)) + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def work_from_program_id(table_ptr, work_ptr, ROWS: tl.constexpr):
    """Block ``program_id * ROWS`` of the first parameter: no work-table load (exact for one parameter)."""
    return table_ptr, tl.program_id(0).to(tl.int64) * ROWS


@triton.jit
def work_row_with_pointers(table_ptr, work_ptr, ROWS: tl.constexpr):
    """The program's work row holds its parameter's pointer row itself, then the first block: one dependent
    load fewer (see ``tables_with_pointers``)."""
    row = work_ptr + tl.program_id(0) * (update.TABLE_COLS + 1)
    return row, tl.load(row + update.TABLE_COLS)


_WIDE_WORK: dict[int, torch.Tensor] = {}


def tables_with_pointers(tensors, numels, rows_len, rows, device):
    """``_tables`` with each work row widened to [its parameter's pointer row, first block] (built once)."""
    table, work = _TABLES(tensors, numels, rows_len, rows, device)
    if id(work) not in _WIDE_WORK:
        _WIDE_WORK[id(work)] = torch.cat([table[work[:, 0]], work[:, 1:]], dim=1).contiguous()
    return table, _WIDE_WORK[id(work)]


_TABLES = update._tables
VARIANTS = {
    "searched, 2048/program, 8 warps (before)": dict(searched=True, elements=2048, warps=8),
    "computed, 256/program, 4 warps (now)": dict(),
    "computed, 512/program, 4 warps": dict(elements=512),
    "diag: no state-value gathers": dict(load=load_without_gather),
    "diag: reciprocal instead of division": dict(store=store_with_reciprocal),
    "diag: no encoding": dict(encode=encode_nothing),
    "diag: all three": dict(encode=encode_nothing, load=load_without_gather, store=store_with_reciprocal),
    # The work table is read before anything else: what does that dependent load cost a program?
    "diag: no work-table load (one parameter)": dict(work=work_from_program_id),
    "diag: no absmax reductions": dict(store=store_without_reduction),
    "computed, 256/program, pointers in work rows": dict(work=work_row_with_pointers, tables=tables_with_pointers),
}
_SETTINGS = ("QUANTIZED_ELEMENTS_PER_PROGRAM", "QUANTIZED_MIN_WARPS", "num_warps_for", "_optim_update_kernel",
             "codes_for_kernels", "_tables")


def apply(spec: dict) -> dict:
    """Patch the kernel module for one variant; returns what to restore."""
    saved = {name: getattr(update, name) for name in _SETTINGS}
    if spec.get("searched"):
        update.codes_for_kernels = lambda *args, **kwargs: None
    if "elements" in spec:
        update.QUANTIZED_ELEMENTS_PER_PROGRAM = spec["elements"]
    if "warps" in spec:
        update.num_warps_for = lambda _elements, warps=spec["warps"]: warps
        update.QUANTIZED_MIN_WARPS = spec["warps"]
    if "tables" in spec:
        update._tables = spec["tables"]
    if {"encode", "load", "store", "work"} & spec.keys():
        store = rejit(spec.get("store", update._store_state), map_code=spec.get("encode", update.map_code))
        update._optim_update_kernel = rejit(update._optim_update_kernel, _store_state=store,
                                            _load_state=spec.get("load", update._load_state),
                                            _work_item=spec.get("work", update._work_item))
    return saved


def restore(saved: dict) -> None:
    for name, value in saved.items():
        setattr(update, name, value)


def make_slot(numel: int, seed: int) -> ParamSlot:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    blocks = (numel + 255) // 256

    def codes():
        return torch.randint(0, 256, (numel,), device="cuda", generator=generator, dtype=torch.uint8)

    return ParamSlot(torch.randn(numel, device="cuda", generator=generator),
                     torch.randn(numel, device="cuda", generator=generator) * 1e-2, codes(), codes(),
                     torch.rand(blocks, device="cuda", generator=generator) * 0.1,
                     torch.rand(blocks, device="cuda", generator=generator) * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", default="256M", type=parse_numel,
                        help="elements of the timed parameter (default 256M = 256 * 2**20)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("optim_gpu_variants.py: no CUDA device is visible here; run it on a machine with a GPU")
    numel = args.numel
    maps = (dynamic_map(True, 8, "cuda"), dynamic_map(False, 8, "cuda"))
    hyper = Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=5)
    bound_ms = BYTES_PER_ELEMENT * numel / copy_bandwidth() * 1e3
    timed, checked = make_slot(numel, seed=0), make_slot(CHECK_NUMEL, seed=1)
    reference = None
    print(f"{'variant':44s} {'ms':>8s} {'of bound':>9s}  exact")
    for name, spec in VARIANTS.items():
        saved = apply(spec)
        try:
            ms = median_ms(lambda: update.optim_update_many_triton("adamw", [timed], *maps, hyper, 8, 256),
                           warmup=2, timed=10)
            slot = ParamSlot(*(tensor.clone() for tensor in vars(checked).values()))
            update.optim_update_many_triton("adamw", [slot], *maps, hyper, 8, 256)
            result = [slot.param.view(torch.uint8), slot.state1, slot.state2, slot.absmax1.view(torch.uint8),
                      slot.absmax2.view(torch.uint8)]
            reference = reference or result
            exact = all(torch.equal(a, b) for a, b in zip(result, reference))
            print(f"{name:44s} {ms:8.3f} {bound_ms / ms:9.1%}  {exact}", flush=True)
        finally:
            restore(saved)


if __name__ == "__main__":
    main()
