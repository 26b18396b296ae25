"""``Frugal``: gradient splitting with a state-full and a state-free part (Zmushko et al., "FRUGAL:
Memory-Efficient Optimization by Reducing State Overhead for Scalable Training").

For each projected weight (a 2-D or larger parameter of a group with ``projected=True``) the gradient ``G``
is split into a part in a subspace of density ``rho`` (see ``subspace``) and the rest ``G - P^T P G``. The
subspace part is updated by a *state-full inner optimizer* (any effllm or torch optimizer, AdamW at 32 or 8
bits by default) on its low-dimensional coordinates and mapped back; the rest gets a state-free update
(signSGD, SGD or none). The subspace is refreshed every ``update_gap`` steps, with the inner moments reset
(default) or kept; a subspace that is the whole weight (``rho = 1``) never changes, so it keeps them.
Parameters that are not projected (embeddings, norms, the output head, biases by default) go to the inner
optimizer whole.

How the inner optimizer sees a projected weight: through a *handle*, a tensor that holds
``zeros(coordinates)`` only during the step, with the projected gradient as its ``.grad``. After the inner
step the handle holds ``-lr * direction``: the state-full update in coordinates. Between steps it is empty,
so the only memory kept per projected weight is the inner state (``rho * numel`` elements per moment) and
the projection (a ``(rank, d)`` basis or ``rank`` indices).

State is tensors only: ``state[param]`` holds ``step``, ``basis`` or ``indices``, and ``inner`` (the very
dict the inner optimizer keeps for that parameter or handle). So ``state_dict()`` is plain tensors, loads
with ``torch.load(weights_only=True)``, and a resumed run replays the same trajectory bit for bit.

Under FSDP2 (``fully_shard``: DTensor weights sharded on dim 0) each rank updates its own rows and keeps the
inner state of its own part of the coordinates; the projections are replicated: random ones drawn alike on every
rank, an SVD taken of the gradient gathered at refresh steps only and broadcast from rank 0 (see ``_prepare``
and docs/frugal.md). Non-finite gradient elements are skipped, as AdamW8bit skips them, instead of spreading
through the projection.

Weight decay on projected weights is decoupled (``p *= 1 - lr * weight_decay``) and applied by Frugal; on
the other parameters it is the inner optimizer's own. When the subspace is the whole space (``rho = 1``,
or an active block) the coordinates are the gradient itself, so the update is exactly the inner
optimizer's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from .adam import AdamW4bit, AdamW8bit
from .dtensor import RowShards, is_dtensor, local_tensor
from .overrides import override, overrides_of
from .subspace import (
    PROJECTIONS,
    as_matrix,
    matrix_shape,
    random_basis,
    random_indices,
    residual,
    rotating_blocks,
    seeded_generator,
    short_side_first,
    subspace_rank,
    svd_basis,
)

# Inner optimizers by name: (class, constructor options).
INNER_OPTIMIZERS = {
    "adamw": (AdamW8bit, {"state_bits": 32}),
    "adamw8bit": (AdamW8bit, {}),
    "adamw4bit": (AdamW4bit, {}),
}
STATE_FREE_RULES = ("signsgd", "sgd", "none")
# Parameter names that are the output head in most causal LMs (a tied head is the embedding's weight).
DEFAULT_STATE_FULL_PATTERNS = (r"(^|\.)lm_head\.",)

# How a projected weight is treated during one step.
_FREE = "free"  # no subspace (rank 0 or an inactive block): the state-free rule only
_WHOLE = "whole"  # the subspace is the whole space: the inner optimizer on the gradient itself
_BASIS = "basis"  # coordinates basis @ G (svd, random)
_INDICES = "indices"  # coordinates G[indices] (columns)


def _is_state_full_module(module: nn.Module) -> bool:
    """Embeddings and normalisation layers keep full state (by type; norms from any library by name)."""
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return True
    name = type(module).__name__.lower()
    return "norm" in name or "embedding" in name


def frugal_param_groups(
    model: nn.Module,
    state_full_patterns: Sequence[str] = (),
    projected_patterns: Sequence[str] = (),
) -> list[dict]:
    """Param groups for ``Frugal`` from a model: ``[{"params": projected, "projected": True},
    {"params": state_full, "projected": False}]`` (empty groups left out).

    State-full by default: parameters of embeddings and norms, the output head (``get_output_embeddings()``
    or a name matching ``lm_head``) and every parameter with fewer than 2 dimensions (biases, norm scales).
    Name patterns (``re.search`` on the parameter name) override: ``state_full_patterns`` first, then
    ``projected_patterns``.
    """
    state_full_ids: set[int] = set()
    for module in model.modules():
        if _is_state_full_module(module):
            state_full_ids.update(id(p) for p in module.parameters(recurse=False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        state_full_ids.update(id(p) for p in head.parameters())
    keep = [re.compile(pattern) for pattern in (*DEFAULT_STATE_FULL_PATTERNS, *state_full_patterns)]
    user_keep = [re.compile(pattern) for pattern in state_full_patterns]
    project = [re.compile(pattern) for pattern in projected_patterns]

    projected, state_full = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(p.search(name) for p in user_keep):
            is_projected = False
        elif any(p.search(name) for p in project):
            is_projected = True
        else:
            is_projected = id(param) not in state_full_ids and not any(p.search(name) for p in keep)
        (projected if is_projected else state_full).append(param)
    groups = [{"params": projected, "projected": True}, {"params": state_full, "projected": False}]
    return [group for group in groups if group["params"]]


class Frugal(Optimizer):
    """FRUGAL around a state-full inner optimizer.

    Args:
        params: a model (state-full parameters chosen by module type, see ``frugal_param_groups``) or
            params / param groups; a group's ``projected`` (default True) says whether its parameters with
            2 or more dimensions are projected.
        lr: learning rate (an LR scheduler may change it; the inner optimizer follows).
        density: rho, the fraction of each projected weight's coordinates with state (0 to 1).
        projection: ``"svd"`` | ``"random"`` | ``"columns"`` | ``"blocks"`` (see ``subspace``).
        update_gap: T, steps between subspace refreshes.
        reset_state: reset the inner moments of projected weights at each refresh (else keep them).
        state_free: rule for the rest of the gradient: ``"signsgd"`` | ``"sgd"`` | ``"none"``.
        state_full_lr_scale, state_free_lr_scale: learning-rate factors of the two parts of projected
            weights.
        weight_decay: decoupled on projected weights; the inner optimizer's own on the others.
        inner: ``"adamw"`` (AdamW, 32-bit state), ``"adamw8bit"``, ``"adamw4bit"`` or an optimizer class.
        betas, eps: passed to the inner optimizer when given.
        inner_kwargs: further options of the inner optimizer (e.g. ``{"min_8bit_size": 0}``).
        seed: seeds the random projections (each weight and refresh has its own generator).
        state_full_patterns, projected_patterns: name overrides when ``params`` is a model.
    """

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1e-3,
        *,
        density: float = 0.25,
        projection: str = "svd",
        update_gap: int = 200,
        reset_state: bool = True,
        state_free: str = "signsgd",
        state_full_lr_scale: float = 1.0,
        state_free_lr_scale: float = 1.0,
        weight_decay: float = 0.0,
        inner: str | type[Optimizer] = "adamw",
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        inner_kwargs: dict | None = None,
        seed: int = 0,
        state_full_patterns: Sequence[str] = (),
        projected_patterns: Sequence[str] = (),
    ):
        if isinstance(params, nn.Module):
            params = frugal_param_groups(params, state_full_patterns, projected_patterns)
        elif state_full_patterns or projected_patterns:
            raise ValueError("state_full_patterns / projected_patterns need a model as the first argument")
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}: it must be >= 0")
        self._inner_cls, inner_options = self._resolve_inner(inner)
        inner_options = {**inner_options, "lr": lr, "weight_decay": weight_decay, **(inner_kwargs or {})}
        if betas is not None:
            inner_options["betas"] = tuple(betas)
        if eps is not None:
            inner_options["eps"] = eps
        self._inner_options = inner_options
        self._inner: Optimizer | None = None
        # Per group, the handles of its projected parameters in order: by position, not by tensor, so that
        # parameters swapped in the groups after construction (accelerate's FSDP2 path does) keep theirs.
        self._handles: list[list[torch.Tensor]] = []
        self._window_cache: dict[int, tuple[int, set[int]]] = {}  # group -> (refresh, active positions)
        defaults = dict(lr=lr, density=density, projection=projection, update_gap=update_gap,
                        reset_state=reset_state, state_free=state_free, state_full_lr_scale=state_full_lr_scale,
                        state_free_lr_scale=state_free_lr_scale, weight_decay=weight_decay, seed=seed,
                        projected=True)
        super().__init__(params, defaults)

    # --- construction ---------------------------------------------------------------------------------
    @staticmethod
    def _resolve_inner(inner) -> tuple[type[Optimizer], dict]:
        if isinstance(inner, str):
            if inner not in INNER_OPTIMIZERS:
                raise ValueError(f"unknown inner optimizer {inner!r}; use one of {', '.join(INNER_OPTIMIZERS)} "
                                 "or an optimizer class")
            return INNER_OPTIMIZERS[inner]
        if isinstance(inner, type) and issubclass(inner, Optimizer):
            return inner, {}
        raise TypeError(f"inner must be a name or a torch.optim.Optimizer subclass, got {inner!r}")

    @staticmethod
    def _check_group(group: dict) -> None:
        if not 0.0 <= group["density"] <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {group['density']}")
        if group["projection"] not in PROJECTIONS:
            raise ValueError(f"unknown projection {group['projection']!r}; use one of {', '.join(PROJECTIONS)}")
        if group["state_free"] not in STATE_FREE_RULES:
            raise ValueError(f"unknown state_free rule {group['state_free']!r}; "
                             f"use one of {', '.join(STATE_FREE_RULES)}")
        if int(group["update_gap"]) < 1:
            raise ValueError(f"update_gap must be >= 1, got {group['update_gap']}")

    @staticmethod
    def _check_projectable(param: torch.Tensor) -> None:
        if is_dtensor(param):
            RowShards(param)  # refuses layouts other than FSDP2's
        if param.grad is not None and param.grad.is_sparse:
            raise RuntimeError("Frugal does not support sparse gradients")

    @staticmethod
    def _is_projected(param: torch.Tensor, group: dict) -> bool:
        return bool(group["projected"]) and param.ndim >= 2

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; also gives the inner optimizer two groups: the
        group's state-full parameters, and the handles of its projected ones."""
        self._check_group({**self.defaults, **param_group})  # before torch adds the group
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        full, handles = [], []
        for param in group["params"]:
            if not self._is_projected(param, group):
                full.append(param)
                continue
            self._check_projectable(param)
            handle = torch.empty(0, dtype=torch.float32, device=param.device)
            override(handle, **overrides_of(param))
            handles.append(handle)
        self._handles.append(handles)
        inner_groups = [{"params": full}, {"params": handles, "weight_decay": 0.0}]
        if self._inner is None:
            self._inner = self._inner_cls(inner_groups, **self._inner_options)
        else:
            for inner_group in inner_groups:
                self._inner.add_param_group(inner_group)

    @property
    def inner(self) -> Optimizer:
        """The inner optimizer (its states are also reachable through ``self.state[param]["inner"]``)."""
        return self._inner

    # --- the step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # First find the work (and refuse what cannot be done) before any state changes.
        projected = []  # (param, group, group index, index among all params, position among projected)
        param_index = 0
        for group_index, group in enumerate(self.param_groups):
            self._sync_inner_hyperparameters(group_index, group)
            projected_position = 0
            for param in group["params"]:
                index, param_index = param_index, param_index + 1
                if not self._is_projected(param, group):
                    if param.grad is not None:
                        self._link_inner_state(param, param)
                    continue
                position, projected_position = projected_position, projected_position + 1
                if param.grad is not None:
                    self._check_projectable(param)  # FSDP2 may turn parameters into DTensors after __init__
                    projected.append((param, group, group_index, index, position))
        pending = [self._prepare(*work) for work in projected]
        self._inner.step()
        for work in pending:
            self._finish(*work)
        return loss

    def _sync_inner_hyperparameters(self, group_index: int, group: dict) -> None:
        full_group, projected_group = self._inner.param_groups[2 * group_index: 2 * group_index + 2]
        # The state-full parameters follow the group's (they may have been swapped, e.g. for FSDP2's DTensors).
        full = [param for param in group["params"] if not self._is_projected(param, group)]
        if len(full) != len(full_group["params"]) or any(a is not b for a, b in zip(full, full_group["params"])):
            full_group["params"] = full
        full_group["lr"] = group["lr"]
        full_group["weight_decay"] = group["weight_decay"]
        projected_group["lr"] = group["lr"] * group["state_full_lr_scale"]
        projected_group["weight_decay"] = 0.0  # Frugal decays the whole projected weight itself

    def _link_inner_state(self, param: torch.Tensor, target: torch.Tensor) -> dict:
        """Make ``self.state[param]["inner"]`` and the inner optimizer's state of ``target`` one dict."""
        inner_state = self.state[param].setdefault("inner", {})
        self._inner.state[target] = inner_state
        return inner_state

    def _mode(self, shape: tuple[int, int], group: dict, group_index: int, position: int, refresh: int) -> str:
        if group["projection"] == "blocks":
            return _WHOLE if position in self._active_blocks(group, group_index, refresh) else _FREE
        rank = subspace_rank(shape, group["density"])
        if rank == 0:
            return _FREE
        if rank == min(shape):
            return _WHOLE
        return _INDICES if group["projection"] == "columns" else _BASIS

    def _active_blocks(self, group: dict, group_index: int, refresh: int) -> set[int]:
        cached = self._window_cache.get(group_index)
        if cached is None or cached[0] != refresh:
            sizes = [p.numel() for p in group["params"] if self._is_projected(p, group)]
            cached = (refresh, set(rotating_blocks(sizes, group["density"], refresh)))
            self._window_cache[group_index] = cached
        return cached[1]

    def _refresh(self, state: dict, group: dict, grad: torch.Tensor, shape: tuple[int, int], mode: str,
                 index: int, refresh: int, shards: RowShards | None) -> None:
        """New subspace for one weight; resets its inner moments if asked and the subspace changed.

        Under FSDP2 every rank holds the same projection: random ones come from the same seeded generator; the
        SVD is of the whole gradient (gathered at refresh steps only), and rank 0's basis is broadcast."""
        state.pop("basis", None)
        state.pop("indices", None)
        d = min(shape)
        rank = subspace_rank(shape, group["density"])
        device = local_tensor(grad).device
        if mode == _BASIS and group["projection"] == "svd":
            a = short_side_first(as_matrix(grad.full_tensor() if shards else grad))
            # A NaN/Inf gradient element must not break the SVD (it would not converge and leave no basis).
            state["basis"] = svd_basis(torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0), rank)
            if shards:
                shards.broadcast_(state["basis"])
        elif mode == _BASIS:
            state["basis"] = random_basis(d, rank, seeded_generator(group["seed"], index, refresh), device)
        elif mode == _INDICES:
            state["indices"] = random_indices(d, rank, seeded_generator(group["seed"], index, refresh), device)
        # The whole space never changes, so its moments stay valid; a weight without a subspace keeps none.
        if mode == _FREE or (group["reset_state"] and mode != _WHOLE):
            state["inner"].clear()

    def _prepare(self, param, group, group_index, index, position):
        """Before the inner step: refresh if due, split the gradient, load the handle with coordinates.

        Everything works on this rank's rows (all of them without FSDP2) in the ``(d, long)`` orientation of
        the whole weight: a tall weight (more rows than columns) is sharded along ``long``, so its coordinates
        ``basis @ a`` are rows of the same shard; a wide one is sharded along ``d``, so ``basis @ a`` is a sum
        over ranks (one all-reduce), and each rank hands the inner optimizer its own columns of it."""
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        state["step"] += 1  # a CPU tensor: no device synchronisation
        step = int(state["step"])
        refresh = (step - 1) // int(group["update_gap"])
        handle = self._handles[group_index][position]
        self._link_inner_state(param, handle)
        shards = RowShards(param) if is_dtensor(param) else None
        shape = matrix_shape(param.shape)
        tall = shape[0] > shape[1]
        mode = self._mode(shape, group, group_index, position, refresh)
        if (step - 1) % int(group["update_gap"]) == 0:
            self._refresh(state, group, param.grad, shape, mode, index, refresh, shards)

        local_grad = local_tensor(param.grad)
        coordinates = rest = finite = local_indices = None
        if mode == _WHOLE:
            coordinates = local_grad.float()  # the inner optimizer skips non-finite elements itself (AdamW8bit)
        elif mode == _FREE and group["state_free"] == "none":
            pass
        else:
            # Non-finite gradient elements are left out (zero) and their weights not updated, as AdamW8bit
            # does: through the projection one Inf would otherwise spread over a whole row or column.
            a = as_matrix(local_grad).float()
            a = a.T if tall else a  # (d, long) or a shard of it
            finite = torch.isfinite(a)
            a = torch.where(finite, a, 0.0)
            if mode == _FREE:
                rest = a
            elif mode == _BASIS:
                basis = state["basis"] if shards is None or tall else state["basis"][:, shards.start:shards.stop]
                coordinates = basis @ a  # (rank, long)
                if shards is None:
                    rest = residual(a, state["basis"], coordinates)
                else:
                    if not tall:
                        coordinates = shards.all_reduce_(coordinates)
                    rest = residual(a, basis, coordinates, shards.all_reduce_, shape)
                    if not tall:
                        coordinates = coordinates[:, shards.column_slice(shape[1])]
            else:
                local_indices = state["indices"]
                if shards is not None and not tall:  # the chosen rows that lie in this rank's shard
                    mine = (local_indices >= shards.start) & (local_indices < shards.stop)
                    local_indices = local_indices[mine] - shards.start
                coordinates = a[local_indices]  # (rank, long)
                rest = a.index_fill(0, local_indices, 0.0)
        if coordinates is not None:
            if shards is not None:
                self._agree_on_state_layout(param, handle, group_index, mode, shape, group["density"])
            handle.data = torch.zeros_like(coordinates)
            handle.grad = coordinates
        return param, handle, group, state, mode, rest, finite, local_indices, shards, shape

    def _agree_on_state_layout(self, param, handle, group_index, mode, shape, density) -> None:
        """Under FSDP2 the handle holds one rank's part of the coordinates; an inner optimizer that picks
        8-bit or 32-bit state by size (``min_8bit_size``) must pick by the whole, so all ranks agree."""
        options = {**self._inner.param_groups[2 * group_index + 1], **overrides_of(param)}
        threshold = options.get("min_8bit_size")
        if threshold is None:
            return
        whole = shape[0] * shape[1] if mode == _WHOLE else subspace_rank(shape, density) * max(shape)
        override(handle, min_8bit_size=0 if whole >= threshold else whole + 1)

    def _finish(self, param, handle, group, state, mode, rest, finite, local_indices, shards, shape) -> None:
        """After the inner step: map the state-full update back, add the state-free one, apply both."""
        lr = group["lr"]
        tall = shape[0] > shape[1]
        update = None  # in the (d, long) orientation, except for mode _WHOLE (the parameter's local shape)
        if rest is not None and group["state_free"] != "none":
            free_lr = lr * group["state_free_lr_scale"]
            update = rest.sign_() if group["state_free"] == "signsgd" else rest
            update.mul_(-free_lr)
        if mode == _WHOLE:
            update = handle.data
        elif mode == _BASIS:
            if shards is None:
                mapped = state["basis"].T @ handle.data
            elif tall:
                mapped = state["basis"].T @ handle.data
            else:  # every rank's columns of the update, then this rank's rows of basis^T @ update
                mapped = state["basis"][:, shards.start:shards.stop].T @ shards.gather_columns(handle.data, shape[1])
            update = mapped if update is None else update.add_(mapped)
        elif mode == _INDICES:
            if update is None:
                update = torch.zeros_like(rest)
            update.index_add_(0, local_indices, handle.data)
        handle.data = torch.empty(0, dtype=torch.float32, device=handle.device)
        handle.grad = None

        local_param = local_tensor(param)
        if group["weight_decay"]:
            local_param.mul_(1 - lr * group["weight_decay"])
        if update is not None:
            if mode != _WHOLE:
                update = update.masked_fill_(~finite, 0.0)
                update = update.T if tall else update
            local_param.add_(update.reshape(local_param.shape))

    # --- state ----------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but every state tensor keeps its saved dtype (torch
        would cast codes and indices to the parameter's dtype), so a round trip is bit-exact."""
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            if saved_id in state_dict["state"]:
                self.state[param] = _copy_state(state_dict["state"][saved_id], param.device)
        self._window_cache = {}

    def state_bytes(self) -> int:
        """Bytes of optimizer state: projections, indices and the inner states (not step counters)."""
        return sum(_tensor_bytes(state) for state in self.state.values())


def _copy_state(value, device: torch.device, key: str = ""):
    """A deep copy of a saved state: tensors keep their dtype; step counters stay where they were saved."""
    if isinstance(value, dict):
        return {k: _copy_state(v, device, k) for k, v in value.items()}
    if torch.is_tensor(value):
        return value.clone() if key == "step" else value.to(device=device, copy=True)
    return value


def _tensor_bytes(value, key: str = "") -> int:
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, k) for k, v in value.items())
    if torch.is_tensor(value) and key != "step":
        return value.numel() * value.element_size()
    return 0
