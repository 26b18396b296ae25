"""Per-step schedules of a window's optimisation: the regulariser's beta and the rounding sigmoid's sharpness."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BetaSchedule:
    """No regulariser for the first ``warmup`` fraction of ``steps``, then beta decays linearly start -> end
    (AdaRound's schedule: a high beta only touches offsets already near 0 or 1, a low one pushes them all)."""

    steps: int
    warmup: float
    start: float
    end: float

    def active(self, step: int) -> bool:
        return step >= self.warmup * self.steps

    def beta(self, step: int) -> float:
        first = self.warmup * self.steps
        progress = (step - first) / max(self.steps - first, 1)
        progress = min(max(progress, 0.0), 1.0)
        return self.start + (self.end - self.start) * progress


@dataclass(frozen=True)
class SharpnessSchedule:
    """Geometric ramp from ``start`` at the first step to ``end`` at the last (constant when they are equal)."""

    steps: int
    start: float
    end: float

    def sharpness(self, step: int) -> float:
        progress = step / max(self.steps - 1, 1)
        return self.start * (self.end / self.start) ** progress
