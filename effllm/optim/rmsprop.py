"""RMSprop with a blockwise-quantized square average (same arithmetic as ``torch.optim.RMSprop``)."""

from __future__ import annotations

from effllm.kernels.optim_update import Hyper

from .blockwise_optimizer import BlockwiseOptimizer, reject_unsupported_torch_options


class RMSprop8bit(BlockwiseOptimizer):
    algorithm = "rmsprop"

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        state_bits: int = 8,
        min_8bit_size: int = 4096,
        blocksize: int | None = None,
    ):
        if momentum != 0 or centered:
            raise ValueError("RMSprop8bit supports momentum=0 and centered=False only; use AdamW8bit for momentum")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"invalid alpha {alpha}: it must be in [0, 1)")
        reject_unsupported_torch_options(type(self).__name__, capturable=capturable, differentiable=differentiable)
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize, state_bits=state_bits, min_8bit_size=min_8bit_size,
                        blocksize=blocksize)
        super().__init__(params, defaults)

    def hyper(self, group: dict, step: int) -> Hyper:
        return Hyper(lr=float(group["lr"]), beta2=group["alpha"], eps=group["eps"],
                     weight_decay=group["weight_decay"], step=step, maximize=bool(group.get("maximize")))
