"""A small ``LlamaForCausalLM`` built from a config, and a plain training loop that takes any optimizer.

The loop exists so that optimizers can be compared on a real (if tiny) language model: same initial weights
(seeded init), same batches (seeded data order), different optimizer factory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

from .byte_corpus import VOCAB_SIZE


@dataclass
class TinyLMConfig:
    """Shape of the tiny Llama; the defaults give about 0.1M parameters, trained in seconds on a CPU."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    vocab_size: int = VOCAB_SIZE
    max_seq_len: int = 256
    tie_embeddings: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def build_tiny_llama(config: TinyLMConfig | None = None, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM``; the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or TinyLMConfig()
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(hf_config)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # training loss at every step
    valid_loss: float | None = None
    seconds: float = 0.0

    def smoothed_final_loss(self, last: int = 20) -> float:
        """Mean training loss of the last ``last`` steps: one step's loss is too noisy to compare."""
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over ``batches`` (each [batch, seq_len] token ids)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += float(model(input_ids=batch, labels=batch).loss)
        count += 1
    model.train(was_training)
    return total / count


def train_lm(
    model,
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    batches: Iterable[torch.Tensor],
    *,
    valid_batches: Iterable[torch.Tensor] | None = None,
    max_grad_norm: float | None = None,
    make_scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
) -> TrainResult:
    """Train ``model`` on ``batches`` (one optimizer step each) and return the per-step losses.

    ``make_optimizer`` receives the trainable parameters; ``make_scheduler`` (optional) the optimizer, and
    its ``step()`` runs after each optimizer step. ``valid_batches`` gives a validation loss at the end.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params)
    scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
    result = TrainResult()
    start = time.perf_counter()
    model.train()
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        result.losses.append(float(loss.detach()))
    result.seconds = time.perf_counter() - start
    if valid_batches is not None:
        result.valid_loss = evaluate_loss(model, valid_batches)
    return result


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
