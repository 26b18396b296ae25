"""``quantize``: the one entry point of post-training quantization, with checkpoints and resume.

A run writes a checkpoint folder after every window (frozen blocks, the two activation streams, the state of
blocks still being calibrated, the calibration data); ``resume=True`` continues from it with the same result
as an uninterrupted run. The output folder appears only when the run is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from effllm.quant.hf_quantizer import EffllmQuantizationConfig, replace_with_quant_linears
from effllm.quant.quant_linear import QuantLinear

from .adapters import decoder_blocks, quantizable_linears
from .config import PTQConfig, make_algorithm
from .runner import RunnerCheckpoint, WindowReport, quantize_blocks

PROGRESS_FILE = "progress.json"
STREAMS_FILE = "streams.safetensors"


def check_quantizable(model: nn.Module, config: PTQConfig) -> None:
    """Fail before any work if a linear of a decoder block cannot take the config (e.g. group size)."""
    for index, block in enumerate(decoder_blocks(model)):
        for name, linear in quantizable_linears(block).items():
            try:
                config.spec.groups(linear.in_features)
            except ValueError as error:
                raise ValueError(f"block {index} {name}: {error}") from None


def quantized_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]


def quantization_config(model: nn.Module, config: PTQConfig, reports: list[WindowReport]) -> dict:
    return dict(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric,
                act_bits=config.act_bits, modules=quantized_module_names(model), method=config.method,
                recipe=config.to_dict(), window_losses=[asdict(r) for r in reports])


def quantize(model: nn.Module, config: PTQConfig, calib_ids: torch.Tensor,
             checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
             progress: bool = True) -> list[WindowReport]:
    """Quantize ``model``'s decoder blocks in place with ``config``; returns the reconstruction loss per window."""
    check_quantizable(model, config)
    algorithm = make_algorithm(config)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else None
    resume_from, done_reports = None, []
    if resume:
        if checkpoint is None or not (checkpoint / PROGRESS_FILE).is_file():
            raise FileNotFoundError(f"nothing to resume: no checkpoint at {checkpoint}")
        resume_from, done_reports, calib_ids = _load_checkpoint(model, config, checkpoint)
    elif checkpoint is not None and checkpoint.exists():
        shutil.rmtree(checkpoint)

    reports = list(done_reports)

    def save_progress(state: RunnerCheckpoint, report: WindowReport) -> None:
        reports.append(report)
        if checkpoint is not None:
            _save_checkpoint(model, config, checkpoint, state, reports, calib_ids)

    torch.manual_seed(config.seed)
    quantize_blocks(model, calib_ids, config.spec, algorithm, config.act_bits, config.device, config.batch_size,
                    progress, save_progress, resume_from)
    return reports


def _save_checkpoint(model, config, checkpoint: Path, state: RunnerCheckpoint, reports, calib_ids) -> None:
    checkpoint.mkdir(parents=True, exist_ok=True)
    blocks = decoder_blocks(model)
    for index in range(state.next_block):
        block_file = checkpoint / f"block_{index:04d}.safetensors"
        if not block_file.exists():
            _atomic_save({k: v.contiguous() for k, v in blocks[index].state_dict().items()}, block_file)
    streams = {"fp_hidden": state.fp_hidden, "q_hidden": state.q_hidden, "calib_ids": calib_ids}
    for index, block_state in state.window_state.items():
        streams.update({f"window.{index}.{k}": v.contiguous() for k, v in block_state.items()})
    _atomic_save(streams, checkpoint / STREAMS_FILE)
    frozen = {str(i): sorted(n for n, m in blocks[i].named_modules() if isinstance(m, QuantLinear))
              for i in range(state.next_block)}
    progress = dict(config=config.to_dict(), next_block=state.next_block, wrapped_until=state.wrapped_until,
                    frozen_modules=frozen, reports=[asdict(r) for r in reports])
    tmp = checkpoint / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(progress, indent=2))
    os.replace(tmp, checkpoint / PROGRESS_FILE)


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _load_checkpoint(model, config: PTQConfig, checkpoint: Path):
    progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
    if progress["config"] != config.to_dict():
        raise ValueError(f"the checkpoint at {checkpoint} was written with another config; rerun without --resume")
    blocks = decoder_blocks(model)
    block_config = EffllmQuantizationConfig(config.bits, config.group_size, config.symmetric, config.act_bits)
    for index in range(progress["next_block"]):
        block_config.modules = progress["frozen_modules"][str(index)]
        replace_with_quant_linears(blocks[index], block_config)
        blocks[index].load_state_dict(load_file(str(checkpoint / f"block_{index:04d}.safetensors")))
    streams = load_file(str(checkpoint / STREAMS_FILE))
    window_state: dict[int, dict] = {}
    for key, value in streams.items():
        if key.startswith("window."):
            _, index, name = key.split(".", 2)
            window_state.setdefault(int(index), {})[name] = value
    state = RunnerCheckpoint(progress["next_block"], progress["wrapped_until"], streams["fp_hidden"],
                             streams["q_hidden"], window_state)
    return state, [WindowReport(**r) for r in progress["reports"]], streams["calib_ids"]
