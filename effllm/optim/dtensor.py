"""Local shards of DTensors (FSDP2's ``fully_shard`` parameters and gradients).

An optimizer with elementwise updates works shard by shard: each rank updates the elements it holds and
keeps the state of those elements only. These helpers do not import ``torch.distributed``: if its tensor
module was never imported, no tensor can be a DTensor, so ``import effllm`` stays lean.
"""

from __future__ import annotations

import sys

import torch

_DTENSOR_MODULE = "torch.distributed.tensor"


def is_dtensor(tensor: torch.Tensor) -> bool:
    module = sys.modules.get(_DTENSOR_MODULE)
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (a view: in-place updates reach the parameter), else ``tensor``."""
    return tensor.to_local() if is_dtensor(tensor) else tensor
