"""The block-sequential calibration runner every PTQ algorithm plugs into.

The model is walked in windows of ``window`` consecutive decoder blocks, consecutive windows overlapping by
``overlap`` blocks (RTN and GPTQ use windows of one block; CBQ uses larger, overlapping ones). For each window:

1. its blocks' linears become ``FakeQuantLinear``s (on the calibration device);
2. targets: the full-precision window's output for the full-precision input (quantization disabled);
3. the algorithm calibrates the window's quantizers from the *quantized* model's input to the window, so
   errors accumulated in earlier blocks are seen and corrected;
4. the runner advances both activation streams past the blocks that leave the window, and freezes those
   blocks into packed ``QuantLinear``s and moves them back to where the model lives.

Only the blocks of one window and two activation tensors are in calibration memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from effllm.quant.fake_quant_linear import freeze_linears, quantization_disabled, wrap_linears
from effllm.quant.weight_quant import WeightQuantSpec

from .adapters import convert_conv1d_to_linear, decoder_blocks
from .block_inputs import capture_block_inputs, run_block


class WindowAlgorithm(Protocol):
    window: int
    overlap: int

    def calibrate(self, blocks: list[nn.Module], inputs: torch.Tensor, kwargs: dict,
                  targets: torch.Tensor) -> None:
        """Tune the quantizers of ``blocks`` so that running them on ``inputs`` approaches ``targets``.

        A plug-in may also define ``prepare(block)``, called once when a block's linears have just become
        ``FakeQuantLinear``s, to attach per-layer modules (e.g. learned rounding); their parameters are then
        part of the block's state dict, which is how a checkpoint restores a window exactly."""


@dataclass
class WindowReport:
    first_block: int
    last_block: int
    loss: float  # MSE of the quantized window's output against the full-precision target


def run_window(blocks: list[nn.Module], hidden: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    for block in blocks:
        hidden = run_block(block, hidden, kwargs, batch_size)
    return hidden


def window_starts(num_blocks: int, window: int, overlap: int) -> list[int]:
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}")
    stride = window - overlap
    starts = list(range(0, max(num_blocks - window, 0) + 1, stride))
    if starts[-1] + window < num_blocks:  # the last window always reaches the last block
        starts.append(num_blocks - window)
    return starts


@dataclass
class RunnerCheckpoint:
    """Everything needed to continue a run exactly where it stopped, at the start of window ``next_block``.

    Blocks before ``next_block`` are frozen ``QuantLinear``s (saved with the model's weights); blocks from
    ``next_block`` to ``wrapped_until`` are still being calibrated: ``window_state`` holds their state dicts
    (full-precision weights, scales, rounding parameters).
    """

    next_block: int
    wrapped_until: int
    fp_hidden: torch.Tensor
    q_hidden: torch.Tensor
    window_state: dict[int, dict[str, torch.Tensor]]


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    spec: WeightQuantSpec,
    algorithm: WindowAlgorithm,
    act_bits: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    on_window_done: Callable[[RunnerCheckpoint, WindowReport], None] | None = None,
    resume_from: RunnerCheckpoint | None = None,
) -> list[WindowReport]:
    """Quantize every decoder block of ``model`` in place; returns the reconstruction loss per window.

    ``on_window_done`` receives a ``RunnerCheckpoint`` after each window; passing it back as ``resume_from``
    (with the frozen blocks restored in ``model``) continues the run with the same result as no interruption.
    """
    blocks = decoder_blocks(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    window = min(algorithm.window, len(blocks))
    all_starts = window_starts(len(blocks), window, min(algorithm.overlap, window - 1))
    start_block = resume_from.next_block if resume_from is not None else 0
    starts = [s for s in all_starts if s >= start_block]
    if start_block and (not starts or starts[0] != start_block):
        raise ValueError(f"cannot resume at block {start_block}: windows start at blocks {all_starts}")

    if resume_from is None:
        captured = capture_block_inputs(model, blocks[0], input_ids.to(home), batch_size)
        kwargs = _to_device(captured.kwargs, device)
        fp_hidden = captured.hidden.to(device)
        q_hidden = fp_hidden.clone()
        wrapped_upto = 0
    else:
        # Only the keyword inputs (masks, rotary tables) are needed: capture them from a single sequence.
        kwargs = _to_device(capture_block_inputs(model, blocks[0], input_ids[:1].to(home), 1).kwargs, device)
        fp_hidden, q_hidden = resume_from.fp_hidden.to(device), resume_from.q_hidden.to(device)
        wrapped_upto = resume_from.wrapped_until
        for index in range(start_block, wrapped_upto):
            _wrap_block(blocks[index], index, spec, act_bits, algorithm, device)
            blocks[index].load_state_dict(resume_from.window_state[index])

    reports = []
    bar = tqdm(starts, desc="quantize", unit="window", disable=not progress)
    for position, start in enumerate(bar):
        end = min(start + window, len(blocks))
        for index in range(wrapped_upto, end):
            _wrap_block(blocks[index], index, spec, act_bits, algorithm, device)
        wrapped_upto = max(wrapped_upto, end)
        window_blocks = [blocks[i] for i in range(start, end)]
        with quantization_disabled(window_blocks):
            targets = run_window(window_blocks, fp_hidden, kwargs, batch_size)
        with torch.enable_grad():
            algorithm.calibrate(window_blocks, q_hidden, kwargs, targets)
        output = run_window(window_blocks, q_hidden, kwargs, batch_size)
        report = WindowReport(start, end - 1, torch.nn.functional.mse_loss(output.float(), targets.float()).item())
        reports.append(report)
        bar.set_postfix(blocks=f"{start}-{end - 1}", loss=f"{report.loss:.3g}")

        next_start = starts[position + 1] if position + 1 < len(starts) else len(blocks)
        if next_start == end:  # no overlap: the streams past this window are the ones just computed
            fp_hidden, q_hidden = targets, output
        for index in range(start, next_start):
            if next_start != end:
                with quantization_disabled([blocks[index]]):
                    fp_hidden = run_block(blocks[index], fp_hidden, kwargs, batch_size)
                q_hidden = run_block(blocks[index], q_hidden, kwargs, batch_size)
            freeze_linears(blocks[index])
            blocks[index].to(home)
        if on_window_done is not None:
            window_state = {i: {k: v.detach().cpu().clone() for k, v in blocks[i].state_dict().items()}
                            for i in range(next_start, wrapped_upto)}
            on_window_done(RunnerCheckpoint(next_start, wrapped_upto, fp_hidden.cpu(), q_hidden.cpu(), window_state),
                           report)
    return reports


def _wrap_block(block: nn.Module, index: int, spec: WeightQuantSpec, act_bits: int | None,
                algorithm: WindowAlgorithm, device: torch.device) -> None:
    """Move a block to the calibration device and make its linears fake-quantized (plus the plug-in's
    per-layer modules, through its optional ``prepare(block)``), so its state dict has a fixed layout."""
    block.to(device)
    convert_conv1d_to_linear(block)
    if not wrap_linears(block, spec, act_bits):
        raise ValueError(f"decoder block {index} has no nn.Linear to quantize")
    prepare = getattr(algorithm, "prepare", None)
    if prepare is not None:
        prepare(block)


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value
