"""Non-linear functions read off lookup tables indexed by quantized input codes, as an integer pipeline runs them.

``TableActivation`` (GELU and any other pointwise activation): the input is rounded onto a fixed-point grid of
``2**bits`` codes spanning ``[-input_range, input_range]`` and the output is ``table[code]``. Beyond the grid the
function continues from its last table entry with the end slope rounded to an integer (GELU: ``x`` on the right,
0 on the left; tanh: +-1), which an integer pipeline does with one add.

``TableSoftmax``: ``exp(x - rowmax)`` is read off a table over ``2**bits`` codes of the grid
``0, -h, -2h, ...`` spanning ``[-input_range, 0]``; the last code stands for everything below the range and
reads 0 (this is where masked positions land). Probabilities are the table values over their row sum.

Tables are computed from the spec on first use (never saved): the same spec always gives the same table.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TableSpec


class TableActivation(nn.Module):
    def __init__(self, function: nn.Module, spec: TableSpec):
        super().__init__()
        if spec.bits is None:
            raise ValueError("a TableActivation needs a bit width (spec.bits is null)")
        self.spec = spec
        self.function = function  # kept only to build the table from
        self.step = 2.0 * spec.input_range / (2**spec.bits - 1)
        self._tables: dict[torch.device, tuple[torch.Tensor, float, float]] = {}

    def table(self, device: torch.device) -> tuple[torch.Tensor, float, float]:
        """``(table, left slope, right slope)``, built on first use (models are first built on "meta")."""
        if device not in self._tables:
            grid = torch.linspace(-self.spec.input_range, self.spec.input_range, 2**self.spec.bits,
                                  dtype=torch.float64, device="cpu")
            with torch.no_grad():
                table = self.function(grid).to(torch.float64)
            # Beyond the grid an activation either saturates (slope 0: tanh, GELU on the left) or becomes the
            # identity (slope 1: GELU, ReLU, SiLU on the right); the end slopes of the table are rounded to
            # that integer, so the continuation never drifts
            left = float(torch.round((table[1] - table[0]) / self.step))
            right = float(torch.round((table[-1] - table[-2]) / self.step))
            self._tables[device] = (table.float().to(device), left, right)
        return self._tables[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table, left_slope, right_slope = self.table(x.device)
        reach = self.spec.input_range
        xf = x.float()
        codes = torch.round((xf + reach) / self.step).clamp_(0, table.numel() - 1).long()
        y = table[codes]
        y = torch.where(xf < -reach, table[0] + left_slope * (xf + reach), y)
        y = torch.where(xf > reach, table[-1] + right_slope * (xf - reach), y)
        return y.to(x.dtype)

    def __getstate__(self):
        return dict(self.__dict__, _tables={})  # deepcopy and pickle: tables are rebuilt on use

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, input_range={self.spec.input_range}"


def exp_table(spec: TableSpec, device=None) -> torch.Tensor:
    """``exp(-k * step)`` for codes ``k < 2**bits - 1``, then 0 for the code standing for "below the range"."""
    levels = 2**spec.bits
    step = spec.input_range / (levels - 2)  # codes 0 .. levels-2 cover [-input_range, 0]
    exponents = -torch.arange(levels - 1, dtype=torch.float64) * step
    return torch.cat([torch.exp(exponents), torch.zeros(1, dtype=torch.float64)]).float().to(device)


class TableSoftmax(nn.Module):
    """Softmax over the last dimension with exp from a table; see the module docstring."""

    def __init__(self, spec: TableSpec):
        super().__init__()
        if spec.bits is None:
            raise ValueError("a TableSoftmax needs a bit width (spec.bits is null)")
        self.spec = spec
        self.step = spec.input_range / (2**spec.bits - 2)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        table = exp_table(self.spec, scores.device)  # 2**bits floats: cheaper to make than to cache
        shifted = scores.float() - scores.float().amax(dim=-1, keepdim=True)  # <= 0; the max reads exp(0) = 1
        last = table.numel() - 1
        codes = torch.round(-shifted / self.step).clamp_(max=last)
        codes = torch.nan_to_num(codes, nan=last).long()  # a row of -inf (all masked) reads zeros
        exps = table[codes]
        total = exps.sum(dim=-1, keepdim=True)
        return (exps / torch.where(total > 0, total, torch.ones_like(total))).to(scores.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, input_range={self.spec.input_range}"
