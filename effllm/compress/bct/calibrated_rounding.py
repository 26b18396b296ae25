"""Calibrated (GPTQ-style error-feedback) rounding of the packed weight codes of a compressed model.

Rounding each weight to its nearest map entry minimises the error of the *weight*; what matters is the error
of the layer's *output* on real inputs, ``Σ ||x Wᵀ - x Ŵᵀ||²``, whose Hessian per output row is ``H = 2/N Σ x xᵀ``.
GPTQ (Frantar et al.) quantizes one input column at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by ``H⁻¹``. Here the grid is BCT's own: the per-block scales and the (fitted)
map are fixed first by ``PackedTensor`` (clip search, Lloyd fit, double-quantized scales), and the quantizer of
an element is "nearest map entry times its block's decoded scale". Only the codes change, so the saved layout,
the bytes and the loader are those of nearest rounding.

With ``token_weighting: relative`` each calibration token's input row is weighted by ``1 / ||y_t||²`` (``y_t`` its
float output): the objective becomes the sum of per-token *relative* output errors. Measured on MiniLM, plain
GPTQ lowers the total output error of the FFN down-projections of the first layers 3x but *raises* the error of
the typical token (their total is dominated by a few tokens with massive activations), and the sentence
embeddings get worse than with nearest rounding; weighted, every layer's per-token error goes down. Padding
tokens (``attention_mask == 0`` in a batch) are left out of the statistics.

The Hessians are of what each linear really multiplies (its input after the activation quantizer), collected on
the compressed model itself: with ``sequential`` each group of linears reading the same tensor (q/k/v) sees the
already-calibrated layers before it, as GPTQ's "true sequential" does (one partial forward pass per group).
The pieces shared with GPTQ in ``effllm.ptq`` (the Hessian accumulator and the damped inverse-Hessian Cholesky
factor) live in the core, ``effllm.quant.layer_hessian``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from effllm.kernels.blockwise import absmax_to_scale, nearest_code_ref
from effllm.quant.layer_hessian import HessianAccumulator, group_by_shared_input, inverse_hessian_cholesky

from .layers import BCTLinear
from .packed_tensor import PackedTensor

LAZY_BLOCK = 128  # columns per lazy error update (a speed-up only: the result is the same up to fp rounding)


class _StopForward(Exception):
    """Raised once every linear of interest has seen its input: the rest of the model need not run."""


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor,
               percdamp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """Codes [out, in] (uint8, indices into ``qmap``) of ``weight`` [out, in] with fixed per-element ``scales``
    [out, in], chosen column by column with error feedback through ``hessian`` [in, in]."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    scales = scales.float()
    qmap = qmap.float()
    in_features = w.shape[1]
    dead = h.diagonal() == 0  # an input that is always zero: its column cannot matter, keep it nearest
    h[dead, dead] = 1
    order = (torch.argsort(h.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(in_features, device=w.device))
    w, h, scales = w[:, order], h[order][:, order], scales[:, order]
    divisor = absmax_to_scale(scales)
    hinv = inverse_hessian_cholesky(h, percdamp)
    codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
    for start in range(0, in_features, LAZY_BLOCK):
        stop = min(start + LAZY_BLOCK, in_features)
        w_block = w[:, start:stop].clone()
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            code = nearest_code_ref(w_block[:, i] / divisor[:, column], qmap)
            codes[:, column] = code
            error = (w_block[:, i] - qmap[code.long()] * scales[:, column]) / hinv_block[i, i]
            w_block[:, i + 1:] -= error[:, None] * hinv_block[i, i + 1:][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return codes[:, torch.argsort(order)]


def calibrated_linears(model: nn.Module) -> dict[str, BCTLinear]:
    """The model's BCT linears (by module name) whose packed weight asks for calibrated rounding."""
    # a tied head (BCTTiedLinear) reads its embedding's table: embeddings are never gptq-rounded
    return {name: module for name, module in model.named_modules() if isinstance(module, BCTLinear)
            and isinstance(getattr(module, "weight_packed", None), PackedTensor)
            and module.weight_packed.spec.rounding == "gptq"}


def _run(model: nn.Module, batch) -> None:
    try:
        model(**batch) if isinstance(batch, Mapping) else model(batch)
    except _StopForward:
        pass


@torch.no_grad()
def shared_input_groups(model: nn.Module, linears: list[BCTLinear], sample) -> list[list[BCTLinear]]:
    """``linears`` grouped by the tensor they read (q/k/v share one), groups in execution order; linears that
    never run on ``sample`` are left out."""
    return group_by_shared_input(linears, lambda: _run(model, sample))


@torch.no_grad()
def collect_hessians(model: nn.Module, readers: list[BCTLinear], batches: list,
                     float_weights: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Hessian of what each of ``readers`` multiplies (its quantized input) over the real tokens of ``batches``;
    where ``float_weights[i]`` is given, each token is weighted by ``1 / ||x W^T||^2``. Each forward pass stops
    once every reader has seen its input."""
    accumulators = [HessianAccumulator(reader.in_features) for reader in readers]
    weights = float_weights or [None] * len(readers)
    fired: set[int] = set()
    token_mask: list[torch.Tensor | None] = [None]

    def make_hook(index: int):
        def hook(module, args):
            x = module.input_quant(args[0]).float()
            mask = token_mask[0]
            rows = x[mask] if mask is not None and x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])
            if weights[index] is not None:
                norms = (rows @ weights[index].T.to(rows)).norm(dim=1, keepdim=True)
                rows = rows / norms.clamp(min=torch.finfo(rows.dtype).tiny)
            accumulators[index].add(rows)
            fired.add(index)
            if len(fired) == len(readers):
                raise _StopForward

        return hook

    handles = [reader.register_forward_pre_hook(make_hook(i)) for i, reader in enumerate(readers)]
    try:
        for batch in batches:
            fired.clear()
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            token_mask[0] = mask.bool() if mask is not None else None
            _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return [accumulator.hessian() for accumulator in accumulators]


@torch.no_grad()
def recode_linear(linear: BCTLinear, weight: torch.Tensor, hessian: torch.Tensor) -> None:
    """Replace the codes of ``linear``'s packed weight (of the float ``weight``) by calibrated ones; scales and
    map unchanged."""
    packed = linear.weight_packed
    codes = gptq_codes(weight, hessian.to(weight.device), packed.element_scales(), packed.qmap, packed.spec.damp)
    packed.set_codes_(codes)


@torch.no_grad()
def calibrate_rounding(model: nn.Module, float_weights: Mapping[str, torch.Tensor], calib: Iterable,
                       sequential: bool = True) -> int:
    """Recode every linear of ``model`` whose spec has ``rounding: gptq``.

    ``float_weights`` maps each such linear's module name to its original float weight (the compressed model
    keeps none; ``compress`` collects them before swapping the layers); ``calib`` holds model inputs (dicts of
    keyword arguments such as tokenizer outputs, or tensors of input ids). Returns the number of linears recoded.
    """
    batches = list(calib)
    if not batches:
        raise ValueError("calibrated rounding needs at least one calibration batch; got none")
    linears = calibrated_linears(model)
    missing = sorted(set(linears) - set(float_weights))
    if missing:
        raise ValueError(f"calibrated rounding needs the float weights of {missing[:3]}...: pass the weights taken "
                         "before compress() (compress(model, config, calib=...) does this)")
    if not linears:
        return 0
    name_of = {id(linear): name for name, linear in linears.items()}
    groups = shared_input_groups(model, list(linears.values()), batches[0])

    def recode(group, hessian):
        for linear in group:
            recode_linear(linear, float_weights[name_of[id(linear)]], hessian)

    def weighting(group):  # linears reading one tensor share a Hessian: weigh tokens by their joint output
        if group[0].weight_packed.spec.token_weighting != "relative":
            return None
        return torch.cat([float_weights[name_of[id(linear)]] for linear in group])

    if sequential:
        for group in groups:
            (hessian,) = collect_hessians(model, [group[0]], batches, [weighting(group)])
            recode(group, hessian)
    else:  # every Hessian from one pass through the nearest-rounded model
        hessians = collect_hessians(model, [group[0] for group in groups], batches,
                                    [weighting(group) for group in groups])
        for group, hessian in zip(groups, hessians):
            recode(group, hessian)
    return sum(len(group) for group in groups)
