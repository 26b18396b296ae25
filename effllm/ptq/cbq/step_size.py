"""Learnable step sizes: each ``FakeQuantLinear.scale`` becomes ``scale0 * exp(log_gain)`` while a window trains.

Step sizes differ by orders of magnitude between layers and groups; learning the log of a gain makes one learning
rate mean the same relative change everywhere. The gain is attached with ``torch.nn.utils.parametrize`` (the
layer itself is untouched) and baked back into a plain ``scale`` parameter when the window ends.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class StepSizeGain(nn.Module):
    def __init__(self, shape: torch.Size, device: torch.device):
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(shape, device=device))

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return scale * torch.exp(self.log_gain)


def attach_step_size_gain(fake) -> nn.Parameter:
    """Make ``fake.scale`` learnable through a gain; returns the gain's parameter."""
    gain = StepSizeGain(fake.scale.shape, fake.scale.device)
    parametrize.register_parametrization(fake, "scale", gain)
    return gain.log_gain


def bake_step_size_gain(fake) -> None:
    """Replace the parametrised ``scale`` by its current value (a plain, frozen parameter again)."""
    if parametrize.is_parametrized(fake, "scale"):
        parametrize.remove_parametrizations(fake, "scale", leave_parametrized=True)
    fake.scale.requires_grad_(False)
