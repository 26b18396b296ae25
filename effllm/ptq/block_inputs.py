"""Capture what the first decoder block receives, for a batch of calibration sequences.

A pre-hook on block 0 records its positional input (the hidden states) and keyword inputs (attention mask,
rotary position embeddings, cache flags ...) and stops the forward pass there, so only the embeddings run.
This works for any architecture whose blocks share those keyword inputs, which is every decoder in
``adapters.LAYOUTS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # [samples, seqlen, hidden]
    kwargs: dict  # shared keyword inputs of every block


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor,
                         batch_size: int = 8) -> BlockInputs:
    """Run the model up to ``first_block`` on ``input_ids`` [samples, seqlen]."""
    hidden_parts: list[torch.Tensor] = []
    captured: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hidden_parts.append(hidden.detach())
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    captured.pop("past_key_values", None)
    captured.pop("past_key_value", None)
    captured["use_cache"] = False
    return BlockInputs(torch.cat(hidden_parts), captured)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int = 8) -> torch.Tensor:
    """Outputs of one block for all samples (batched to bound memory)."""
    outputs = []
    for start in range(0, hidden.shape[0], batch_size):
        chunk = hidden[start : start + batch_size]
        result = block(chunk, **_fit_batch(kwargs, chunk.shape[0]))
        outputs.append(result[0] if isinstance(result, tuple) else result)
    return torch.cat(outputs)


def _fit_batch(kwargs: dict, batch: int) -> dict:
    """Slice batch-shaped keyword inputs (masks, rotary tables) captured with another batch size."""
    fitted = {}
    for key, value in kwargs.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] > batch:
            value = value[:batch]
        elif isinstance(value, tuple) and all(torch.is_tensor(v) for v in value):
            value = tuple(v[:batch] if v.dim() > 0 and v.shape[0] > batch else v for v in value)
        fitted[key] = value
    return fitted
