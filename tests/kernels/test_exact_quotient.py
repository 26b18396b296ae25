"""Division by a shared divisor in the GPU update kernel: a reciprocal and one exact correction
(``_optim_update_triton._exact_quotient``, ``_normalized``) must round exactly as IEEE division, or codes would
drift from the reference's ``new / absmax``.

Two checks: the formula itself, with the CPU's fused multiply-add, over every significand of x for several
divisors (``exact_quotient_exhaustive.c``; a few divisors by default, 360 with ``-m slow``); and the Triton
functions under the interpreter (whose ``fma`` rounds once) against torch's division.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from effllm.kernels import cpu_build, triton_available

CHECKER = Path(__file__).with_name("exact_quotient_exhaustive.c")

if triton_available():
    import triton
    import triton.language as tl
    from effllm.kernels._optim_update_triton import _exact_quotient, _normalized

    @triton.jit
    def _normalized_kernel(x_ptr, scale_ptr, out_ptr, TILE: tl.constexpr):
        row = tl.program_id(0)
        offs = row * TILE + tl.arange(0, TILE)[None, :]  # [1, TILE]
        scale = tl.load(scale_ptr + row + tl.arange(0, 1))  # [1]
        tl.store(out_ptr + offs, _normalized(tl.load(x_ptr + offs), scale))

    @triton.jit
    def _quotient_kernel(x_ptr, out_ptr, divisor, TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        x = tl.load(x_ptr + offs)
        tl.store(out_ptr + offs, _exact_quotient(x, divisor, tl.math.div_rn(1.0, divisor)))


def _run_checker(tmp_path: Path, wide: int, tiny: int) -> str:
    try:
        compiler = cpu_build.find_compiler()
    except cpu_build.BuildError as error:
        pytest.skip(str(error))
    binary = tmp_path / "exact_quotient"
    subprocess.run([compiler, "-O2", "-march=native", "-ffp-contract=off", str(CHECKER), "-lm", "-o", str(binary)],
                   check=True)
    result = subprocess.run([str(binary), str(wide), str(tiny)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout
    return result.stdout


def test_formula_rounds_as_division_for_every_significand(tmp_path):
    out = _run_checker(tmp_path, wide=2, tiny=2)  # the all-ones and next divisor significands, ~1e9 pairs
    assert ": 0 differ" in out


@pytest.mark.slow
def test_formula_rounds_as_division_exhaustively(tmp_path):
    out = _run_checker(tmp_path, wide=300, tiny=60)  # 9.6e10 pairs, a few minutes
    assert ": 0 differ" in out


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_host_reciprocal_rounds_as_fp32_division():
    """The launcher passes Adam's 1 / sqrt(1 - beta2**step) computed on the host; it must equal the fp32
    division the kernel would otherwise make."""
    from effllm.kernels._optim_update_triton import fp32_reciprocal

    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.rand(20_000, generator=generator) * 2.0 ** torch.randint(-40, 20, (20_000,),
                                                                                      generator=generator),
                        (((127 << 23) | torch.tensor([0x7FFFFF, 0x7FFFFE, 0, 1, 0x400000])).int()).view(torch.float32)])
    values = values[values > 0]
    got = torch.tensor([fp32_reciprocal(float(v)) for v in values], dtype=torch.float32)
    assert torch.equal(got, 1.0 / values)


def _all_significands(exponent: int) -> torch.Tensor:
    bits = (exponent << 23) | torch.arange(1 << 23, dtype=torch.int32)
    return bits.view(torch.float32)


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.filterwarnings("ignore:overflow encountered")  # 3e38 / 0.03 overflows, as it should
def test_triton_quotient_equals_division(triton_device):
    tile = 1 << 16
    # What the kernel divides by Adam's bias correction: sqrt(v), 0 or in [2**-75, 2**64]; and infinities.
    special = torch.tensor([0.0, 2.0**-75, 2.0**64, float("inf"), 3e38])
    x = torch.cat([_all_significands(120)[::7], -_all_significands(101)[::7], special])
    x = torch.nn.functional.pad(x, (0, -x.numel() % tile))
    for divisor in (0.0316227766, 1.0, 0.99999994, 2.0**-13):  # Adam's sqrt(1 - beta2**step) and others
        out = torch.empty_like(x, device=triton_device)
        _quotient_kernel[(x.numel() // tile,)](x.to(triton_device), out, divisor, tile)
        assert torch.equal(out.cpu(), x / torch.tensor(divisor, dtype=torch.float32))


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_triton_normalized_equals_division_down_to_denormal_scales(triton_device):
    """Rows as the update kernel normalises them: each divided by its own absmax, from 1 down to denormals."""
    tile = 4096
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 0.75, 3e-9, 2.0**-60, 2.0**-61, 1e-30, 1e-38, 1e-40, 1e-44, 2.0**-149])
    rows = torch.rand(scales.numel(), tile, generator=generator) ** 8 * torch.sign(torch.randn(scales.numel(), tile,
                                                                                                  generator=generator))
    x = (rows * scales[:, None]).float()
    x[:, 0] = scales  # each row reaches its scale, as at its absmax
    out = torch.empty_like(x, device=triton_device)
    _normalized_kernel[(scales.numel(),)](x.to(triton_device), scales.to(triton_device), out, tile)
    want = x / scales[:, None]
    relevant = want.abs() >= 2.0**-24  # smaller quotients all take the zero code
    assert torch.equal(out.cpu()[relevant], want[relevant])


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0, as it should
def test_triton_normalized_rows_of_an_overflowed_state(triton_device):
    """A state that overflowed has an infinite absmax: its finite values normalise to zero and its infinite ones
    to NaN, as in the division (the kernel corrects against a zero divisor there instead of checking each
    element)."""
    tile = 64
    scales = torch.tensor([float("inf"), 3.4e38])
    x = (torch.linspace(-1, 1, tile) * 3e38).repeat(2, 1)
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), -0.0])
    x[1, 0] = 3.4e38
    out = torch.empty_like(x, device=triton_device)
    _normalized_kernel[(scales.numel(),)](x.to(triton_device), scales.to(triton_device), out, tile)
    want = x / scales[:, None]
    assert want[0, 3:].eq(0).all() and want[0, :2].isnan().all()
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0, equal_nan=True)
