"""The Hessian of a linear layer's squared output error, shared by every method that rounds with error feedback
(GPTQ in ``effllm.ptq``, BCT's calibrated rounding in ``effllm.compress``).

For ``y = x Wᵀ`` the layer-wise error ``Σ ||x Wᵀ - x Ŵᵀ||²`` has, per output row, the Hessian ``H = 2/N Σ x xᵀ``
over the N calibration rows; error feedback needs the upper Cholesky factor of its damped inverse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

DAMP_GROWTH = 10.0  # factor applied to the dampening when the damped Hessian is still not positive definite
MAX_DAMP_ATTEMPTS = 8
MIN_RELATIVE_DAMP = 1e-6  # dampening tried (× mean diag H) when percdamp is 0 and H is singular


class HessianAccumulator:
    """Running ``2/N Σ x xᵀ`` over the rows of every tensor added, in fp32."""

    def __init__(self, features: int, device: torch.device | str | None = None):
        self.outer_sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, features]
        self.outer_sum.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no inputs were recorded: the linear never ran on the calibration data")
        return 2 * self.outer_sum / self.count


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``), λ = percdamp × mean(diag H)."""
    mean_diagonal = hessian.diagonal().mean()
    damp = percdamp * mean_diagonal
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(MAX_DAMP_ATTEMPTS):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
        damp = torch.maximum(damp * DAMP_GROWTH, MIN_RELATIVE_DAMP * mean_diagonal)
    raise RuntimeError(f"the Hessian is not positive definite even with dampening {damp.item():.3g}")


@torch.no_grad()
def group_by_shared_input(linears: list[nn.Module], run: Callable[[], object]) -> list[list[nn.Module]]:
    """``linears`` grouped by the tensor object they read during ``run()`` (q/k/v share one, so one Hessian),
    groups in execution order; linears that never run are left out."""
    seen: list[tuple[torch.Tensor, list[nn.Module]]] = []  # keeps the tensors alive: no id reuse

    def record(module, args):
        if any(module in members for _, members in seen):
            return
        for tensor, members in seen:
            if tensor is args[0]:
                members.append(module)
                return
        seen.append((args[0], [module]))

    handles = [linear.register_forward_pre_hook(record) for linear in linears]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [members for _, members in seen]
