"""Adam and AdamW with blockwise-quantized states.

``Adam8bit(weight_decay=...)`` is L2 regularisation, added to the gradient as in ``torch.optim.Adam``;
``AdamW8bit`` decouples it as in ``torch.optim.AdamW``. (bitsandbytes' ``Adam8bit`` applies weight decay
the decoupled way, so it is AdamW whatever its name.)
"""

from __future__ import annotations

from effllm.kernels.optim_update import Hyper

from .blockwise_optimizer import BlockwiseOptimizer


def _check_betas(betas, eps):
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
    if eps < 0:
        raise ValueError(f"invalid eps {eps}: it must be >= 0")


class Adam8bit(BlockwiseOptimizer):
    algorithm = "adam"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        state_bits: int = 8,
        min_8bit_size: int = 4096,
        blocksize: int | None = None,
    ):
        _check_betas(betas, eps)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_bits=state_bits,
                        min_8bit_size=min_8bit_size, blocksize=blocksize)
        super().__init__(params, defaults)

    def hyper(self, group: dict, step: int) -> Hyper:
        beta1, beta2 = group["betas"]
        return Hyper(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], step=step)


class AdamW8bit(Adam8bit):
    algorithm = "adamw"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **options):
        super().__init__(params, lr, betas, eps, weight_decay, **options)


class Adam4bit(Adam8bit):
    """``Adam8bit`` with 4-bit states by default (blocks of 128)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **options):
        options.setdefault("state_bits", 4)
        super().__init__(params, lr, betas, eps, weight_decay, **options)


class AdamW4bit(AdamW8bit):
    """``AdamW8bit`` with 4-bit states by default (blocks of 128)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **options):
        options.setdefault("state_bits", 4)
        super().__init__(params, lr, betas, eps, weight_decay, **options)
