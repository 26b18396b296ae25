"""Local shards of DTensors (FSDP2's ``fully_shard`` parameters and gradients).

An optimizer with elementwise updates works shard by shard: each rank updates the elements it holds and
keeps the state of those elements only. Frugal's projections mix rows, so ``RowShards`` also says which rows
a rank holds and carries the few collectives they need. Nothing here imports ``torch.distributed`` at import
time: if its tensor module was never imported, no tensor can be a DTensor, so ``import effllm`` stays lean.
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


class RowShards:
    """Where one rank's rows of a weight sharded on dim 0 lie, and the few collectives Frugal needs on it.

    FSDP2 (``fully_shard``) shards every parameter on dim 0 over a 1-D mesh, as ``torch.chunk`` does: rank
    ``r`` holds rows ``[r * ceil(m / W), ...)``, the last ranks fewer or none. Other layouts (HSDP's 2-D mesh,
    ``shard_placement_fn`` on another dim) are refused.
    """

    def __init__(self, param: torch.Tensor):
        from torch.distributed.tensor import Shard

        placements = tuple(param.placements)
        if param.device_mesh.ndim != 1 or placements != (Shard(0),):
            raise NotImplementedError(
                f"Frugal projects DTensor weights sharded on dim 0 over a 1-D mesh (FSDP2's fully_shard); got "
                f"placements {placements} on a {param.device_mesh.ndim}-D mesh: use fully_shard's default layout")
        self.mesh = param.device_mesh
        self.group = self.mesh.get_group()
        self.world = self.mesh.size()
        rows = param.shape[0]
        chunk = -(-rows // self.world)
        self.start = min(self.mesh.get_local_rank() * chunk, rows)
        self.stop = min(self.start + chunk, rows)
        if param.to_local().shape[0] != self.stop - self.start:
            raise NotImplementedError(f"unexpected shard of {param.to_local().shape[0]} rows (expected rows "
                                      f"{self.start}:{self.stop} of {rows}): Frugal supports torch.chunk sharding")

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank gets the mesh's first rank's ``tensor`` (in place): one basis, bit for bit, everywhere."""
        import torch.distributed as dist

        dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)
        return tensor

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the mesh, in place."""
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)
        return tensor

    def column_slice(self, columns: int) -> slice:
        """This rank's part of ``columns`` (chunked like FSDP2's rows)."""
        chunk = -(-columns // self.world)
        start = min(self.mesh.get_local_rank() * chunk, columns)
        return slice(start, min(start + chunk, columns))

    def gather_columns(self, local: torch.Tensor, columns: int) -> torch.Tensor:
        """Every rank's ``column_slice`` part of a ``(rows, columns)`` matrix, put together on every rank."""
        from torch.distributed.tensor import DTensor, Shard

        shape = (local.shape[0], columns)
        return DTensor.from_local(local.contiguous(), self.mesh, [Shard(1)], shape=shape,
                                  stride=(columns, 1)).full_tensor()
