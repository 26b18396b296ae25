"""The README's first command: a tiny causal LM trained with torch AdamW and effllm AdamW8bit side by side.

Same initial weights, same batches; prints loss and optimizer-state memory for each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm.optim.state_memory import optimizer_state_bytes

from .byte_corpus import load_bytes, random_batches, sequential_batches
from .tiny_lm import TinyLMConfig, build_tiny_llama, train_lm


@dataclass
class DemoRow:
    optimizer: str
    final_loss: float
    valid_loss: float
    state_bytes: int
    bytes_per_param: float
    seconds: float


def run_demo(text_path: str, steps: int = 200, batch_size: int = 8, seq_len: int = 128, lr: float = 2e-3,
             model: TinyLMConfig | None = None, seed: int = 0) -> list[DemoRow]:
    from effllm.optim import AdamW8bit

    model_config = model or TinyLMConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384)
    tokens = load_bytes(text_path, max_bytes=4_000_000)
    split = int(tokens.numel() * 0.95)
    train_tokens, valid_tokens = tokens[:split], tokens[split:]
    candidates = {
        "torch.optim.AdamW": lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        "effllm AdamW8bit": lambda params: AdamW8bit(params, lr=lr, weight_decay=0.01),
    }
    rows = []
    for name, factory in candidates.items():
        lm = build_tiny_llama(model_config, seed=seed)
        holder = {}

        def make_optimizer(params, factory=factory, holder=holder):
            holder["optimizer"] = factory(params)
            return holder["optimizer"]

        result = train_lm(lm, make_optimizer, random_batches(train_tokens, batch_size, seq_len, steps, seed=seed),
                          valid_batches=sequential_batches(valid_tokens, batch_size, seq_len, max_batches=8),
                          max_grad_norm=1.0)
        state = optimizer_state_bytes(holder["optimizer"])
        n_params = sum(p.numel() for p in lm.parameters())
        rows.append(DemoRow(name, result.smoothed_final_loss(), result.valid_loss, state, state / n_params,
                            result.seconds))
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    header = (f"{'optimizer':<20} {'train loss':>10} {'valid loss':>10} {'state MB':>9} {'bytes/param':>11} "
              f"{'time s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.optimizer:<20} {r.final_loss:>10.4f} {r.valid_loss:>10.4f} {r.state_bytes / 1e6:>9.3f} "
                     f"{r.bytes_per_param:>11.3f} {r.seconds:>7.1f}")
    return "\n".join(lines)
