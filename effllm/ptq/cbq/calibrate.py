"""``CBQ``: the cross-block quantization plug-in of the block-sequential runner.

For each window of ``config.window`` blocks the runner hands over (consecutive windows overlap by
``config.overlap`` blocks), ``calibrate``:

1. pre-processes the blocks not pre-processed in an earlier window (CFP: activation outliers scaled into the
   norms' and linears' weights, then weight outliers truncated through the quantizers' ranges) and, with
   ``gptq_init``, moves their weights to GPTQ's on those ranges (``start_block``); blocks of an overlap keep
   what the previous window learned and go on learning it;
2. learns, jointly for every linear of the window, the LoRA-Rounding factors and the step sizes, so the
   window's output on the quantized model's input approaches the full-precision window's output on the
   full-precision input (the runner's targets): loss = relative MSE + ``kl_weight`` * KL + rounding regulariser;
3. ends with hard rounding (``h >= 0.5``), so what the runner freezes is what was evaluated.

Checkpoints and determinism: ``prepare(block)`` (called by the runner when a block is wrapped) attaches the
rounding modules, so their parameters and the "pre-processed" flags are part of the block's state dict and a
resumed run restores a half-done window exactly. ``torch.manual_seed`` is not used: the LoRA factors and the
sample order come from generators seeded with ``config.seed`` and the block's index (``layer_idx`` of its
attention module, as transformers numbers layers), so an interrupted and resumed run gives the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from effllm.quant.fake_quant_linear import FakeQuantLinear, quantization_disabled

from ..block_inputs import run_block
from ..gptq import GPTQ, gptq_quantize, group_ranges
from ..hessian import collect_hessians, shared_input_groups
from .cfp import smooth_activation_outliers, truncate_weight_outliers
from .config import CBQConfig
from .lora_rounding import LoRARounding, NearestRounding, attach_lora_rounding, attach_nearest_rounding
from .loss import distribution_loss, reconstruction_loss, rounding_regularizer
from .schedules import BetaSchedule, SharpnessSchedule
from .step_size import attach_step_size_gain, bake_step_size_gain

STATS_BATCH = 8  # samples per forward pass when collecting activation statistics
SEED_STRIDE = 1_000_003  # a prime: (seed, block, stream) -> distinct generator seeds
SAMPLE_ORDER_STREAM = 999  # the stream of a window's sample order (linears use their ordinal)


@dataclass
class WindowStats:
    """What one ``calibrate`` call did (appended to ``CBQ.history``)."""

    blocks: int
    steps: int
    first_epoch_loss: float  # mean training loss (all terms) over the first epoch
    last_epoch_loss: float
    smoothed_channels: int  # activation channels scaled by CFP in this window's new blocks
    clipped_weights: float  # fraction of this window's new weights clipped by CFP
    undecided_rounding: float  # fraction of soft offsets h not yet 0 or 1 when hard rounding was applied
    kept_start: bool = False  # keep_best dropped what training learned (it did not lower the loss)


def fake_quant_linears(blocks: list[nn.Module]) -> list[FakeQuantLinear]:
    return [m for block in blocks for m in block.modules() if isinstance(m, FakeQuantLinear)]


@torch.no_grad()
def start_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict, ranges: str = "minmax",
                gptq: bool = True) -> None:
    """Each linear's starting point: its ranges searched (``ranges``, see ``CBQConfig``) and, with ``gptq``, its
    weight moved to where GPTQ rounds it (``rounded_from``), keeping its step sizes and zero points: round-to-
    nearest then gives GPTQ's codes. Linears are taken in execution order, each group's Hessian collected with
    the groups before it already quantized (hard rounding), as GPTQ's sequential mode does."""
    fakes = fake_quant_linears([block])
    roundings = [fake.rounding for fake in fakes if isinstance(fake.rounding, LoRARounding)]
    modes = [r.hard for r in roundings]
    for rounding in roundings:
        rounding.hard = True  # soft rounding at sharpness 1 would leave the weights unquantized
    solver = GPTQ(batch_size=STATS_BATCH)
    try:
        for group in shared_input_groups(block, inputs[:1], kwargs):
            (hessian,) = collect_hessians(block, inputs, kwargs, [group[0]], STATS_BATCH)
            for fake in group:
                if ranges != "minmax":
                    scale, zero = group_ranges(fake.weight, fake.spec, ranges, hessian.diagonal(),
                                               start=(fake.scale.detach(), fake.zero))
                    fake.scale.data.copy_(scale.to(fake.scale.dtype))
                    fake.zero.copy_(zero.to(fake.zero.dtype))
                if gptq:
                    result = gptq_quantize(fake.weight, hessian, fake.spec, solver.percdamp, solver.blocksize,
                                           solver.act_order, scale_zero=(fake.scale, fake.zero))
                    fake.weight.copy_(result.rounded_from.to(fake.weight.dtype))
    finally:
        for rounding, hard in zip(roundings, modes):
            rounding.hard = hard


def _generator(seed: int, block_index: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * SEED_STRIDE + block_index) * SEED_STRIDE + stream)


class CBQ:
    def __init__(self, config: CBQConfig | None = None):
        self.config = config or CBQConfig()
        self.history: list[WindowStats] = []
        self._unnumbered: dict[int, int] = {}  # block id -> index, for blocks without a layer_idx

    @property
    def window(self) -> int:
        return self.config.window

    @property
    def overlap(self) -> int:
        return self.config.overlap

    def block_index(self, block: nn.Module) -> int:
        for module in block.modules():
            index = getattr(module, "layer_idx", None)
            if isinstance(index, int):
                return index
        return self._unnumbered.setdefault(id(block), len(self._unnumbered))

    def prepare(self, block: nn.Module) -> None:
        """Attach a rounding module to every ``FakeQuantLinear`` of a freshly wrapped block."""
        index = self.block_index(block)
        for ordinal, fake in enumerate(fake_quant_linears([block])):
            if self.config.lora_rounding:
                attach_lora_rounding(fake, self.config.lora_rank, self.config.lora_init,
                                     _generator(self.config.seed, index, ordinal))
            else:
                attach_nearest_rounding(fake)

    def calibrate(self, blocks: list[nn.Module], inputs: torch.Tensor, kwargs: dict,
                  targets: torch.Tensor) -> None:
        config = self.config
        inputs, targets = inputs.detach(), targets.detach()  # the graph only runs from the quantizers
        for block in blocks:
            if not all(isinstance(f.rounding, LoRARounding | NearestRounding) for f in fake_quant_linears([block])):
                self.prepare(block)  # called outside the runner
        smoothed, clipped = self._preprocess(blocks, inputs, kwargs)
        fakes = fake_quant_linears(blocks)
        roundings = [fake.rounding for fake in fakes if isinstance(fake.rounding, LoRARounding)]
        start_loss = self._hard_loss(blocks, inputs, kwargs, targets, roundings) if config.keep_best else None

        trainable_before = {p: p.requires_grad for block in blocks for p in block.parameters()}
        for parameter in trainable_before:
            parameter.requires_grad_(False)  # only the quantizers learn; no gradients for the rest
        gains = [attach_step_size_gain(fake) for fake in fakes]
        try:
            for rounding in roundings:
                rounding.hard = False
            factors = [p for r in roundings for p in (r.a, r.b)]
            for parameter in factors:
                parameter.requires_grad_(True)
            groups = [{"params": gains, "lr": config.lr_scale}]
            if factors:
                groups.append({"params": factors, "lr": config.lr_rounding})
            optimizer = torch.optim.Adam(groups)
            order = _generator(config.seed, self.block_index(blocks[0]), SAMPLE_ORDER_STREAM)
            first, last, steps = self._train(blocks, inputs, kwargs, targets, roundings, optimizer, order)
            kept_start = False
            if start_loss is not None and self._hard_loss(blocks, inputs, kwargs, targets, roundings) >= start_loss:
                kept_start = True
                with torch.no_grad():
                    for parameter in [*gains, *(r.b for r in roundings)]:
                        parameter.zero_()  # B = 0: no learned shift; log gain 0: the starting step sizes
        finally:
            for fake in fakes:
                bake_step_size_gain(fake)
            for parameter, flag in trainable_before.items():
                parameter.requires_grad_(flag)

        undecided = 0.0
        if roundings:
            with torch.no_grad():
                offsets = torch.cat([r.last_soft_offset().flatten() for r in roundings])
                undecided = ((offsets > 0) & (offsets < 1)).float().mean().item()
        for rounding in roundings:
            rounding.harden()
        self.history.append(WindowStats(len(blocks), steps, first, last, smoothed, clipped, undecided, kept_start))

    @torch.no_grad()
    def _hard_loss(self, blocks, inputs, kwargs, targets, roundings) -> float:
        """The window's objective (reconstruction + distribution terms) over every sample, hard rounding."""
        config = self.config
        modes = [r.hard for r in roundings]
        for rounding in roundings:
            rounding.hard = True
        total = 0.0
        try:
            for start in range(0, inputs.shape[0], STATS_BATCH):
                output = inputs[start : start + STATS_BATCH]
                for block in blocks:
                    output = run_block(block, output, kwargs, batch_size=len(output))
                target = targets[start : start + STATS_BATCH]
                loss = reconstruction_loss(output, target)
                if config.kl_weight:
                    loss = loss + config.kl_weight * distribution_loss(output, target, config.kl_temperature)
                total += loss.item() * len(output)
        finally:
            for rounding, hard in zip(roundings, modes):
                rounding.hard = hard
        return total / inputs.shape[0]

    def _preprocess(self, blocks, inputs, kwargs) -> tuple[int, float]:
        """CFP for the blocks of this window not pre-processed in an earlier one; returns its statistics."""
        config = self.config
        fresh = [not bool(fake_quant_linears([block])[0].rounding.preprocessed) for block in blocks]
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
                        fake.rounding.preprocessed.fill_(True)
                    if config.gptq_init or config.ranges != "minmax":
                        start_block(block, hidden, kwargs, config.ranges, config.gptq_init)
                        if needs_next_input:  # the next block's Hessians see this block quantized
                            hidden_next = run_block(block, hidden, kwargs, STATS_BATCH)
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
        epoch_losses = [math.nan]  # no epoch: nothing trained
        step = 0
        for _ in range(config.epochs):
            order = torch.randperm(samples, generator=generator).to(inputs.device)
            total = 0.0
            for start in range(0, samples, config.batch_size):
                index = order[start : start + config.batch_size]
                for rounding in roundings:
                    rounding.set_sharpness(sharpening.sharpness(step))
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
        trained = epoch_losses[1:] or epoch_losses
        return trained[0], trained[-1], steps
