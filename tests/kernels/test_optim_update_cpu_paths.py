"""The C optimizer kernel's separate code paths, each against ``optim_update_ref``.

``csrc/optim_update.c`` runs Adam/AdamW with 8- or 4-bit states through a hand-vectorised loop (8 lanes, the
4-bit maps looked up in registers) when a block has no NaN/Inf gradient, and every other case through the
generic loop; a block's last ``n % 8`` elements take the generic loop too. These tests cover each (algorithm,
weight decay, bits, dtype) branch of that split, with block sizes that leave a tail, over several steps, and
check that a block routed to the generic loop by one bad gradient gives its other elements the same bits as
the fast loop gives them. The fast loop is software-pipelined over groups of 8 lanes, with its own code for
blocks of one, two and more groups: ``PIPELINE_LAYOUTS`` has each, with and without a tail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from effllm.kernels import cpu_kernels_available
from effllm.kernels.blockwise import quantize_blockwise_ref
from effllm.kernels.optim_update import Hyper, ParamSlot, optim_update_many, optim_update_ref
from effllm.kernels.packing import pack_bits_ref, unpack_bits_ref
from effllm.kernels.quant_maps import make_map

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="no C compiler for the CPU kernels")

MAP_KINDS = {8: ("dynamic", "dynamic"), 4: ("dynamic", "linear_nozero")}
# Block sizes with a tail after the last whole 8 lanes (100, 36), a whole number of lanes (256, 128), and
# parameters that end mid-block.
LAYOUTS = {8: [(256, 1000), (100, 1003)], 4: [(128, 1000), (36, 1001)]}
# (block size, numel): blocks of 1, 2 and 3 groups of 8 lanes, some with a tail, and a last block shorter
# than the others (fewer groups).
PIPELINE_LAYOUTS = [(8, 83), (12, 90), (16, 100), (19, 101), (24, 100), (33, 130)]
PARAM_TOLERANCE_FP32 = dict(rtol=1e-6, atol=1e-7)  # torch's CPU sqrt is not always correctly rounded
MAX_CODE_MISMATCH_FRACTION = 1e-3
STEPS = (1, 2, 3)


def _maps(bits):
    kind1, kind2 = MAP_KINDS[bits]
    return make_map(kind1, True, bits), make_map(kind2, False, bits)


def _slot(numel, bits, blocksize, dtype, seed=0) -> ParamSlot:
    generator = torch.Generator().manual_seed(seed)
    qmap1, qmap2 = _maps(bits)
    states = []
    for values, qmap in ((torch.randn(numel, generator=generator) * 0.1, qmap1),
                         (torch.rand(numel, generator=generator) * 1e-3, qmap2)):
        codes, absmax = quantize_blockwise_ref(values, qmap, blocksize)
        states.append((codes if bits == 8 else pack_bits_ref(codes, bits), absmax))
    param = torch.randn(numel, generator=generator).to(dtype)
    return ParamSlot(param, torch.empty_like(param), states[0][0], states[1][0], states[0][1], states[1][1])


def _clone(slot: ParamSlot) -> ParamSlot:
    return ParamSlot(*(getattr(slot, f.name).clone() for f in dataclasses.fields(slot)))


def _codes(state, bits, numel):
    return state if bits == 8 else unpack_bits_ref(state, bits, numel)


def _assert_close(got: ParamSlot, want: ParamSlot, bits: int) -> None:
    tolerance = PARAM_TOLERANCE_FP32 if want.param.dtype == torch.float32 else {}
    torch.testing.assert_close(got.param, want.param, **tolerance)
    numel = want.param.numel()
    for name in ("state1", "state2"):
        codes, ref_codes = _codes(getattr(got, name), bits, numel), _codes(getattr(want, name), bits, numel)
        differ = codes != ref_codes
        assert int(differ.sum()) <= MAX_CODE_MISMATCH_FRACTION * numel, f"{name}: {int(differ.sum())} codes differ"
        assert torch.all((codes.int() - ref_codes.int()).abs()[differ] == 1)
    for name in ("absmax1", "absmax2"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("algo", ["adam", "adamw"])
def test_adam_paths_match_the_reference(monkeypatch, algo, weight_decay, bits, dtype):
    monkeypatch.setenv("EFFLLM_KERNEL", "cpu")
    qmap1, qmap2 = _maps(bits)
    generator = torch.Generator().manual_seed(1)
    for blocksize, numel in LAYOUTS[bits]:
        slot = _slot(numel, bits, blocksize, dtype)
        for step in STEPS:
            hyper = Hyper(lr=1e-2, weight_decay=weight_decay, step=step)
            slot.grad = torch.randn(numel, generator=generator).to(dtype)
            expected = _clone(slot)
            optim_update_ref(algo, expected.param, expected.grad, expected.state1, expected.state2,
                             expected.absmax1, expected.absmax2, qmap1, qmap2, hyper, bits, blocksize)
            optim_update_many(algo, [slot], qmap1, qmap2, hyper, bits, blocksize)
            _assert_close(slot, expected, bits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("algo", ["adam", "adamw"])
def test_bad_gradient_moves_its_block_to_the_generic_loop_without_changing_other_elements(monkeypatch, algo, bits):
    """Block 1 gets a NaN gradient (generic loop, the element skipped); a copy gets 0 there instead (fast
    loop). Every other element of the block must come out bit for bit the same both ways."""
    monkeypatch.setenv("EFFLLM_KERNEL", "cpu")
    qmap1, qmap2 = _maps(bits)
    blocksize, numel = LAYOUTS[bits][0]
    bad = blocksize + 5
    hyper = Hyper(lr=1e-2, weight_decay=0.05, step=4)
    slot = _slot(numel, bits, blocksize, torch.float32)
    slot.grad = torch.randn(numel, generator=torch.Generator().manual_seed(2))
    clean = _clone(slot)
    clean.grad[bad] = 0.0
    slot.grad[bad] = float("nan")
    before = _clone(slot)
    optim_update_many(algo, [slot], qmap1, qmap2, hyper, bits, blocksize)
    optim_update_many(algo, [clean], qmap1, qmap2, hyper, bits, blocksize)
    good = torch.ones(numel, dtype=torch.bool)
    good[bad] = False
    assert slot.param[bad] == before.param[bad]
    assert torch.equal(slot.param[good], clean.param[good])
    for name in ("state1", "state2"):
        codes, clean_codes = _codes(getattr(slot, name), bits, numel), _codes(getattr(clean, name), bits, numel)
        # The skipped element keeps its old value, so its block's absmax (and every code there) may differ.
        outside = torch.ones(numel, dtype=torch.bool)
        outside[blocksize:2 * blocksize] = False
        assert torch.equal(codes[outside], clean_codes[outside])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("algo", ["adam", "adamw"])
@pytest.mark.parametrize("blocksize,numel", PIPELINE_LAYOUTS)
def test_pipelined_fast_loop_matches_the_reference_and_the_generic_loop(monkeypatch, algo, bits, blocksize, numel):
    """Every group count of the pipelined loop: close to the reference over several steps, and bit for bit
    what the generic loop gives the same elements (a NaN gradient in the last block sends that block there)."""
    monkeypatch.setenv("EFFLLM_KERNEL", "cpu")
    qmap1, qmap2 = _maps(bits)
    generator = torch.Generator().manual_seed(3)
    slot = _slot(numel, bits, blocksize, torch.float32)
    for step in STEPS:
        hyper = Hyper(lr=1e-2, weight_decay=0.05, step=step)
        slot.grad = torch.randn(numel, generator=generator)
        expected = _clone(slot)
        optim_update_ref(algo, expected.param, expected.grad, expected.state1, expected.state2,
                         expected.absmax1, expected.absmax2, qmap1, qmap2, hyper, bits, blocksize)
        optim_update_many(algo, [slot], qmap1, qmap2, hyper, bits, blocksize)
        _assert_close(slot, expected, bits)
    # One element of every block but the first gets a NaN gradient (generic loop); the copy gets 0 there.
    hyper = Hyper(lr=1e-2, weight_decay=0.05, step=4)
    slot.grad = torch.randn(numel, generator=generator)
    clean = _clone(slot)
    bad = torch.arange(blocksize, numel, blocksize)
    clean.grad[bad] = 0.0
    slot.grad[bad] = float("nan")
    optim_update_many(algo, [slot], qmap1, qmap2, hyper, bits, blocksize)
    optim_update_many(algo, [clean], qmap1, qmap2, hyper, bits, blocksize)
    good = torch.ones(numel, dtype=torch.bool)
    good[bad] = False
    assert torch.equal(slot.param[good], clean.param[good])
    first = torch.zeros(numel, dtype=torch.bool)
    first[:blocksize] = True  # the one block that took the fast loop both times
    for name in ("state1", "state2"):
        codes, clean_codes = _codes(getattr(slot, name), bits, numel), _codes(getattr(clean, name), bits, numel)
        assert torch.equal(codes[first], clean_codes[first])
