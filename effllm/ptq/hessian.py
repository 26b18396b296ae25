"""Input statistics for GPTQ, collected by running a decoder block with hooks on its ``FakeQuantLinear``s.

For a linear layer ``y = x Wᵀ`` the layer-wise squared error ``Σ ||x Wᵀ - x Ŵᵀ||²`` has, per output row, the
Hessian ``H = 2/N Σ x xᵀ`` (N calibration tokens). Linears that read the very same tensor (q/k/v of an attention,
gate/up of a gated MLP) share one Hessian, so they are grouped: ``shared_input_groups`` finds the groups in
execution order, generically, by the identity of the tensor each linear receives.

The statistics are of what the linear actually multiplies: when it fake-quantizes its activations
(``act_bits``), the hook quantizes the captured input the same way (per-token dynamic quantization is
deterministic, so this reproduces the layer's own forward).
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.quant.fake_quant_linear import FakeQuantLinear
from effllm.quant.layer_hessian import HessianAccumulator, group_by_shared_input
from effllm.quant.weight_quant import fake_quant_activation

from .block_inputs import run_block


class _StopForward(Exception):
    """Raised by a hook once every linear of interest has seen its input: the rest of the block is not needed."""


def layer_input(linear: FakeQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What ``linear`` multiplies by its weight: ``x`` after the layer's activation fake-quant, if any."""
    return fake_quant_activation(x, linear.act_bits) if linear.act_bits else x


def fake_quant_linears(block: nn.Module) -> list[FakeQuantLinear]:
    return [m for m in block.modules() if isinstance(m, FakeQuantLinear)]


@torch.no_grad()
def shared_input_groups(block: nn.Module, sample: torch.Tensor, kwargs: dict) -> list[list[FakeQuantLinear]]:
    """The block's ``FakeQuantLinear``s grouped by the tensor they read, groups in execution order.

    One forward pass on ``sample`` (a slice of the block's inputs) records each linear's first input; linears
    receiving the same tensor object form one group. Linears that never run are left out.
    """
    return group_by_shared_input(fake_quant_linears(block),
                                 lambda: run_block(block, sample, kwargs, batch_size=sample.shape[0]))


@torch.no_grad()
def collect_hessians(block: nn.Module, inputs: torch.Tensor, kwargs: dict, readers: list[FakeQuantLinear],
                     batch_size: int = 8) -> list[torch.Tensor]:
    """Hessian of each linear in ``readers`` over the block run on ``inputs`` [samples, seqlen, hidden].

    Each forward pass stops as soon as every reader has seen its input, so layers after them do not run.
    """
    accumulators = [HessianAccumulator(r.in_features, inputs.device) for r in readers]
    fired: set[int] = set()

    def make_hook(index: int, reader: FakeQuantLinear):
        def hook(module, args):
            accumulators[index].add(layer_input(reader, args[0]))
            fired.add(index)
            if len(fired) == len(readers):
                raise _StopForward

        return hook

    handles = [reader.register_forward_pre_hook(make_hook(i, reader)) for i, reader in enumerate(readers)]
    try:
        for start in range(0, inputs.shape[0], batch_size):
            fired.clear()
            try:
                run_block(block, inputs[start : start + batch_size], kwargs, batch_size)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return [accumulator.hessian() for accumulator in accumulators]
