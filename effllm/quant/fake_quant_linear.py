"""``FakeQuantLinear``: a linear layer that quantizes its weight (and inputs) on the fly during calibration.

It keeps the full-precision weight, so a calibration algorithm can toggle quantization off to get the
full-precision output (``quantization_enabled``), learn the step sizes (``scale`` is a parameter) and learn
the rounding through a pluggable ``rounding`` module (LoRA-Rounding in CBQ). ``freeze()`` ends calibration:
the result is a packed ``QuantLinear``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .weight_quant import WeightQuantSpec, fake_quant_activation, minmax_scales, round_ste


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, spec: WeightQuantSpec, act_bits: int | None = None):
        super().__init__()
        self.spec = spec
        self.act_bits = act_bits
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        scale, zero = minmax_scales(self.weight.detach(), spec)
        self.scale = nn.Parameter(scale, requires_grad=False)  # [out, groups]
        self.register_buffer("zero", zero)  # [out, groups], integer values
        self.rounding: nn.Module | None = None  # maps (weight / scale) [out, groups, gs] -> integer-ish codes
        self.enabled = True

    def _grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        groups = self.scale.shape[1]
        return tensor.reshape(self.out_features, groups, self.in_features // groups)

    def integer_weight(self) -> torch.Tensor:
        """Codes before clamping [out, groups, group_size], differentiable through the rounding."""
        scaled = self._grouped(self.weight) / self.scale[..., None]
        if self.rounding is not None:
            return self.rounding(scaled)
        return round_ste(scaled)

    def quantized_weight(self) -> torch.Tensor:
        codes = torch.clamp(self.integer_weight() + self.zero[..., None], 0, self.spec.max_code)
        return ((codes - self.zero[..., None]) * self.scale[..., None]).reshape(self.weight.shape)

    def codes(self) -> torch.Tensor:
        """Final integer codes [out, in] (uint8)."""
        with torch.no_grad():
            codes = torch.clamp(torch.round(self.integer_weight()) + self.zero[..., None], 0, self.spec.max_code)
        return codes.reshape(self.weight.shape).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return nn.functional.linear(x, self.weight, self.bias)
        if self.act_bits:
            x = fake_quant_activation(x, self.act_bits)
        return nn.functional.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    def freeze(self):
        from .quant_linear import QuantLinear

        return QuantLinear.from_codes(self.codes(), self.scale.detach(), self.zero, self.bias, self.spec,
                                      self.act_bits, dtype=self.weight.dtype)


def wrap_linears(module: nn.Module, spec: WeightQuantSpec, act_bits: int | None = None,
                 skip: tuple[str, ...] = ()) -> dict[str, FakeQuantLinear]:
    """Replace every ``nn.Linear`` under ``module`` (except names in ``skip``) with a ``FakeQuantLinear``."""
    wrapped = {}
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and name not in skip:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            fake = FakeQuantLinear(child, spec, act_bits)
            setattr(parent, attr, fake)
            wrapped[name] = fake
    return wrapped


def freeze_linears(module: nn.Module) -> None:
    """Replace every ``FakeQuantLinear`` under ``module`` by its packed ``QuantLinear``."""
    for name, child in list(module.named_modules()):
        if isinstance(child, FakeQuantLinear):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, child.freeze())


@contextmanager
def quantization_disabled(modules):
    """Run ``FakeQuantLinear``s inside ``modules`` in full precision for the duration."""
    fakes = [m for module in modules for m in module.modules() if isinstance(m, FakeQuantLinear)]
    previous = [m.enabled for m in fakes]
    for m in fakes:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(fakes, previous, strict=True):
            m.enabled = state
