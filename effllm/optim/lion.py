"""Lion ("Symbolic Discovery of Optimization Algorithms", Chen et al.) with a blockwise-quantized momentum."""

from __future__ import annotations

from effllm.kernels.optim_update import Hyper

from .blockwise_optimizer import BlockwiseOptimizer


class Lion8bit(BlockwiseOptimizer):
    algorithm = "lion"

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        state_bits: int = 8,
        min_8bit_size: int = 4096,
        blocksize: int | None = None,
    ):
        if not (0.0 <= betas[0] <= 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, state_bits=state_bits,
                        min_8bit_size=min_8bit_size, blocksize=blocksize)
        super().__init__(params, defaults)

    def hyper(self, group: dict, step: int) -> Hyper:
        beta1, beta2 = (float(beta) for beta in group["betas"])  # betas may be tensors, as in torch
        return Hyper(lr=float(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                     step=step, maximize=bool(group.get("maximize")))
