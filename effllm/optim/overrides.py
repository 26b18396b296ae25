"""Per-parameter and per-module optimizer overrides (e.g. keep embeddings in 32-bit state).

Overrides live on the parameter itself, so they hold for any optimizer built later, whatever its
param groups. They take precedence over the group's options.
"""

from __future__ import annotations

import torch

OVERRIDABLE = ("state_bits", "blocksize", "min_8bit_size")
_ATTR = "_effllm_optim_overrides"


def override(target: torch.nn.Module | torch.Tensor, **options) -> None:
    """Set optimizer options for one parameter, or for every parameter of a module (recursively).

    Example: ``override(model.embed_tokens, state_bits=32)``.
    """
    unknown = set(options) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)}; overridable options are {', '.join(OVERRIDABLE)}")
    params = target.parameters() if isinstance(target, torch.nn.Module) else [target]
    for param in params:
        merged = dict(getattr(param, _ATTR, {}))
        merged.update(options)
        setattr(param, _ATTR, merged)


def overrides_of(param: torch.Tensor) -> dict:
    return getattr(param, _ATTR, {})
