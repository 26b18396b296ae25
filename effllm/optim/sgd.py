"""SGD with a blockwise-quantized momentum buffer (same arithmetic as ``torch.optim.SGD``)."""

from __future__ import annotations

from effllm.kernels.optim_update import Hyper

from .blockwise_optimizer import BlockwiseOptimizer, reject_unsupported_torch_options


class SGD8bit(BlockwiseOptimizer):
    algorithm = "sgd"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        state_bits: int = 8,
        min_8bit_size: int = 4096,
        blocksize: int | None = None,
    ):
        if momentum < 0:
            raise ValueError(f"invalid momentum {momentum}: it must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        reject_unsupported_torch_options(type(self).__name__, differentiable=differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, state_bits=state_bits, min_8bit_size=min_8bit_size,
                        blocksize=blocksize)
        super().__init__(params, defaults)

    def has_state(self, group: dict) -> tuple[bool, bool]:
        return (group["momentum"] != 0, False)

    def hyper(self, group: dict, step: int) -> Hyper:
        return Hyper(lr=float(group["lr"]), beta1=group["momentum"], weight_decay=group["weight_decay"],
                     step=step, dampening=group["dampening"], nesterov=group["nesterov"],
                     maximize=bool(group.get("maximize")))
