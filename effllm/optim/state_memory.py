"""How much memory an optimizer's state holds, for any ``torch.optim.Optimizer``."""

from __future__ import annotations

import torch


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state: effllm's own count (codes, absmax, moments, projections) or, for any other
    optimizer, every state tensor but the step counters. A tensor shared by several parameters (e.g.
    bitsandbytes' quantization maps) counts once. Wrappers with an ``optimizer`` attribute (accelerate's
    ``AcceleratedOptimizer``) are looked through."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    seen = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                seen[value.data_ptr()] = value.numel() * value.element_size()
    return sum(seen.values())
