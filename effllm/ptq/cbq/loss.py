"""CBQ's objective: output reconstruction, its distribution term, and the rounding regulariser."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TINY = 1e-12  # keeps normalisers away from 0 for all-zero targets


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE relative to the target's mean square, so the other terms' weights do not depend on the hidden scale."""
    return F.mse_loss(output.float(), target.float()) / target.float().pow(2).mean().clamp_min(TINY)


def distribution_loss(output: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P_target || P_output), the softmax of every token's hidden vector, averaged over tokens.

    Each token is divided by ``temperature`` times the RMS of its full-precision target (the same divisor for
    both), so the softmax is as sharp for a block whose hidden states are large as for one whose are small.
    """
    target = target.float()
    divisor = temperature * target.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(TINY)
    target_log_p = F.log_softmax(target / divisor, dim=-1)
    output_log_p = F.log_softmax(output.float() / divisor, dim=-1)
    per_token = (target_log_p.exp() * (target_log_p - output_log_p)).sum(dim=-1)
    return per_token.mean()


def rounding_regularizer(soft_offsets: list[torch.Tensor], beta: float) -> torch.Tensor:
    """Mean of ``1 - |2h - 1| ** beta`` over every rounding offset: 0 when each ``h`` is 0 or 1."""
    total = sum((1 - (2 * h - 1).abs().pow(beta)).sum() for h in soft_offsets)
    count = sum(h.numel() for h in soft_offsets)
    return total / max(count, 1)
