"""``CBQ``: the cross-block quantization plug-in of the block-sequential runner.

For each window of ``config.window`` blocks the runner hands over (consecutive windows overlap by
``config.overlap`` blocks), ``calibrate``:

1. pre-processes the blocks it has not seen before (CFP: activation outliers scaled into the norms' and
   linears' weights, weight outliers truncated through the quantizers' ranges) and gives their linears a
   LoRA-Rounding module; blocks of the overlap keep what the previous window learned and go on learning it;
2. learns, jointly for every linear of the window, the rounding factors and the step sizes, so the window's
   output on the quantized model's input approaches the full-precision window's output on the full-precision
   input (the runner's targets): loss = relative MSE + ``kl_weight`` * KL + rounding regulariser;
3. ends with hard rounding (``h >= 0.5``), so what the runner freezes is what was evaluated.

``torch.manual_seed`` is not touched: randomness (sample order, LoRA factors) comes from a generator seeded with
``config.seed`` and the window's number, so two runs with the same config and data give the same model.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from effllm.quant.fake_quant_linear import FakeQuantLinear, quantization_disabled

from ..block_inputs import run_block
from .cfp import smooth_activation_outliers, truncate_weight_outliers
from .config import CBQConfig
from .lora_rounding import LoRARounding, attach_lora_rounding
from .loss import distribution_loss, reconstruction_loss, rounding_regularizer
from .schedules import BetaSchedule, SharpnessSchedule
from .step_size import attach_step_size_gain, bake_step_size_gain

STATS_BATCH = 8  # samples per forward pass when collecting activation statistics


@dataclass
class WindowStats:
    """What one ``calibrate`` call did (appended to ``CBQ.history``)."""

    blocks: int
    steps: int
    first_epoch_loss: float  # mean training loss (all terms) over the first epoch
    last_epoch_loss: float
    smoothed_channels: int  # activation channels scaled by CFP in this window's new blocks
    clipped_weights: float  # fraction of this window's new weights beyond their truncation threshold
    undecided_rounding: float  # fraction of soft offsets h not yet 0 or 1 when hard rounding was applied


def fake_quant_linears(blocks: list[nn.Module]) -> list[FakeQuantLinear]:
    return [m for block in blocks for m in block.modules() if isinstance(m, FakeQuantLinear)]


class CBQ:
    def __init__(self, config: CBQConfig | None = None):
        self.config = config or CBQConfig()
        self.history: list[WindowStats] = []
        self._prepared: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    @property
    def window(self) -> int:
        return self.config.window

    @property
    def overlap(self) -> int:
        return self.config.overlap

    def calibrate(self, blocks: list[nn.Module], inputs: torch.Tensor, kwargs: dict,
                  targets: torch.Tensor) -> None:
        config = self.config
        inputs, targets = inputs.detach(), targets.detach()  # the graph only runs from the quantizers
        generator = torch.Generator().manual_seed(config.seed + len(self.history))
        smoothed, clipped = self._prepare(blocks, inputs, kwargs, generator)
        fakes = fake_quant_linears(blocks)
        roundings = [fake.rounding for fake in fakes if isinstance(fake.rounding, LoRARounding)]

        trainable_before = {p: p.requires_grad for block in blocks for p in block.parameters()}
        for parameter in trainable_before:
            parameter.requires_grad_(False)  # only the quantizers learn; no gradients for the rest
        gains = [attach_step_size_gain(fake) for fake in fakes]
        try:
            for rounding in roundings:
                rounding.hard = False
                rounding.a.requires_grad_(True)
                rounding.b.requires_grad_(True)
            groups = [{"params": gains, "lr": config.lr_scale}]
            if roundings:
                groups.append({"params": [p for r in roundings for p in (r.a, r.b)], "lr": config.lr_rounding})
            optimizer = torch.optim.Adam(groups)
            first, last, steps = self._train(blocks, inputs, kwargs, targets, roundings, optimizer, generator)
        finally:
            for fake in fakes:
                bake_step_size_gain(fake)
            for rounding in roundings:
                rounding.a.requires_grad_(False)
                rounding.b.requires_grad_(False)
            for parameter, flag in trainable_before.items():
                parameter.requires_grad_(flag)

        undecided = 0.0
        if roundings:
            with torch.no_grad():
                offsets = torch.cat([r.last_soft_offset().flatten() for r in roundings])
                undecided = ((offsets > 0) & (offsets < 1)).float().mean().item()
        for rounding in roundings:
            rounding.harden()
        self.history.append(WindowStats(len(blocks), steps, first, last, smoothed, clipped, undecided))

    def _prepare(self, blocks, inputs, kwargs, generator) -> tuple[int, float]:
        """CFP and LoRA-Rounding set-up for the blocks of this window not seen in an earlier window."""
        config = self.config
        fresh = [block not in self._prepared for block in blocks]
        last_fresh = max((i for i, new in enumerate(fresh) if new), default=-1)
        smoothed, clipped_count, weight_count = 0, 0.0, 0
        hidden = inputs
        with torch.no_grad():
            for index, block in enumerate(blocks[: last_fresh + 1]):
                needs_next_input = index < last_fresh
                scaled_columns: dict = {}
                if fresh[index] and config.cfp_activations:
                    hidden_next, scaled_columns = smooth_activation_outliers(
                        block, hidden, kwargs, config.cfp_act_lambda, config.cfp_act_alpha, STATS_BATCH)
                    masks = {id(mask): mask for mask in scaled_columns.values()}  # one per norm
                    smoothed += sum(int(mask.sum()) for mask in masks.values())
                elif needs_next_input:
                    with quantization_disabled([block]):
                        hidden_next = run_block(block, hidden, kwargs, STATS_BATCH)
                if fresh[index]:
                    for fake in fake_quant_linears([block]):
                        if config.cfp_weights:
                            fraction = truncate_weight_outliers(fake, config.cfp_weight_lambda,
                                                                scaled_columns.get(fake), config.cfp_weight_guard)
                            clipped_count += fraction * fake.weight.numel()
                        weight_count += fake.weight.numel()
                        if config.lora_rounding:
                            attach_lora_rounding(fake, config.lora_rank, config.lora_init, generator)
                    self._prepared.add(block)
                if needs_next_input:
                    hidden = hidden_next
        return smoothed, clipped_count / max(weight_count, 1)

    def _train(self, blocks, inputs, kwargs, targets, roundings, optimizer, generator):
        config = self.config
        samples = inputs.shape[0]
        batches_per_epoch = math.ceil(samples / config.batch_size)
        steps = config.epochs * batches_per_epoch
        schedule = BetaSchedule(steps, config.reg_warmup, config.beta_start, config.beta_end)
        sharpening = SharpnessSchedule(steps, config.sharpness_start, config.sharpness_end)
        epoch_losses = []
        step = 0
        for _ in range(config.epochs):
            order = torch.randperm(samples, generator=generator).to(inputs.device)
            total = 0.0
            for start in range(0, samples, config.batch_size):
                index = order[start : start + config.batch_size]
                for rounding in roundings:
                    rounding.sharpness = sharpening.sharpness(step)
                output = inputs[index]
                for block in blocks:
                    output = run_block(block, output, kwargs, batch_size=len(index))
                target = targets[index]
                loss = reconstruction_loss(output, target)
                if config.kl_weight:
                    loss = loss + config.kl_weight * distribution_loss(output, target, config.kl_temperature)
                if roundings and config.round_reg_weight and schedule.active(step):
                    offsets = [r.last_soft_offset() for r in roundings]
                    loss = loss + config.round_reg_weight * rounding_regularizer(offsets, schedule.beta(step))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                step += 1
            epoch_losses.append(total / batches_per_epoch)
        return epoch_losses[0], epoch_losses[-1], steps
