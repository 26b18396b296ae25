"""Adam and AdamW with blockwise-quantized states.

``Adam8bit(weight_decay=...)`` is L2 regularisation, added to the gradient as in ``torch.optim.Adam``;
``AdamW8bit`` decouples it as in ``torch.optim.AdamW``. (bitsandbytes' ``Adam8bit`` applies weight decay
the decoupled way, so it is AdamW whatever its name.)
"""

from __future__ import annotations

from effllm.kernels.optim_update import Hyper

from .blockwise_optimizer import BlockwiseOptimizer, reject_unsupported_torch_options


def _check_betas(betas, eps):
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
    if eps < 0:
        raise ValueError(f"invalid eps {eps}: it must be >= 0")


class Adam8bit(BlockwiseOptimizer):
    """``torch.optim.Adam``'s arguments, plus the state layout (``state_bits``, ``min_8bit_size``, ``blocksize``).
    ``maximize`` and ``decoupled_weight_decay`` work as in torch; ``foreach`` and ``fused`` are accepted and
    ignored (there is one fused kernel); ``amsgrad``, ``capturable`` and ``differentiable`` must be False."""

    algorithm = "adam"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        state_bits: int = 8,
        min_8bit_size: int = 4096,
        blocksize: int | None = None,
    ):
        _check_betas(betas, eps)
        reject_unsupported_torch_options(type(self).__name__, amsgrad=amsgrad, capturable=capturable,
                                         differentiable=differentiable)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay, state_bits=state_bits,
                        min_8bit_size=min_8bit_size, blocksize=blocksize)
        super().__init__(params, defaults)

    def algorithm_for(self, group: dict) -> str:
        return "adamw" if group.get("decoupled_weight_decay") else self.algorithm

    def hyper(self, group: dict, step: int) -> Hyper:
        beta1, beta2 = (float(beta) for beta in group["betas"])  # betas may be tensors, as in torch
        return Hyper(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], step=step, maximize=bool(group.get("maximize")))


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
