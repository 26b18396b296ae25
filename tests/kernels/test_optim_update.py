"""The fused optimizer update: every backend equals ``optim_update_ref``, and the reference equals torch.optim.

Backends are compared one step at a time from identical inputs (each step restarts from the backend's own
result), so a difference cannot compound. Tolerances:

* parameters: fp32 ``rtol=1e-6, atol=1e-7``; bf16/fp16 torch's defaults for the dtype (one rounding step).
  The arithmetic is the same operation by operation, but torch's CPU ``sqrt`` is not always correctly
  rounded (measured: 665 of 4097 results off by one ulp) while the kernels' is, so fp32 results may differ in
  the last bit.
* 32-bit states: ``rtol=1e-6``; absmax ``rtol=1e-6``.
* codes: at most ``MAX_CODE_MISMATCH_FRACTION`` of them may differ, each by one (a state value that lands
  within an ulp of a midpoint can go either way); measured on the Triton interpreter: none.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from effllm.kernels.blockwise import dequantize_blockwise_ref, quantize_blockwise_ref
from effllm.kernels.optim_update import Hyper, ParamSlot, optim_update_many, optim_update_ref
from effllm.kernels.packing import pack_bits_ref, unpack_bits_ref
from effllm.kernels.quant_maps import make_map

# 17 x 241 = 4097: a 2-D parameter, one element past a whole number of blocks.
SHAPES = [(1,), (255,), (17, 241)]
BITS = [32, 8, 4]
BLOCKSIZE = {32: 0, 8: 256, 4: 128}  # 0: no blocks at 32 bits, as the optimizers pass it
# (first-moment map, second-moment map) kinds per state width, as BlockwiseOptimizer uses them.
MAP_KINDS = {8: ("dynamic", "dynamic"), 4: ("dynamic", "linear_nozero")}
LOW_PRECISION = [torch.bfloat16, torch.float16]

# name -> (algorithm, hyper-parameters, keeps a first-moment buffer)
CASES = {
    "adam": ("adam", Hyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01), True),
    "adamw": ("adamw", Hyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1), True),
    "lion": ("lion", Hyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1), True),
    "sgd": ("sgd", Hyper(lr=1e-2, beta1=0.9, dampening=0.1, weight_decay=0.01), True),
    "sgd_nesterov": ("sgd", Hyper(lr=1e-2, beta1=0.9, nesterov=True), True),
    "sgd_plain": ("sgd", Hyper(lr=1e-2, weight_decay=0.01), False),
    "rmsprop": ("rmsprop", Hyper(lr=1e-3, beta2=0.99, eps=1e-8, weight_decay=0.01), True),
    # maximize: the gradient's sign flips before L2 decay joins it (Adam, SGD), as in torch.optim
    "adam_maximize": ("adam", Hyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=True),
                      True),
    "sgd_maximize": ("sgd", Hyper(lr=1e-2, beta1=0.9, weight_decay=0.01, maximize=True), True),
    # lerp weights of 0.5 and more: torch.lerp's other formula (from the end)
    "adamw_low_beta1": ("adamw", Hyper(lr=1e-2, beta1=0.3, beta2=0.999, eps=1e-8, weight_decay=0.1), True),
    "lion_low_beta2": ("lion", Hyper(lr=1e-3, beta1=0.9, beta2=0.5, weight_decay=0.1), True),
}
KEEPS = {"adam": (True, True), "adamw": (True, True), "lion": (True, False), "sgd": (True, False),
         "rmsprop": (False, True)}

PARAM_TOLERANCE_FP32 = dict(rtol=1e-6, atol=1e-7)
STATE_TOLERANCE = dict(rtol=1e-6, atol=1e-9)
MAX_CODE_MISMATCH_FRACTION = 1e-3
# Gradient elements made non-finite (when the tensor is long enough).
NONFINITE = {3: float("nan"), 5: float("inf"), 9: float("-inf")}
# The Triton kernel computes those elements' update like any other and then keeps their old values, so under the
# interpreter numpy warns of the NaN it divides on the way.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@dataclasses.dataclass
class Setup:
    algo: str
    hyper: Hyper
    bits: int
    blocksize: int
    qmap1: torch.Tensor | None
    qmap2: torch.Tensor | None


def _setup(case: str, bits: int, device) -> Setup:
    algo, hyper, _ = CASES[case]
    qmap1 = qmap2 = None
    if bits != 32:
        kind1, kind2 = MAP_KINDS[bits]
        qmap1, qmap2 = make_map(kind1, True, bits, device), make_map(kind2, False, bits, device)
    return Setup(algo, hyper, bits, BLOCKSIZE[bits], qmap1, qmap2)


def _state(values: torch.Tensor, qmap, bits: int, blocksize: int):
    """(state, absmax) holding ``values``: fp32 at 32 bits, else blockwise codes (packed at 4 bits)."""
    if bits == 32:
        return values.clone(), None
    codes, absmax = quantize_blockwise_ref(values.reshape(-1), qmap, blocksize)
    return (codes if bits == 8 else pack_bits_ref(codes, bits)), absmax


def _slots(case: str, setup: Setup, shapes, dtype, device, seed: int = 0) -> list[ParamSlot]:
    """Parameters with non-zero states, as after some training, and no gradients yet."""
    generator = torch.Generator().manual_seed(seed)
    keep1, keep2 = KEEPS[setup.algo]
    keep1 = keep1 and CASES[case][2]
    slots = []
    for shape in shapes:
        param = torch.randn(shape, generator=generator).to(dtype=dtype, device=device)
        m = (torch.randn(shape, generator=generator) * 0.1).to(device)
        v = (torch.rand(shape, generator=generator) * 1e-3).to(device)
        state1, absmax1 = _state(m, setup.qmap1, setup.bits, setup.blocksize) if keep1 else (None, None)
        state2, absmax2 = _state(v, setup.qmap2, setup.bits, setup.blocksize) if keep2 else (None, None)
        slots.append(ParamSlot(param, torch.empty_like(param), state1, state2, absmax1, absmax2))
    return slots


def _set_gradients(slots, generator) -> None:
    for slot in slots:
        grad = torch.randn(slot.param.shape, generator=generator)
        flat = grad.view(-1)
        if flat.numel() > max(NONFINITE):
            for index, value in NONFINITE.items():
                flat[index] = value
        slot.grad = grad.to(dtype=slot.param.dtype, device=slot.param.device)


def _clone(slots) -> list[ParamSlot]:
    def copy(tensor):
        return tensor.clone() if tensor is not None else None

    return [ParamSlot(*(copy(getattr(s, field.name)) for field in dataclasses.fields(s))) for s in slots]


def _codes(state: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    return state if bits == 8 else unpack_bits_ref(state, bits, numel)


def _assert_codes_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    differ = actual != expected
    assert int(differ.sum()) <= MAX_CODE_MISMATCH_FRACTION * actual.numel(), (
        f"{int(differ.sum())} of {actual.numel()} codes differ from the reference")
    assert torch.all((actual.int() - expected.int()).abs()[differ] == 1), "a code differs by more than one"


def _assert_slots_close(actual: list[ParamSlot], expected: list[ParamSlot], bits: int) -> None:
    for got, want in zip(actual, expected):
        param_tolerance = PARAM_TOLERANCE_FP32 if want.param.dtype == torch.float32 else {}
        torch.testing.assert_close(got.param, want.param, **param_tolerance)
        numel = want.param.numel()
        for state, ref_state, absmax, ref_absmax in ((got.state1, want.state1, got.absmax1, want.absmax1),
                                                     (got.state2, want.state2, got.absmax2, want.absmax2)):
            if ref_state is None:
                continue
            if bits == 32:
                torch.testing.assert_close(state, ref_state, **STATE_TOLERANCE)
            else:
                _assert_codes_close(_codes(state, bits, numel), _codes(ref_state, bits, numel))
                torch.testing.assert_close(absmax, ref_absmax, rtol=STATE_TOLERANCE["rtol"], atol=0)


def _reference_step(setup: Setup, slots, hyper: Hyper) -> None:
    for s in slots:
        optim_update_ref(setup.algo, s.param, s.grad, s.state1, s.state2, s.absmax1, s.absmax2,
                         setup.qmap1, setup.qmap2, hyper, setup.bits, setup.blocksize)


def _compare_steps(setup: Setup, slots, steps) -> None:
    """Run ``steps`` (step numbers) on the chosen backend and on the reference from the same inputs."""
    generator = torch.Generator().manual_seed(1)
    for step in steps:
        hyper = dataclasses.replace(setup.hyper, step=step)
        _set_gradients(slots, generator)
        expected = _clone(slots)
        _reference_step(setup, expected, hyper)
        optim_update_many(setup.algo, slots, setup.qmap1, setup.qmap2, hyper, setup.bits, setup.blocksize)
        _assert_slots_close(slots, expected, setup.bits)


# --- every backend against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference(backend, case, bits):
    """fp32 parameters of odd sizes (1, 255, 4097) in one call. SGD also takes its first step, where the
    buffer starts as the gradient; for the others the first step is not special."""
    _, device = backend
    setup = _setup(case, bits, device)
    steps = (1, 2) if setup.algo == "sgd" else (2,)
    _compare_steps(setup, _slots(case, setup, SHAPES, torch.float32, device), steps=steps)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", ["adam", "adamw", "lion", "sgd", "rmsprop"])
def test_backend_matches_reference_low_precision(backend, case, bits, dtype):
    """bf16/fp16 parameters and gradients, updated in fp32."""
    _, device = backend
    setup = _setup(case, bits, device)
    _compare_steps(setup, _slots(case, setup, [(1,), (257,)], dtype, device), steps=(3,))


def test_backend_matches_reference_with_mixed_dtypes_in_one_call(backend):
    _, device = backend
    setup = _setup("adamw", 8, device)
    slots = _slots("adamw", setup, [(300,), (40,)], torch.float32, device)
    slots += _slots("adamw", setup, [(700,)], torch.bfloat16, device, seed=1)
    _compare_steps(setup, slots, steps=(4,))


@pytest.mark.parametrize("bits,blocksize,numel", [(8, 100, 1001), (4, 2, 37), (8, 1, 37), (8, 4096, 9000),
                                                   (8, 5000, 10001), (4, 33, 101)])
def test_backend_matches_reference_for_unusual_blocksizes(backend, bits, blocksize, numel):
    """Blocks that are not a power of two, the smallest blocks, the largest one Triton tile holds, longer
    blocks, and odd 4-bit blocks (whose codes share a byte with the next block)."""
    _, device = backend
    setup = dataclasses.replace(_setup("adam", bits, device), blocksize=blocksize)
    _compare_steps(setup, _slots("adam", setup, [(numel,)], torch.float32, device), steps=(2,))


@pytest.mark.parametrize("case,bits", [("adam", 32), ("adam", 8), ("adamw", 4), ("lion", 8), ("sgd", 4),
                                       ("rmsprop", 8)])
def test_nonfinite_gradient_elements_are_skipped(backend, case, bits):
    """A NaN/Inf gradient element leaves its parameter and state as they were; its neighbours update as usual."""
    _, device = backend
    setup = _setup(case, bits, device)
    hyper = dataclasses.replace(setup.hyper, step=2)
    bad = torch.tensor(list(NONFINITE), device=device)
    numel = 600
    slots = _slots(case, setup, [(numel,)], torch.float32, device)
    _set_gradients(slots, torch.Generator().manual_seed(2))
    clean = _clone(slots)
    clean[0].grad.view(-1)[bad] = 0.0
    before = _clone(slots)[0]
    optim_update_many(setup.algo, slots, setup.qmap1, setup.qmap2, hyper, setup.bits, setup.blocksize)
    optim_update_many(setup.algo, clean, setup.qmap1, setup.qmap2, hyper, setup.bits, setup.blocksize)
    after = slots[0]

    assert torch.equal(after.param[bad], before.param[bad])
    good = torch.ones(numel, dtype=torch.bool, device=device)
    good[bad] = False
    assert torch.equal(after.param[good], clean[0].param[good])
    assert not torch.equal(after.param[good], before.param[good])
    for index in (1, 2):
        state, old_state = getattr(after, f"state{index}"), getattr(before, f"state{index}")
        if state is None:
            continue
        if bits == 32:
            assert torch.equal(state[bad], old_state[bad]) and bool(torch.isfinite(state).all())
            continue
        qmap, absmax = getattr(setup, f"qmap{index}"), getattr(after, f"absmax{index}")
        assert bool(torch.isfinite(absmax).all())
        new_values = dequantize_blockwise_ref(_codes(state, bits, numel), absmax, qmap, setup.blocksize)
        old_values = dequantize_blockwise_ref(_codes(old_state, bits, numel), getattr(before, f"absmax{index}"),
                                              qmap, setup.blocksize)
        # Kept, then requantized against its block's new absmax: off by at most one gap of the map.
        largest_gap = float(qmap.diff().max())
        block_absmax = absmax[bad // setup.blocksize]
        assert torch.all((new_values[bad] - old_values[bad]).abs() <= largest_gap * block_absmax)


def test_empty_list_and_empty_parameters(backend):
    _, device = backend
    setup = _setup("adam", 8, device)
    optim_update_many("adam", [], setup.qmap1, setup.qmap2, setup.hyper, 8, 256)
    slots = _slots("adam", setup, [(0,), (5,)], torch.float32, device)
    _compare_steps(setup, slots, steps=(1,))


# --- the Triton launcher ----------------------------------------------------------------------------------



class _CountingKernel:
    """Stands in for a @triton.jit kernel and counts launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_triton_updates_a_group_in_two_launches_per_dtype(triton_device, monkeypatch):
    device = triton_device
    from effllm.kernels import _optim_update_triton

    monkeypatch.setenv("EFFLLM_KERNEL", "triton")
    counter = _CountingKernel(_optim_update_triton._optim_update_kernel)
    monkeypatch.setattr(_optim_update_triton, "_optim_update_kernel", counter)
    setup = _setup("adam", 8, device)
    slots = _slots("adam", setup, [(300,), (1,), (513,)], torch.float32, device)
    slots += _slots("adam", setup, [(257,), (2,)], torch.bfloat16, device, seed=1)
    _compare_steps(setup, slots, steps=(1,))
    # Two per parameter dtype, whatever the number of tensors: the programs of whole blocks, then the tails.
    assert counter.launches == 4


@pytest.mark.parametrize("bits,blocksize", [(8, 256), (4, 128), (32, 0), (8, 200)])
def test_triton_work_tables_cover_every_block_once(triton_device, bits, blocksize):
    """Whole programs (rows of TILE elements, all inside the tensor) and the others: every block of every
    tensor in exactly one program, and (blocks of a power-of-two size) at most one program per tensor outside
    the whole ones."""
    from effllm.kernels import _optim_update_triton as update

    layout = update._layout(bits, blocksize)
    numels = [1, layout.rows_len, layout.rows_len * layout.rows, layout.rows_len * layout.rows * 3 + 7, 4097]
    tensors = [(torch.empty(n, device=triton_device),) * 2 + (None,) * 4 for n in numels]
    tables = update._tables(tensors, numels, layout, torch.device(triton_device))
    assert tables.whole_work.dtype == tables.partial_work.dtype == torch.int32  # 4 bytes per program
    covered = {}
    for whole in (True, False):
        for param, first_block in tables.first_blocks(whole, layout.rows):
            for block in range(first_block, first_block + layout.rows):
                if block * layout.rows_len < numels[param]:
                    assert (param, block) not in covered
                    covered[param, block] = whole
            if whole:
                assert layout.rows_len == layout.tile
                assert (first_block + layout.rows) * layout.tile <= numels[param]
    assert set(covered) == {(i, b) for i, n in enumerate(numels) for b in range(-(-n // layout.rows_len))}
    if layout.rows_len != layout.tile:  # blocks of 200 in tiles of 256: every row keeps its masks
        assert len(tables.whole_work) == 0
    else:
        assert len(tables.whole_work) == sum(n // (layout.tile * layout.rows) for n in numels)
        assert len(tables.partial_work) <= len(numels)


def test_triton_alignment_flag_and_unaligned_views(triton_device, monkeypatch):
    """The vectorised accesses are enabled only when every data pointer is 16-byte aligned; a parameter that
    is a view at an odd offset turns them off and is updated like any other."""
    from effllm.kernels import _optim_update_triton as update

    monkeypatch.setenv("EFFLLM_KERNEL", "triton")
    layout = update._layout(8, 256)
    storage = torch.zeros(4097 + 1, device=triton_device)
    for view, aligned in ((storage[:4097], True), (storage[1:], False)):
        tables = update._tables([(view, view, None, None, None, None)], [view.numel()], layout, view.device)
        assert tables.aligned is aligned

    setup = _setup("adamw", 8, triton_device)
    slots = _slots("adamw", setup, [(4097,)], torch.float32, triton_device)
    backing = torch.empty(4097 + 1, device=triton_device)
    backing[1:] = slots[0].param
    slots[0].param = backing[1:]  # 4 bytes past an aligned address
    _compare_steps(setup, slots, steps=(1, 2))


@pytest.mark.parametrize("layout", ["256/1/64", "512/2+hints", "128/1"])
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_layout_from_the_environment(triton_device, monkeypatch, layout, bits):
    """EFFLLM_TRITON_OPTIM_LAYOUT sets elements, warps, register cap and hints of the quantized update for
    tuning on a GPU; the results stay the reference's."""
    from effllm.kernels import _optim_update_triton as update

    monkeypatch.setenv("EFFLLM_KERNEL", "triton")
    monkeypatch.setenv(update.LAYOUT_VARIABLE, layout)
    override = update.LayoutOverride.parse(layout)
    chosen = update._layout(bits, 128 if bits == 4 else 256)
    assert chosen.rows * chosen.tile == max(override.elements, chosen.tile)
    assert (chosen.num_warps, chosen.max_registers) == (override.warps, override.max_registers)
    assert chosen.alignment_hints is override.hints
    unquantized = update._layout(32, 0)  # 32-bit states keep their own layout
    monkeypatch.delenv(update.LAYOUT_VARIABLE)
    assert update._layout(32, 0) == unquantized
    monkeypatch.setenv(update.LAYOUT_VARIABLE, layout)
    setup = _setup("adamw", bits, triton_device)
    _compare_steps(setup, _slots("adamw", setup, [(1030,), (4097,)], torch.float32, triton_device), steps=(2,))


@pytest.mark.parametrize("bits,blocksize,warps", [(8, 256, 1), (4, 128, 1), (8, 64, 1), (8, 1024, 4), (8, 4096, 8)])
def test_triton_default_layout_keeps_few_elements_per_thread(monkeypatch, bits, blocksize, warps):
    """The launcher's layout for quantized states (256-element programs of one warp, timed fastest on an H100)
    gives programs of larger blocks more warps, so that no thread holds more than 8 elements (up to 8 warps)."""
    pytest.importorskip("triton")
    from effllm.kernels import _optim_update_triton as update

    monkeypatch.delenv(update.LAYOUT_VARIABLE, raising=False)
    layout = update._layout(bits, blocksize)
    assert layout.num_warps == warps
    elements_per_thread = layout.rows * layout.tile // (32 * layout.num_warps)
    assert elements_per_thread <= 8 or layout.num_warps == 8
    # The register cap holds where it was timed (8 elements per thread), not where it would make programs spill.
    assert layout.max_registers == (update.QUANTIZED_MAX_REGISTERS if elements_per_thread <= 8 else None)


@pytest.mark.parametrize("text", ["256", "256/3", "100/4", "256/4/8", "256/64", "fast", "256/4+fast"])
def test_triton_layout_variable_rejects_bad_values(monkeypatch, text):
    pytest.importorskip("triton")
    from effllm.kernels import _optim_update_triton as update

    monkeypatch.setenv(update.LAYOUT_VARIABLE, text)
    with pytest.raises(ValueError, match="EFFLLM_TRITON_OPTIM_LAYOUT=.*unset it"):
        update._layout(8, 256)


@pytest.mark.gpu
def test_cuda_update_does_not_synchronise():
    """No host-device synchronisation per step (or per parameter) once the kernel is compiled."""
    device = "cuda"
    setup = _setup("adamw", 8, device)
    slots = _slots("adamw", setup, [(4097,), (1000,), (3,)], torch.float32, device)
    _set_gradients(slots, torch.Generator().manual_seed(0))
    hyper = dataclasses.replace(setup.hyper, step=2)
    optim_update_many("adamw", slots, setup.qmap1, setup.qmap2, hyper, 8, 256)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (3, 4):
            hyper = dataclasses.replace(setup.hyper, step=step)
            optim_update_many("adamw", slots, setup.qmap1, setup.qmap2, hyper, 8, 256)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- the reference against torch.optim (32-bit states) ----------------------------------------------------

ORACLE_STEPS = 20
ORACLE_SHAPE = (33, 7)
ORACLE_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _lion_oracle(param, grad, momentum, lr, beta1, beta2, weight_decay):
    """Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms"), written out plainly."""
    direction = torch.sign(beta1 * momentum + (1 - beta1) * grad)
    param.mul_(1 - lr * weight_decay).add_(direction, alpha=-lr)
    momentum.mul_(beta2).add_(grad, alpha=1 - beta2)


ORACLES = {
    "adam": (lambda p: torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                        foreach=False), CASES["adam"][1]),
    "adamw": (lambda p: torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                          foreach=False), CASES["adamw"][1]),
    "sgd": (lambda p: torch.optim.SGD([p], lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01,
                                      foreach=False), CASES["sgd"][1]),
    "sgd_nesterov": (lambda p: torch.optim.SGD([p], lr=1e-2, momentum=0.9, nesterov=True, foreach=False),
                     CASES["sgd_nesterov"][1]),
    "sgd_plain": (lambda p: torch.optim.SGD([p], lr=1e-2, weight_decay=0.01, foreach=False),
                  CASES["sgd_plain"][1]),
    "rmsprop": (lambda p: torch.optim.RMSprop([p], lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.01,
                                              foreach=False), CASES["rmsprop"][1]),
    "adam_maximize": (lambda p: torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                                 maximize=True, foreach=False), CASES["adam_maximize"][1]),
    "sgd_maximize": (lambda p: torch.optim.SGD([p], lr=1e-2, momentum=0.9, weight_decay=0.01, maximize=True,
                                               foreach=False), CASES["sgd_maximize"][1]),
    "adamw_low_beta1": (lambda p: torch.optim.AdamW([p], lr=1e-2, betas=(0.3, 0.999), eps=1e-8, weight_decay=0.1,
                                                    foreach=False), CASES["adamw_low_beta1"][1]),
}


@pytest.mark.parametrize("case", list(ORACLES))
def test_reference_matches_torch_optim(case):
    make_optimizer, hyper = ORACLES[case]
    algo, _, keeps_buffer = CASES[case]
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(ORACLE_SHAPE, generator=generator)
    oracle_param = torch.nn.Parameter(start.clone())
    oracle = make_optimizer(oracle_param)
    param = start.clone()
    keep1, keep2 = KEEPS[algo]
    state1 = torch.zeros(ORACLE_SHAPE) if keep1 and keeps_buffer else None
    state2 = torch.zeros(ORACLE_SHAPE) if keep2 else None
    for step in range(1, ORACLE_STEPS + 1):
        grad = torch.randn(ORACLE_SHAPE, generator=generator) * (1 + step % 3)
        oracle_param.grad = grad.clone()
        oracle.step()
        optim_update_ref(algo, param, grad, state1, state2, None, None, None, None,
                         dataclasses.replace(hyper, step=step), bits=32)
    torch.testing.assert_close(param, oracle_param.detach(), **ORACLE_TOLERANCE)
    if case.startswith("adam"):
        torch.testing.assert_close(state1, oracle.state[oracle_param]["exp_avg"], **ORACLE_TOLERANCE)
        torch.testing.assert_close(state2, oracle.state[oracle_param]["exp_avg_sq"], **ORACLE_TOLERANCE)
    elif case == "rmsprop":
        torch.testing.assert_close(state2, oracle.state[oracle_param]["square_avg"], **ORACLE_TOLERANCE)
    elif keeps_buffer:
        torch.testing.assert_close(state1, oracle.state[oracle_param]["momentum_buffer"], **ORACLE_TOLERANCE)


def test_reference_matches_lion_oracle():
    hyper = CASES["lion"][1]
    generator = torch.Generator().manual_seed(4)
    param = torch.randn(ORACLE_SHAPE, generator=generator)
    oracle_param, oracle_momentum = param.clone(), torch.zeros(ORACLE_SHAPE)
    momentum = torch.zeros(ORACLE_SHAPE)
    for step in range(1, ORACLE_STEPS + 1):
        grad = torch.randn(ORACLE_SHAPE, generator=generator)
        _lion_oracle(oracle_param, grad, oracle_momentum, hyper.lr, hyper.beta1, hyper.beta2, hyper.weight_decay)
        optim_update_ref("lion", param, grad, momentum, None, None, None, None, None,
                         dataclasses.replace(hyper, step=step), bits=32)
    torch.testing.assert_close(param, oracle_param, **ORACLE_TOLERANCE)
    torch.testing.assert_close(momentum, oracle_momentum, **ORACLE_TOLERANCE)


def test_reference_skips_nonfinite_like_a_zero_free_oracle():
    """With NaN/Inf at some elements, every other element follows torch.optim.AdamW exactly as without them."""
    hyper = CASES["adamw"][1]
    generator = torch.Generator().manual_seed(5)
    start = torch.randn(64, generator=generator)
    grad = torch.randn(64, generator=generator)
    bad_grad = grad.clone()
    bad_grad[[1, 10]] = torch.tensor([float("nan"), float("inf")])
    param, m, v = start.clone(), torch.zeros(64), torch.zeros(64)
    optim_update_ref("adamw", param, bad_grad, m, v, None, None, None, None, dataclasses.replace(hyper, step=1),
                     bits=32)
    oracle_param = torch.nn.Parameter(start.clone())
    oracle = ORACLES["adamw"][0](oracle_param)
    oracle_param.grad = grad
    oracle.step()
    good = torch.ones(64, dtype=torch.bool)
    good[[1, 10]] = False
    torch.testing.assert_close(param[good], oracle_param.detach()[good], **ORACLE_TOLERANCE)
    assert torch.equal(param[~good], start[~good]) and torch.all(m[~good] == 0) and torch.all(v[~good] == 0)
