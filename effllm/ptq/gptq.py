"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Each linear's weight is quantized one input column at a time; after each column, the quantization error is
spread over the columns not yet quantized, weighted by the inverse Hessian ``H⁻¹`` of the layer-wise squared
error (``H = 2/N Σ x xᵀ``, see ``hessian.py``), so that the layer's *output* on the calibration inputs moves as
little as possible. The reference algorithm's features are all here:

- dampening: ``percdamp`` × mean(diag H) is added to the diagonal (raised further if H is still singular);
- dead inputs (a zero diagonal entry: an input that is always zero) get diag 1 and a zero weight column;
- the upper Cholesky factor of ``H⁻¹`` replaces the repeated inverse updates (same result, stable);
- blocked lazy updates: error is spread inside a block of ``blocksize`` columns at once and to the rest of
  the matrix once per block (a speed-up; the result is the same up to float rounding);
- act-order: columns are processed by decreasing diag(H), then the result is put back in the original order;
- static groups: all group scales are computed up front from the original weight; dynamic groups (the
  default without act-order) compute a group's scale when its first column is reached, from the weight as
  updated by the errors of the columns before it;
- ranges: min-max, or searched (the reference's ``mse`` option: each group's range shrunk to the factor with
  the lowest rounding error, ``effllm.quant.range_search``), optionally with each column's error weighted by
  diag(H) (``"hessian"``), so the ranges fit the inputs that carry the signal.

Groups are stored contiguous in the original column order (``FakeQuantLinear.scale`` [out, groups]); there is
no ``g_idx``. With act-order a dynamic group would be a set of scattered columns, so **act-order implies static
groups** (as in the reference's ``static_groups`` option, whose groups stay contiguous).

The result is expressed through the ``FakeQuantLinear``: its full-precision ``weight`` becomes GPTQ's
dequantized weight and its ``scale``/``zero`` GPTQ's group scales, so nearest rounding reproduces GPTQ's codes
exactly and ``freeze()`` packs them. That holds for fp32 and fp16 weights at every width, and for bf16 weights
up to 7 bits: bf16 keeps 8 significant bits, so storing ``(c - z)·s`` moves it by up to |c - z|·2⁻⁸ steps, under
½ only while |c - z| < 128. (At 8 bits with a bf16 weight a code may move by one; the ``scale`` stays fp32.)

As a runner plug-in, GPTQ works one block at a time, on the quantized model's stream: the block's linears are
taken in groups that read the same input (q/k/v, then o, then gate/up, then down). By default every group's
Hessian comes from one full-precision pass through the block; with ``sequential=True`` each group's is
collected by running the block through the groups already quantized ("true sequential" in the reference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from effllm.quant.fake_quant_linear import FakeQuantLinear, quantization_disabled
from effllm.quant.layer_hessian import inverse_hessian_cholesky
from effllm.quant.range_search import search_scales
from effllm.quant.weight_quant import WeightQuantSpec, dequantize_weight, minmax_scales

from .block_inputs import run_block
from .hessian import collect_hessians, shared_input_groups


@dataclass
class GPTQResult:
    weight: torch.Tensor  # [out, in] fp32, dequantized: (codes - zero) * scale
    codes: torch.Tensor  # [out, in] uint8
    scale: torch.Tensor  # [out, groups] fp32
    zero: torch.Tensor  # [out, groups] fp32 holding integer values
    # [out, in] fp32: each weight as it was when rounded (the original plus the errors spread onto it), so
    # round-to-nearest of rounded_from / scale gives ``codes``: a starting point for learned rounding (CBQ).
    rounded_from: torch.Tensor | None = None


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightQuantSpec, percdamp: float = 0.01,
                  blocksize: int = 128, act_order: bool = False, static_groups: bool = False,
                  scale_zero: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ranges: str = "minmax") -> GPTQResult:
    """GPTQ codes and scales of ``weight`` [out, in] for inputs whose Hessian is ``hessian`` [in, in].

    ``scale_zero``: fixed group scales and zero points [out, groups] to use (static groups) instead of
    computed ones, e.g. ranges an outlier pre-processing has already chosen. ``ranges``: how the group ranges
    are computed otherwise (one of ``RANGES``).
    """
    if ranges not in RANGES:
        raise ValueError(f"ranges must be one of {', '.join(RANGES)}, got {ranges!r}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out_features, in_features = w.shape
    groups = spec.groups(in_features)
    group_size = in_features // groups

    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    static = static_groups or act_order or spec.group_size is None or scale_zero is not None
    if scale_zero is not None:
        scale, zero = (t.detach().float().clone() for t in scale_zero)
        if scale.shape != (out_features, groups) or zero.shape != scale.shape:
            raise ValueError(f"scale_zero must be two [{out_features}, {groups}] tensors, got "
                             f"{list(scale.shape)} and {list(zero.shape)}")
    elif static:
        scale, zero = group_ranges(w, spec, ranges, h.diagonal())
    else:  # filled group by group as the columns are reached
        scale = torch.ones(out_features, groups, device=w.device)
        zero = torch.zeros(out_features, groups, device=w.device)
    column_spec = replace(spec, group_size=None)

    if act_order:
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        order = torch.arange(in_features, device=w.device)
    w, h = w[:, order], h[order][:, order]
    group_of = (order // group_size).tolist()  # group (in the original column order) of each processed column

    hinv = inverse_hessian_cholesky(h, percdamp)
    codes = torch.zeros_like(w)
    rounded_from = torch.zeros_like(w)
    for block_start in range(0, in_features, blocksize):
        block_end = min(block_start + blocksize, in_features)
        w_block = w[:, block_start:block_end].clone()
        errors = torch.zeros_like(w_block)  # scaled errors of the block's columns, for the lazy update
        hinv_block = hinv[block_start:block_end, block_start:block_end]
        for i in range(block_end - block_start):
            column = block_start + i
            group = group_of[column]
            if not static and column % group_size == 0:
                current = _current_columns(w, w_block, errors, hinv, block_start, i, group_size)
                importance = h.diagonal()[column : column + current.shape[1]]
                ranged = group_ranges(current, column_spec, ranges, importance)
                scale[:, group : group + 1], zero[:, group : group + 1] = ranged
            s, z = scale[:, group], zero[:, group]
            code = torch.clamp(torch.round(w_block[:, i] / s) + z, 0, spec.max_code)
            codes[:, column] = code
            rounded_from[:, column] = w_block[:, i]
            error = (w_block[:, i] - (code - z) * s) / hinv_block[i, i]
            w_block[:, i + 1 :] -= error[:, None] * hinv_block[i, i + 1 :][None, :]
            errors[:, i] = error
        w[:, block_end:] -= errors @ hinv[block_start:block_end, block_end:]

    original_order = torch.argsort(order)
    codes = codes[:, original_order].to(torch.uint8)
    return GPTQResult(dequantize_weight(codes, scale, zero, spec), codes, scale, zero, rounded_from[:, original_order])


RANGES = ("minmax", "mse", "hessian")


def group_ranges(w: torch.Tensor, spec: WeightQuantSpec, ranges: str, hessian_diagonal: torch.Tensor,
                 start: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Group ``(scale, zero)`` of ``w`` by the method ``ranges`` names; a searched range is never worse than
    ``start`` (default: min-max)."""
    if ranges == "minmax":
        return start if start is not None else minmax_scales(w, spec)
    return search_scales(w, spec, importance=hessian_diagonal if ranges == "hessian" else None, start=start)


def _current_columns(w: torch.Tensor, w_block: torch.Tensor, errors: torch.Tensor, hinv: torch.Tensor,
                     block_start: int, i: int, count: int) -> torch.Tensor:
    """Columns ``block_start + i`` onwards (``count`` of them) with every error so far applied.

    Inside the current block they are up to date; beyond it the block's pending lazy update is applied here,
    so a dynamic group's scale does not depend on ``blocksize``.
    """
    block_end = block_start + w_block.shape[1]
    inside = w_block[:, i : i + count]
    stop = min(block_start + i + count, w.shape[1])
    if stop <= block_end:
        return inside
    beyond = w[:, block_end:stop] - errors @ hinv[block_start:block_end, block_end:stop]
    return torch.cat([inside, beyond], dim=1)


def load_gptq_result(linear: FakeQuantLinear, result: GPTQResult) -> None:
    """Make ``linear`` compute GPTQ's quantized weight: nearest rounding of ``weight / scale`` gives its codes."""
    linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
    linear.scale.data.copy_(result.scale.to(linear.scale.dtype))
    linear.zero.copy_(result.zero)
    linear.rounding = None


@dataclass
class GPTQ:
    """GPTQ plug-in for ``effllm.ptq.runner.quantize_blocks``; the fields are its configuration.

    Defaults: act-order with static groups (as llm-compressor's default), dampening 0.01, blocks of 128
    columns, group ranges searched with diag(H)-weighted error (``ranges="hessian"``) and one Hessian pass per
    block (``sequential=False``, as llm-compressor). On SmolLM2-135M (ppl@512, docs/benchmarks.md) the searched
    ranges took W4 g64 from 19.21 to 18.26 and W3 g64 from 30.7 to 24.2; sequential Hessians gave 19.24 against
    19.21, for three more (partial) passes per block. ``ranges="minmax", sequential=True`` is the reference
    algorithm's default; ``act_order=False`` its original column order with dynamic groups.
    """

    window: int = 1  # GPTQ is local to each layer: a larger window gains nothing (its blocks go one by one,
    overlap: int = 0  # and an overlapping block would be quantized twice, the second time from GPTQ's output)
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    blocksize: int = 128  # columns per lazy-update block
    act_order: bool = True  # columns by decreasing Hessian diagonal (implies static groups); the better default
    static_groups: bool = False  # group scales from the original weight, before any error update
    sequential: bool = False  # True: each group of linears' Hessian sees the block's earlier groups quantized
    ranges: str = "hessian"  # group ranges: "minmax", "mse" (searched clipping) or "hessian" (diag(H)-weighted)
    batch_size: int = 8  # calibration sequences per forward pass

    def __post_init__(self):
        if self.percdamp < 0:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp}")
        if self.ranges not in RANGES:
            raise ValueError(f"ranges must be one of {', '.join(RANGES)}, got {self.ranges!r}")
        if self.blocksize < 1 or self.batch_size < 1:
            raise ValueError(f"blocksize and batch_size must be >= 1, got {self.blocksize}, {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @torch.no_grad()
    def calibrate(self, blocks: list[nn.Module], inputs: torch.Tensor, kwargs: dict, targets: torch.Tensor) -> None:
        """Quantize every linear of ``blocks`` with GPTQ; ``targets`` is not needed (GPTQ works layer by layer)."""
        hidden = inputs
        for position, block in enumerate(blocks):
            self.quantize_block(block, hidden, kwargs)
            if position + 1 < len(blocks):
                hidden = run_block(block, hidden, kwargs, self.batch_size)

    def quantize_block(self, block: nn.Module, inputs: torch.Tensor, kwargs: dict) -> None:
        groups = shared_input_groups(block, inputs[:1], kwargs)
        if self.sequential:
            for group in groups:
                (hessian,) = collect_hessians(block, inputs, kwargs, [group[0]], self.batch_size)
                self.quantize_group(group, hessian)
            return
        # Not sequential: every Hessian from one pass through the block at full precision.
        with quantization_disabled([block]):
            hessians = collect_hessians(block, inputs, kwargs, [group[0] for group in groups], self.batch_size)
        for group, hessian in zip(groups, hessians):
            self.quantize_group(group, hessian)

    def quantize_group(self, group: list[FakeQuantLinear], hessian: torch.Tensor) -> None:
        """Quantize linears that share ``hessian``; GPTQ treats each output row on its own, so linears with the
        same spec are quantized as one stacked matrix (one column loop instead of one per linear)."""
        if any(linear.spec != group[0].spec for linear in group):
            for linear in group:
                self.quantize_linear(linear, hessian)
            return
        stacked = torch.cat([linear.weight for linear in group])
        result = self.solve(stacked, hessian, group[0].spec)
        start = 0
        for linear in group:
            rows = slice(start, start + linear.out_features)
            start = rows.stop
            load_gptq_result(linear, GPTQResult(result.weight[rows], result.codes[rows], result.scale[rows],
                                                result.zero[rows], result.rounded_from[rows]))

    def quantize_linear(self, linear: FakeQuantLinear, hessian: torch.Tensor) -> GPTQResult:
        result = self.solve(linear.weight, hessian, linear.spec)
        load_gptq_result(linear, result)
        return result

    def solve(self, weight: torch.Tensor, hessian: torch.Tensor, spec: WeightQuantSpec) -> GPTQResult:
        return gptq_quantize(weight, hessian, spec, self.percdamp, self.blocksize, self.act_order,
                             self.static_groups, ranges=self.ranges)
