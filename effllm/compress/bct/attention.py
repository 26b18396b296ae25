"""Attention scores and probabilities on quantized data, through transformers' attention interface.

Transformers 5 encoders (BERT, RoBERTa, DistilBERT) and decoders (Llama family) compute
``softmax(q k^T * scaling + mask) v`` in a function looked up by ``config._attn_implementation`` (decoders after
the rotary embedding, with a causal mask and possibly fewer key/value heads than query heads). BCT registers its
own under ``ATTN_IMPLEMENTATION`` (a new name in transformers' public ``AttentionInterface`` and
``AttentionMaskInterface`` registries, with eager's additive masks; no existing entry changes), sets that name on
the compressed model's config only, and attaches a ``BCTAttentionOps`` to each attention module; the registered
function finds it as ``module.bct_ops``.
"""

from __future__ import annotations

import torch
from torch import nn

from .activation_quant import ActivationQuantizer
from .config import BCTConfig
from .lookup_tables import TableSoftmax

ATTN_IMPLEMENTATION = "effllm_bct"
OPS_ATTRIBUTE = "bct_ops"


class BCTAttentionOps(nn.Module):
    """Quantizers for the scores and probabilities, and the table softmax, of one attention module."""

    def __init__(self, config: BCTConfig):
        super().__init__()
        self.scores_quant = ActivationQuantizer(config.attention_scores)
        # probabilities are never negative: an unsigned map gives them every code
        self.probs_quant = ActivationQuantizer(config.attention_probs, signed=False)
        self.softmax = TableSoftmax(config.softmax) if config.softmax.bits is not None else None

    def probabilities(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            # Masked scores (padding, future tokens) are zeroed before quantizing, so they never set a block's
            # scale: a causal decoder's position t then depends on no later token, exactly
            scores = scores.masked_fill(mask < 0, 0.0)
        scores = self.scores_quant(scores)
        if mask is not None:
            scores = scores + mask  # the mask is not data: it only sends masked positions below the table
        probs = self.softmax(scores) if self.softmax is not None else torch.softmax(scores.float(), -1)
        return self.probs_quant(probs)


def bct_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs):
    """Same contract as transformers' ``eager_attention_forward``: returns ``(output [b, s, h, d], probs)``."""
    ops = getattr(module, OPS_ATTRIBUTE, None)
    if ops is None:
        raise RuntimeError(f"{type(module).__name__} has no BCT attention ops: the attention implementation "
                           f"{ATTN_IMPLEMENTATION!r} only runs on models prepared by effllm's BCT compress()")
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    groups = getattr(module, "num_key_value_groups", 1)  # grouped-query attention: each kv head serves `groups`
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling  # [b, h, q, k]
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    probs = ops.probabilities(scores, attention_mask)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value.float()).to(value.dtype).transpose(1, 2).contiguous()
    return output, probs


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, s, d] -> [b, kv_heads * groups, s, d], each head repeated ``groups`` times in place."""
    if groups == 1:
        return states
    return states.repeat_interleave(groups, dim=1)


_registered = False


def register_attention() -> None:
    """Make ``ATTN_IMPLEMENTATION`` known to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, bct_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
    _registered = True
