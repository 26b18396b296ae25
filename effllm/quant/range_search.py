"""Searched weight ranges: the clipping of each group's min-max range that minimises its rounding error.

Min-max ranges waste levels on a group's one or two extreme weights; at 2 and 3 bits that costs more than
clipping them. ``search_scales`` tries the min-max range shrunk by factors ``1, 1 - 1/grid, ...`` down to
``1 - max_shrink`` (the grid of the GPTQ reference's ``mse`` option, walked coarse to fine) and keeps, per
group, the one whose round-to-nearest error is lowest. The error of column ``j`` can be weighted by
``importance[j]``, e.g. the diagonal of the layer's input Hessian (the mean square of input ``j``), so the
ranges fit the columns the output depends on.
"""

from __future__ import annotations

import torch

from .weight_quant import WeightQuantSpec, _grouped, minmax_scales, range_scales


@torch.no_grad()
def search_scales(w: torch.Tensor, spec: WeightQuantSpec, importance: torch.Tensor | None = None, grid: int = 100,
                  max_shrink: float = 0.8, norm: float = 2.4,
                  start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` [out, groups] like ``minmax_scales``, each group's range shrunk to its lowest error.

    ``importance`` [in]: non-negative weight of each input column in the error (default: all equal).
    ``norm``: the error is ``sum |w - dequantized|**norm`` (2.4, the reference's choice, leans towards the
    large errors that a squared error under-weights). The min-max range (shrink 1) is always a candidate, so
    no group ends with a larger error than min-max gives it. ``start``: another ``(scale, zero)`` candidate
    (e.g. ranges an outlier pre-processing chose), kept where it is the best.
    """
    if grid < 1 or not 0 <= max_shrink < 1:
        raise ValueError(f"need grid >= 1 and 0 <= max_shrink < 1, got grid={grid}, max_shrink={max_shrink}")
    g = _grouped(w.float(), spec)  # [out, groups, group_size]
    weights = None
    if importance is not None:
        if importance.shape != (w.shape[1],):
            raise ValueError(f"importance must have one entry per input column ({w.shape[1]}), "
                             f"got shape {list(importance.shape)}")
        weights = _grouped(importance.float().clamp_min(0)[None, :], spec)  # [1, groups, group_size]
    low = g.amin(dim=-1).clamp(max=0)
    high = g.amax(dim=-1).clamp(min=0)
    best_scale, best_zero = (t.detach().float() for t in start) if start is not None else minmax_scales(w, spec)
    best_error = _error(g, best_scale, best_zero, spec, weights, norm)
    best_shrink = torch.ones_like(low)

    def consider(shrink: torch.Tensor) -> None:
        nonlocal best_error, best_scale, best_zero, best_shrink
        scale, zero = range_scales(low * shrink, high * shrink, spec)
        error = _error(g, scale, zero, spec, weights, norm)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_shrink = torch.where(better, shrink, best_shrink)

    # Coarse to fine: every COARSE-th grid point, then the grid points around each group's best coarse one
    # (the error is close to unimodal in the shrink factor; a third of the full grid's rounding passes).
    steps = int(max_shrink * grid)
    for step in range(0 if start is not None else COARSE, steps + 1, COARSE):  # step 0 is min-max
        consider(torch.full_like(low, 1 - step / grid))
    centre = best_shrink.clone()
    for offset in range(-(COARSE - 1), COARSE):
        if offset:
            shrink = centre + offset / grid
            consider(torch.where((shrink <= 1) & (shrink >= 1 - steps / grid), shrink, centre))
    return best_scale, best_zero


COARSE = 4  # coarse grid stride, in grid steps


def _error(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightQuantSpec,
           weights: torch.Tensor | None, norm: float) -> torch.Tensor:
    """Rounding error of every group [out, groups] under ``scale``/``zero`` (in place on one temporary: this
    runs dozens of times per weight)."""
    s, z = scale[..., None], zero[..., None]
    error = torch.div(g, s).round_().add_(z).clamp_(0, spec.max_code).sub_(z).mul_(s).sub_(g).abs_().pow_(norm)
    if weights is not None:
        error.mul_(weights)
    return error.sum(dim=-1)
