"""Round-to-nearest: min-max scales, no calibration. The baseline every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RTN:
    window: int = 1
    overlap: int = 0

    def calibrate(self, blocks: list[nn.Module], inputs: torch.Tensor, kwargs: dict, targets: torch.Tensor) -> None:
        """Nothing to tune: ``FakeQuantLinear`` starts from min-max scales and nearest rounding."""
