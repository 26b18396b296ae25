"""Uniform integer quantization of weights and activations, with fake-quant for calibration.

Weights are quantized per output channel or per group of ``group_size`` consecutive input columns, with
min-max scales: asymmetric (``q = clamp(round(w / s) + z, 0, 2**bits - 1)``, ``w ≈ (q - z) * s``) or
symmetric (the same with ``z`` fixed at ``2**(bits - 1)`` and the range centred on 0, as GPTQ does).
Activations are quantized per token (dynamic) or per tensor (static scale).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

WEIGHT_BITS = range(2, 9)
ACT_BITS = range(4, 9)


@dataclass(frozen=True)
class WeightQuantSpec:
    """How a weight matrix [out_features, in_features] is quantized."""

    bits: int = 4
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be in {WEIGHT_BITS.start}..{WEIGHT_BITS.stop - 1}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive (or None for per-channel), got {self.group_size}")

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dimension; raises if the group size does not divide it."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the input dimension {in_features}; "
                f"choose a divisor of {in_features} (or per-channel)"
            )
        return in_features // self.group_size

    def to_dict(self) -> dict:
        return asdict(self)


def _grouped(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """[out, in] -> [out, groups, group_size]."""
    out_features, in_features = w.shape
    groups = spec.groups(in_features)
    return w.reshape(out_features, groups, in_features // groups)


def minmax_scales(w: torch.Tensor, spec: WeightQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero)``, each [out, groups] fp32; ``zero`` holds integer values."""
    g = _grouped(w.float(), spec)
    return range_scales(g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0), spec)


def range_scales(low: torch.Tensor, high: torch.Tensor, spec: WeightQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` that cover the range ``[low, high]`` (``low <= 0 <= high``), elementwise."""
    if spec.symmetric:
        bound = torch.maximum(-low, high)
        scale = 2 * bound / spec.max_code
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
    else:
        scale = (high - low) / spec.max_code
        zero = torch.round(-low / torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    return scale, zero


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Integer codes [out, in] (uint8) of ``w`` under ``scale``/``zero`` [out, groups]."""
    g = _grouped(w.float(), spec)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, spec.max_code)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightQuantSpec, dtype=torch.float32
) -> torch.Tensor:
    g = _grouped(q.float(), spec)
    return ((g - zero[..., None]) * scale[..., None]).reshape(q.shape).to(dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_weight(
    w: torch.Tensor, spec: WeightQuantSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize ``w`` differentiably (STE through rounding; gradients reach ``w`` and ``scale``)."""
    if scale is None or zero is None:
        scale, zero = minmax_scales(w.detach(), spec)
    g = _grouped(w, spec)
    q = torch.clamp(round_ste(g / scale[..., None]) + zero[..., None], 0, spec.max_code)
    return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape).to(w.dtype)


def fake_quant_activation(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric activation fake-quant: per token (last dim) when ``scale`` is None, else a static scale."""
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be in {ACT_BITS.start}..{ACT_BITS.stop - 1}, got {bits}")
    top = 2 ** (bits - 1) - 1
    if scale is None:
        scale = x.detach().abs().amax(dim=-1, keepdim=True).float() / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(round_ste(x.float() / scale), -top - 1, top)
    return (q * scale).to(x.dtype)
