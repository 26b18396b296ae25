"""LoRA-Rounding: AdaRound's learned rounding, with the learned part of the rounding logits of rank ``r``.

A ``FakeQuantLinear`` calls its ``rounding`` module on ``x = weight / scale`` ([out, groups, group_size]) and
expects integer-ish codes. LoRA-Rounding returns ``floor(x) + h(V)``, ``h`` the rectified sigmoid
``clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)``, with the logits [out, in]

    V = sharpness * logit_h(frac(x)) + A @ B        (A: [out, r], B: [r, in])

- ``logit_h(frac(x))`` is the logit at which ``h`` equals the fractional part of ``x``: at ``sharpness = 1`` and
  ``A @ B = 0`` the soft code is ``x`` itself (AdaRound's initialisation) and the hard code (``h >= 0.5``) is
  round-to-nearest. It is recomputed from the current ``x`` at every call (and not learned), so when the step
  size is learned jointly no weight crosses an integer boundary with a stale offset.
- ``A @ B`` is the learned low-rank shift of the rounding decisions: ``A`` random, ``B`` zero (the usual LoRA
  initialisation, so the shift starts at exactly 0); only ``r * (out + in)`` parameters per linear.
- ``sharpness`` is raised by the trainer during optimisation (annealing the temperature of the sigmoid): a
  low-rank ``A @ B`` cannot push every ``h`` to 0 or 1 on its own (AdaRound's regulariser alone can with a
  full-rank ``V``), so without it the soft codes stay close to ``x`` and the final hard rounding would land far
  from what was optimised. With ``sharpness`` high the soft and the hard codes agree.

``lora_init="zero"`` drops the fractional term (``V = A @ B``: every ``h`` starts at 0.5, the paper's literal
LoRA initialisation, far from round-to-nearest). ``hard = True`` switches to the final rounding
``floor(x) + (h >= 0.5)``, which is what ``FakeQuantLinear.freeze()`` packs.

``NearestRounding`` is the switched-off alternative (``lora_rounding=False``): round-to-nearest with a
straight-through gradient, as ``FakeQuantLinear`` does by default. Both carry a ``preprocessed`` flag (CFP has run
on the layer) as a buffer, so a checkpointed window restores it with the rest of the block's state.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.quant.weight_quant import round_ste

# AdaRound's stretch of the sigmoid beyond [0, 1], so h reaches exactly 0 and 1 with finite logits.
ZETA = 1.1
GAMMA = -0.1
A_INIT_STD = 1.0  # with B = 0 the shift starts at 0 whatever A is; unit A lets B's updates move it at once
FRACTION_EPS = 1e-4  # keeps the inverse sigmoid finite for fractional parts at exactly 0 or 1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """Logits ``V`` with ``rectified_sigmoid(V) == h`` for ``h`` in (0, 1)."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(FRACTION_EPS, 1 - FRACTION_EPS)
    return torch.log(p) - torch.log1p(-p)


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor in the forward pass, identity gradient (so the step size gets LSQ's gradient, not a pure gain's)."""
    return x + (torch.floor(x) - x).detach()


class NearestRounding(nn.Module):
    def __init__(self, device=None):
        super().__init__()
        self.register_buffer("preprocessed", torch.zeros((), dtype=torch.bool, device=device))

    def forward(self, scaled: torch.Tensor) -> torch.Tensor:
        return round_ste(scaled)


class LoRARounding(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, init: str = "nearest",
                 generator: torch.Generator | None = None, device=None):
        super().__init__()
        self.register_buffer("preprocessed", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("sharpness", torch.ones((), device=device))  # set by the trainer every step
        rank = min(rank, out_features, in_features)
        a = torch.randn(out_features, rank, generator=generator) * A_INIT_STD
        # Trainable only while a window optimises them.
        self.a = nn.Parameter(a.to(device), requires_grad=False)  # [out, r]
        self.b = nn.Parameter(torch.zeros(rank, in_features, device=device), requires_grad=False)  # [r, in]
        self.use_fraction = init == "nearest"
        self.hard = False
        self._last_logits: torch.Tensor | None = None

    def logits(self, scaled: torch.Tensor) -> torch.Tensor:
        """V [out, in] for ``scaled`` = weight / scale [out, groups, group_size]."""
        shift = self.a @ self.b
        if not self.use_fraction:
            return shift
        fraction = (scaled - torch.floor(scaled)).detach().reshape(shift.shape).float()
        return self.sharpness * inverse_rectified_sigmoid(fraction) + shift

    def forward(self, scaled: torch.Tensor) -> torch.Tensor:
        logits = self.logits(scaled)
        self._last_logits = logits
        offset = rectified_sigmoid(logits)
        if self.hard:
            offset = (offset >= 0.5).to(offset.dtype)
        return floor_ste(scaled) + offset.reshape(scaled.shape).to(scaled.dtype)

    def set_sharpness(self, value: float) -> None:
        self.sharpness.fill_(value)

    def harden(self) -> None:
        """Switch to the final rounding ``h >= 0.5`` and drop the last step's autograd graph."""
        self.hard = True
        self._last_logits = None

    def last_soft_offset(self) -> torch.Tensor:
        """h [out, in] of the latest forward call (what the rounding regulariser acts on)."""
        if self._last_logits is None:
            raise RuntimeError("LoRARounding has not run a forward pass yet")
        return rectified_sigmoid(self._last_logits)


def attach_lora_rounding(fake, rank: int, init: str, generator: torch.Generator | None = None) -> LoRARounding:
    """Give a ``FakeQuantLinear`` a LoRA-Rounding module (its codes start at round-to-nearest)."""
    fake.rounding = LoRARounding(fake.out_features, fake.in_features, rank, init, generator, fake.weight.device)
    return fake.rounding


def attach_nearest_rounding(fake) -> NearestRounding:
    fake.rounding = NearestRounding(fake.weight.device)
    return fake.rounding
