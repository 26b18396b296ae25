"""``StableEmbedding``: an embedding that trains stably with 8-bit optimizers.

As recommended by "8-bit Optimizers via Block-wise Quantization": Xavier-uniform initialisation, a layer
norm on the output, and 32-bit optimizer state for the embedding weight (rare tokens make its gradient
statistics too non-uniform for 8-bit state).
"""

from __future__ import annotations

import torch
from torch import nn

from .overrides import override


class StableEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, *args, **kwargs):
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.norm = nn.LayerNorm(embedding_dim, device=self.weight.device)
        override(self.weight, state_bits=32)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(input))
