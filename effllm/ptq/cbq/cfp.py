"""Coarse-to-fine pre-processing (CFP): find outliers, then truncate weight outliers and scale activation ones.

Outlier threshold of a set of magnitudes (``outlier_threshold``):
- coarse stage: candidates are the values beyond ``Q3 + lambda * IQR`` (the quartile criterion);
- fine stage: among the splits that keep every non-candidate, pick the one minimising the intra-set variance
  ``n_kept * Var(kept) + n_outliers * Var(outliers)``, which is the same as maximising the inter-set distance
  ``n_kept * n_outliers / n * (mean(outliers) - mean(kept)) ** 2`` (their sum, n times the variance of all the
  values, is fixed): a 1-D search over the sorted candidates with prefix sums. (Unweighted, the distance term
  would always split off the single largest value.)
The threshold is the largest kept value.

Weights (``truncate_weight_outliers``): per output channel, on ``|W|``. Truncation is done through the quantizer's
range: the step sizes and zero points are recomputed from the weight clipped at the threshold, and the
quantizer's clamp clips the outliers; the full-precision weight itself is left alone, so the runner's
full-precision stream (quantization disabled) is unchanged. A guard (on by default) keeps the min-max range of
the groups whose round-to-nearest error truncation would raise.

Activations (``smooth_activation_outliers``): per input channel of the linears that follow a norm, on the
channel's largest magnitude over the calibration tokens. An outlier channel of magnitude ``m`` is divided by
``s = (m / threshold) ** alpha`` and the factor is folded into the norm before it (``weight / s``) and the
linears after it (``weight[:, channel] * s``): an exact equivalence in full precision (SmoothQuant's transform).
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.quant.fake_quant_linear import FakeQuantLinear, quantization_disabled
from effllm.quant.weight_quant import dequantize_weight, minmax_scales, quantize_weight

from ..block_inputs import run_block

Q1, Q3 = 0.25, 0.75

# (norm, linears reading the norm's output), by attribute path inside a decoder block. The first pair whose
# modules all exist is used for each norm.
SMOOTH_PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # Llama, Mistral, Qwen
    ("input_layernorm", ("self_attn.qkv_proj",)),  # Phi-3
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # OPT
    ("final_layer_norm", ("fc1",)),
    ("ln_1", ("attn.c_attn",)),  # GPT-2
    ("ln_2", ("mlp.c_fc",)),
)


def _row_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile of every row [rows, n] -> [rows] (``torch.quantile`` refuses large inputs)."""
    n = values.shape[-1]
    position = q * (n - 1)
    low = int(position)
    fraction = position - low
    below = values.kthvalue(low + 1, dim=-1).values
    if fraction == 0:
        return below
    return below + fraction * (values.kthvalue(min(low + 2, n), dim=-1).values - below)


def outlier_threshold(magnitudes: torch.Tensor, iqr_lambda: float) -> torch.Tensor:
    """Per row of ``magnitudes`` [rows, n] (non-negative): values above the returned threshold [rows] are outliers.

    Rows without coarse candidates get their maximum (nothing is an outlier). Only the candidates are sorted:
    the kept set's sums come from the row totals minus the candidates'.
    """
    values = magnitudes.double()
    n = values.shape[-1]
    q1, q3 = _row_quantile(values, Q1), _row_quantile(values, Q3)
    coarse = q3 + iqr_lambda * (q3 - q1)  # [rows]
    candidates = (values > coarse[:, None]).sum(dim=-1)  # [rows]
    largest = int(candidates.max()) if n > 1 else 0
    if largest == 0:
        return values.amax(dim=-1).to(magnitudes.dtype)
    largest = min(largest, n - 1)  # at least one value is always kept
    top = values.topk(largest + 1, dim=-1).values  # [rows, largest + 1] descending

    # Split j calls the j largest values outliers (j = 1 .. largest) and keeps the other n - j.
    outliers = torch.arange(1, largest + 1, device=values.device, dtype=values.dtype)  # [largest]
    kept = n - outliers
    out_sum, out_square = top[:, :-1].cumsum(-1), top[:, :-1].pow(2).cumsum(-1)  # [rows, largest]
    kept_sum = values.sum(-1, keepdim=True) - out_sum
    kept_square = values.pow(2).sum(-1, keepdim=True) - out_square
    # Size-weighted intra-set variance (n * Var = sum of squares - sum**2 / n). The total variance is fixed, so
    # this also maximises the size-weighted squared distance between the sets' means.
    objective = (kept_square - kept_sum.pow(2) / kept) + (out_square - out_sum.pow(2) / outliers)
    objective = objective.masked_fill(outliers[None, :] > candidates[:, None], float("inf"))
    best = objective.argmin(dim=-1)  # [rows]: best + 1 outliers
    threshold = top.gather(-1, (best + 1)[:, None])[:, 0]  # the largest kept value
    threshold = torch.where(candidates == 0, top[:, 0], threshold)
    return threshold.to(magnitudes.dtype)


def _group_error(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec) -> torch.Tensor:
    """Squared round-to-nearest error of every group [out, groups]."""
    codes = quantize_weight(weight, scale, zero, spec)
    error = dequantize_weight(codes, scale, zero, spec) - weight
    return error.pow(2).reshape(*scale.shape, -1).sum(dim=-1)


@torch.no_grad()
def truncate_weight_outliers(fake: FakeQuantLinear, iqr_lambda: float,
                             protected_columns: torch.Tensor | None = None, guard: bool = True) -> float:
    """Re-derive ``fake``'s step sizes and zero points from its weight clipped at the per-row outlier threshold.

    ``protected_columns`` (bool [in]) are never clipped (columns that absorbed an activation scale). With
    ``guard``, a group keeps its current (min-max) step size where truncation would raise its round-to-nearest
    weight error (small groups, where one clipped outlier costs more than the finer step saves).
    Returns the fraction of weights that end up clipped.
    """
    weight = fake.weight.float()
    magnitude = weight.abs()  # [out, in]
    threshold = outlier_threshold(magnitude, iqr_lambda)  # [out]
    if protected_columns is not None and protected_columns.any():
        threshold = torch.maximum(threshold, magnitude[:, protected_columns].amax(dim=-1))
    clipped = torch.maximum(torch.minimum(weight, threshold[:, None]), -threshold[:, None])
    scale, zero = minmax_scales(clipped, fake.spec)  # [out, groups]
    use_clipped = torch.ones_like(scale, dtype=torch.bool)
    if guard:
        current_scale, current_zero = fake.scale.detach().float(), fake.zero.float()
        use_clipped = _group_error(weight, scale, zero, fake.spec) < _group_error(
            weight, current_scale, current_zero, fake.spec)
        scale = torch.where(use_clipped, scale, current_scale)
        zero = torch.where(use_clipped, zero, current_zero)
    fake.scale.data.copy_(scale.to(fake.scale.dtype))
    fake.zero.copy_(zero.to(fake.zero.dtype))
    beyond = (magnitude > threshold[:, None]).reshape(*scale.shape, -1)
    return (beyond & use_clipped[..., None]).float().mean().item()


def _folds_into(norm: nn.Module) -> bool:
    """Norms whose ``weight`` multiplies the output (so dividing it divides the output channels)."""
    name = type(norm).__name__
    if "Gemma" in name:  # Gemma's RMSNorm multiplies by (1 + weight)
        return False
    return isinstance(norm, nn.LayerNorm) or name.endswith("RMSNorm")


def smooth_pairs(block: nn.Module) -> list[tuple[nn.Module, list[FakeQuantLinear]]]:
    pairs, seen = [], set()
    for norm_path, linear_paths in SMOOTH_PAIRS:
        if norm_path in seen:
            continue
        try:
            norm = block.get_submodule(norm_path)
            linears = [block.get_submodule(path) for path in linear_paths]
        except AttributeError:
            continue
        if all(isinstance(linear, FakeQuantLinear) for linear in linears) and _folds_into(norm):
            pairs.append((norm, linears))
            seen.add(norm_path)
    return pairs


@torch.no_grad()
def smooth_activation_outliers(block: nn.Module, inputs: torch.Tensor, kwargs: dict, iqr_lambda: float,
                               alpha: float, batch_size: int = 8
                               ) -> tuple[torch.Tensor, dict[FakeQuantLinear, torch.Tensor]]:
    """Scale the outlier input channels of every norm -> linears pair of ``block``.

    Returns the block's full-precision output for ``inputs`` (unchanged by the transform) and, for every linear
    that absorbed a scale, the bool mask [in] of its scaled columns.
    """
    pairs = smooth_pairs(block)
    peaks: dict[int, torch.Tensor] = {}

    def record(index):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            peaks[index] = x if index not in peaks else torch.maximum(peaks[index], x)
        return hook

    handles = [linears[0].register_forward_pre_hook(record(i)) for i, (_, linears) in enumerate(pairs)]
    try:
        with quantization_disabled([block]):
            outputs = run_block(block, inputs, kwargs, batch_size)
    finally:
        for handle in handles:
            handle.remove()

    scaled_columns = {}
    for index, (norm, linears) in enumerate(pairs):
        if index not in peaks:  # the block never called these linears
            continue
        peak = peaks[index]  # [in]
        threshold = outlier_threshold(peak[None], iqr_lambda)[0]
        outlier = peak > threshold
        if not outlier.any():
            continue
        factor = torch.where(outlier, (peak / threshold.clamp_min(torch.finfo(peak.dtype).tiny)).pow(alpha),
                             torch.ones_like(peak))
        norm.weight.data.copy_((norm.weight.float() / factor).to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.data.copy_((norm.bias.float() / factor).to(norm.bias.dtype))
        for linear in linears:
            linear.weight.data.copy_((linear.weight.float() * factor[None, :]).to(linear.weight.dtype))
            scale, zero = minmax_scales(linear.weight.detach(), linear.spec)
            linear.scale.data.copy_(scale.to(linear.scale.dtype))
            linear.zero.copy_(zero.to(linear.zero.dtype))
            scaled_columns[linear] = outlier
    return outputs, scaled_columns
