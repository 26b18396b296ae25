"""The C kernels for CPU tensors, beyond the shared backend tests: the nearest-code table is exact for every
map (checked in pure torch, so also where no compiler is present), exact midpoints and their neighbours
quantize as the reference on every backend, a map with several boundaries in one table cell takes the
midpoint walk, and optimizer results depend neither on the thread count nor on how parameters are laid out."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from effllm.kernels._cpu_code_maps import CELL_BITS, LOW_MASK, build_cell_table
from effllm.kernels.blockwise import quantize_blockwise, quantize_blockwise_ref
from effllm.kernels.optim_update import Hyper, ParamSlot, optim_update_many, optim_update_ref
from effllm.kernels.packing import packed_numel
from effllm.kernels.quant_maps import dynamic_map, linear_map, make_map, map_midpoints

# Every map the core can make: dynamic 2..8 bits, linear 1..8 bits, signed and unsigned, zero-free linear.
ALL_MAPS = (
    [(f"dynamic-{'s' if signed else 'u'}{bits}", dynamic_map(signed, bits))
     for bits in range(2, 9) for signed in (True, False)]
    + [(f"linear-{'s' if signed else 'u'}{bits}", linear_map(signed, bits))
       for bits in range(1, 9) for signed in (True, False)]
    + [(f"linear_nozero-{bits}", linear_map(False, bits, include_zero=False)) for bits in range(1, 9)]
)
SHIPPED_MAPS = [("dynamic", True, 8), ("dynamic", False, 8), ("dynamic", True, 4), ("linear_nozero", False, 4)]


def _table_lookup(table, x: torch.Tensor) -> torch.Tensor:
    """What csrc/codes.h computes from the table: the cell's code, plus one past its boundary."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    entry = table.cells.to(torch.int64)[bits >> CELL_BITS] & 0xFFFFFFFF
    low, boundary = bits & LOW_MASK, entry >> CELL_BITS
    above = torch.where(bits >= 2**31, low < boundary, low > boundary)
    return (entry & 0xFF) + above.long()


def _probes(qmap: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Values around every midpoint and entry, zeros, tiny and subnormal values, and random ones of all scales."""
    generator = torch.Generator().manual_seed(seed)
    mid = map_midpoints(qmap)

    def neighbours(values):
        return [values.nextafter(torch.full_like(values, float("inf"))),
                values.nextafter(torch.full_like(values, -float("inf")))]

    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.2e-38, -1.2e-38, 2.0, -2.0])
    magnitudes = 10 ** (torch.rand(20000, generator=generator) * -30)
    signs = torch.where(torch.rand(20000, generator=generator) < 0.5, -1.0, 1.0)
    uniform = torch.rand(20000, generator=generator) * 2 - 1
    return torch.cat([mid, *neighbours(mid), qmap, *neighbours(qmap), special, magnitudes * signs, uniform])


@pytest.mark.parametrize("name,qmap", ALL_MAPS, ids=[name for name, _ in ALL_MAPS])
def test_cell_table_gives_the_bucketize_code(name, qmap):
    table = build_cell_table(qmap)
    assert table.one_boundary_per_cell, f"{name} has a table cell with two decision boundaries"
    probes = _probes(qmap)
    expected = torch.bucketize(probes, map_midpoints(qmap))
    assert torch.equal(_table_lookup(table, probes), expected)


def test_dense_map_is_detected_and_still_quantized_exactly(backend):
    """256 entries within 1e-3 of each other: many boundaries share a cell, so the kernel walks midpoints."""
    _, device = backend
    qmap = torch.linspace(0.5, 0.501, 256)
    assert not build_cell_table(qmap).one_boundary_per_cell
    x = torch.cat([torch.tensor([1.0]), 0.5 + torch.rand(4000, generator=torch.Generator().manual_seed(0)) * 2e-3,
                   map_midpoints(qmap)])
    codes, absmax = quantize_blockwise(x.to(device), qmap.to(device), blocksize=x.numel())
    ref_codes, ref_absmax = quantize_blockwise_ref(x, qmap, blocksize=x.numel())
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)


@pytest.mark.parametrize("kind,signed,bits", SHIPPED_MAPS)
def test_exact_midpoints_quantize_as_the_reference(backend, kind, signed, bits):
    """One block whose absmax is 1, so the normalised values are the probes themselves, ties included."""
    _, device = backend
    qmap = make_map(kind, signed, bits)
    probes = _probes(qmap).clamp(-1.0, 1.0)
    probes = probes if signed else probes.abs()
    x = torch.cat([torch.tensor([1.0]), probes])
    codes, _ = quantize_blockwise(x.to(device), qmap.to(device), blocksize=x.numel())
    assert torch.equal(codes.cpu(), quantize_blockwise_ref(x, qmap, blocksize=x.numel())[0])


def _bucket(bits: int, blocksize: int, device: str = "cpu", seed: int = 0) -> list[ParamSlot]:
    """Parameters of several sizes and dtypes (more than one thread's share in total) with 8- or 4-bit states."""
    generator = torch.Generator().manual_seed(seed)
    slots = []
    for numel, dtype in ((40001, torch.float32), (1, torch.float32), (30011, torch.bfloat16), (4097, torch.float16)):
        param = torch.randn(numel, generator=generator).to(dtype)
        grad = torch.randn(numel, generator=generator).to(dtype)
        grad[::1009] = float("nan")
        blocks = -(-numel // blocksize)
        codes = torch.randint(0, 2**bits, (packed_numel(numel, bits) * (8 // bits),), generator=generator)
        if bits == 4:
            codes = codes[0::2] | (codes[1::2] << 4)
        states = [codes.to(torch.uint8), codes.flip(0).to(torch.uint8)]
        absmax = [torch.rand(blocks, generator=generator) * 0.1, torch.rand(blocks, generator=generator) * 1e-3]
        tensors = (param, grad, states[0], states[1], absmax[0], absmax[1])
        slots.append(ParamSlot(*(tensor.to(device) for tensor in tensors)))
    return slots


def _clone(slots):
    return [ParamSlot(*(getattr(s, f.name).clone() for f in dataclasses.fields(s))) for s in slots]


@pytest.mark.parametrize("bits,blocksize", [(8, 256), (4, 128), (4, 5)])
def test_update_does_not_depend_on_the_thread_count(backend, bits, blocksize):
    _, device = backend
    maps = [make_map("dynamic", True, bits), make_map("dynamic" if bits == 8 else "linear_nozero", False, bits)]
    hyper = Hyper(lr=1e-2, weight_decay=0.1, step=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            slots = _bucket(bits, blocksize, device)
            optim_update_many("adamw", slots, *maps, hyper, bits, blocksize)
            results.append(slots)
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        for name in ("param", "state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(getattr(one, name), getattr(two, name)), name


def test_non_contiguous_parameter_is_updated_in_place(backend):
    _, device = backend
    qmap1, qmap2 = make_map("dynamic", True, 8, device), make_map("dynamic", False, 8, device)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(300, 70, generator=generator).to(device)
    grad = torch.randn(70, 300, generator=generator).to(device)
    states = [torch.full((21000,), 128, dtype=torch.uint8, device=device),
              torch.zeros(21000, dtype=torch.uint8, device=device)]
    absmax = [torch.zeros(83, device=device), torch.zeros(83, device=device)]
    hyper = Hyper(lr=1e-2, weight_decay=0.1, step=1)
    expected = base.t().contiguous()
    ref_states, ref_absmax = [s.clone() for s in states], [a.clone() for a in absmax]
    optim_update_ref("adamw", expected, grad, *ref_states, *ref_absmax, qmap1, qmap2, hyper, 8, 256)
    view = base.t()  # [70, 300], not contiguous
    optim_update_many("adamw", [ParamSlot(view, grad, *states, *absmax)], qmap1, qmap2, hyper, 8, 256)
    torch.testing.assert_close(view, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(base.t(), view)  # the update reached the parameter's own storage
    assert all(torch.equal(a, b) for a, b in zip(states + absmax, ref_states + ref_absmax))
