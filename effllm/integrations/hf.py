"""effllm's optimizers in the Hugging Face ``Trainer``: an optimizer factory with the Trainer's own weight-decay
grouping, and callbacks that report what these optimizers do.

Factory::

    cls, kwargs = optimizer_cls_and_kwargs(model, "frugal", lr=1e-3, weight_decay=0.1, inner="adamw8bit")
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(cls, kwargs), callbacks=effllm_callbacks())
    # or: Trainer(..., optimizers=(create_optimizer(model, "adamw8bit", lr=1e-3), None))

Parameters are split the Trainer's way (``Trainer.get_decay_parameter_names``: biases and norm weights get no
weight decay); for Frugal each of those groups is further split into projected and state-full parameters
(``frugal_param_groups``). With a quantized optimizer, embeddings keep 32-bit state by default, as the Trainer
arranges for bitsandbytes' 8-bit optimizers; that is an ``effllm.optim.override`` on this model's embedding
parameters (the model instance is patched, nothing global).

Callbacks (each adds its figures to the training logs: ``trainer.state.log_history``, the console, and the
reporting integrations when ``attach_callbacks`` put them first):

* ``OptimizerStateCallback``: optimizer-state bytes and bytes per parameter at every logging step; for Frugal the
  subspace refreshes so far and the optimizer step of the latest, with a log line forced at each refresh step.
* ``NonFiniteGradientCallback``: gradient elements that are NaN/Inf when the optimizer steps, and steps that had
  any. effllm's blockwise optimizers skip such elements (parameter and state unchanged); Frugal's projections do
  not, so it warns once when a weight Frugal projects gets one.
* ``QuantizedStateWarningCallback``: after the first step, warns about parameters whose state is quantized although
  they are embeddings or tiny (quantizing those saves little and costs accuracy).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from effllm.optim import (
    Adam4bit,
    Adam8bit,
    AdamW4bit,
    AdamW8bit,
    BlockwiseOptimizer,
    Frugal,
    Lion8bit,
    RMSprop8bit,
    SGD8bit,
    override,
)
from effllm.optim.frugal import frugal_param_groups
from effllm.optim.state_memory import optimizer_state_bytes

# Optimizers by name: the spellings of recipes and of ``optimizer_cls_and_kwargs``.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adamw8bit": AdamW8bit,
    "adamw4bit": AdamW4bit,
    "adam8bit": Adam8bit,
    "adam4bit": Adam4bit,
    "lion8bit": Lion8bit,
    "sgd8bit": SGD8bit,
    "rmsprop8bit": RMSprop8bit,
    "frugal": Frugal,
}
# Options of optimizer_cls_and_kwargs / create_optimizer themselves (the rest go to the optimizer).
FACTORY_OPTIONS = ("embeddings_32bit", "state_full_patterns", "projected_patterns")
# Below this many elements a quantized state saves next to nothing (BlockwiseOptimizer's default min_8bit_size).
TINY_PARAMETER_ELEMENTS = 4096


def _unwrap(optimizer):
    """The optimizer itself: the Trainer hands callbacks accelerate's ``AcceleratedOptimizer`` around it."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


# --- the optimizer factory -----------------------------------------------------------------------------------
def resolve_optimizer(optimizer: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """An optimizer class from its name in ``OPTIMIZERS`` (or the class itself)."""
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)} or a class")
        return OPTIMIZERS[key]
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer
    raise TypeError(f"optimizer must be a name or a torch.optim.Optimizer subclass, got {optimizer!r}")


def optimizer_options(cls: type[torch.optim.Optimizer]) -> set[str]:
    """Keyword options of ``cls``'s constructor, following ``**options`` up to the base classes that take them."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names - {"self", "params"}


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters the Trainer would decay: its own rule, so the grouping is the Trainer's."""
    from transformers import Trainer

    # get_decay_parameter_names reads only the model, not the Trainer instance.
    return set(Trainer.get_decay_parameter_names(None, model))


def grouped_parameters(
    model: nn.Module,
    weight_decay: float,
    *,
    frugal: bool = False,
    state_full_patterns: Sequence[str] = (),
    projected_patterns: Sequence[str] = (),
) -> list[dict]:
    """Param groups: decayed and not (the Trainer's rule); for Frugal also projected and not (each group says
    ``projected``). Frozen parameters are left out; empty groups too."""
    decayed = decay_parameter_names(model)
    names = {id(param): name for name, param in model.named_parameters()}
    if frugal:
        base = frugal_param_groups(model, state_full_patterns, projected_patterns)
    else:
        base = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups = []
    for group in base:
        for decay in (True, False):
            params = [p for p in group["params"] if (names[id(p)] in decayed) == decay]
            if params:
                groups.append({**group, "params": params, "weight_decay": weight_decay if decay else 0.0})
    return groups


def keep_embeddings_32bit(model: nn.Module) -> list[str]:
    """Give the input embeddings of this model 32-bit optimizer state (an override on their parameters, which any
    effllm optimizer built afterwards honours); returns the names of the modules changed."""
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            override(module, state_bits=32)
            changed.append(name)
    return changed


def optimizer_cls_and_kwargs(
    model: nn.Module,
    optimizer: str | type[torch.optim.Optimizer] = "adamw8bit",
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    args=None,
    embeddings_32bit: bool = True,
    state_full_patterns: Sequence[str] = (),
    projected_patterns: Sequence[str] = (),
    **options,
) -> tuple[type[torch.optim.Optimizer], dict]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; ``kwargs["params"]`` holds the groups.

    ``lr`` and ``weight_decay`` default to ``args.learning_rate`` / ``args.weight_decay`` when ``args`` (the
    ``TrainingArguments``) is given, and Adam-type optimizers then also take its betas and epsilon, as the
    Trainer's own AdamW does. Other ``options`` go to the optimizer (for Frugal: ``density``, ``inner``, ...).
    The Trainer pops ``params`` out of the dict: build one pair per Trainer.
    """
    cls = resolve_optimizer(optimizer)
    accepted = optimizer_options(cls)
    if args is not None:
        lr = args.learning_rate if lr is None else lr
        weight_decay = args.weight_decay if weight_decay is None else weight_decay
        if "betas" in accepted:
            options.setdefault("betas", (args.adam_beta1, args.adam_beta2))
        if "eps" in accepted:
            options.setdefault("eps", args.adam_epsilon)
    if lr is None:
        raise ValueError("give lr (or args, the TrainingArguments, to take args.learning_rate)")
    is_frugal = issubclass(cls, Frugal)
    if (state_full_patterns or projected_patterns) and not is_frugal:
        raise ValueError("state_full_patterns / projected_patterns are Frugal options")
    if embeddings_32bit and issubclass(cls, (BlockwiseOptimizer, Frugal)):
        keep_embeddings_32bit(model)
    groups = grouped_parameters(model, weight_decay or 0.0, frugal=is_frugal,
                                state_full_patterns=state_full_patterns, projected_patterns=projected_patterns)
    return cls, {"params": groups, "lr": lr, **options}


def create_optimizer(model: nn.Module, optimizer: str | type[torch.optim.Optimizer] = "adamw8bit",
                     **kwargs) -> torch.optim.Optimizer:
    """The optimizer itself, for ``Trainer(optimizers=(optimizer, None))`` or a loop of your own; same arguments
    as ``optimizer_cls_and_kwargs``."""
    cls, options = optimizer_cls_and_kwargs(model, optimizer, **kwargs)
    return cls(options.pop("params"), **options)


# --- what the callbacks measure ------------------------------------------------------------------------------
def optimized_parameter_count(optimizer: torch.optim.Optimizer) -> int:
    optimizer = _unwrap(optimizer)
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def frugal_refreshes(optimizer: Frugal) -> tuple[int, int]:
    """(subspace refreshes so far, optimizer step of the latest), read from Frugal's per-weight step counters:
    a projected weight's subspace is renewed at steps 1, T + 1, 2T + 1, ... of its counter (T = update_gap)."""
    count = last = 0
    for group in optimizer.param_groups:
        gap = int(group["update_gap"])
        for param in group["params"]:
            step_counter = optimizer.state.get(param, {}).get("step")
            if step_counter is None:  # a state-full parameter, or a weight that has not stepped yet
                continue
            steps = int(step_counter)
            if steps > 0:
                count = max(count, (steps - 1) // gap + 1)
                last = max(last, (steps - 1) // gap * gap + 1)
    return count, last


def quantized_state_findings(model: nn.Module, optimizer: torch.optim.Optimizer,
                             min_elements: int = TINY_PARAMETER_ELEMENTS) -> list[tuple[str, int, str]]:
    """(parameter name, state bits, why it is a poor candidate) for each parameter whose optimizer state is
    quantized although it is an input embedding or has fewer than ``min_elements`` elements."""
    optimizer = _unwrap(optimizer)
    embeddings = {id(p) for module in model.modules() if isinstance(module, nn.Embedding | nn.EmbeddingBag)
                  for p in module.parameters(recurse=False)}
    findings = []
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        if isinstance(optimizer, Frugal):
            state = state.get("inner", {})  # the inner optimizer's state of this parameter
        bits = state.get("state_bits", 32)
        if bits >= 32:
            continue
        if id(param) in embeddings:
            findings.append((name, bits, "an input embedding (rare tokens make its statistics uneven)"))
        elif param.numel() < min_elements:
            findings.append((name, bits, f"tiny ({param.numel()} elements < {min_elements})"))
    return findings


def _frugal_projected(optimizer: Frugal) -> set[int]:
    """ids of the weights Frugal projects: those of 2 or more dimensions in groups with ``projected`` set."""
    return {id(param) for group in optimizer.param_groups if group.get("projected", True)
            for param in group["params"] if param.ndim >= 2}


# --- callbacks -----------------------------------------------------------------------------------------------
class _LogFigures(TrainerCallback):
    """Adds ``figures()`` to every training log (those with a ``loss``), in the dict the reporters receive and in
    the entry the Trainer already appended to ``state.log_history``."""

    def figures(self, optimizer) -> dict:
        raise NotImplementedError

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or "loss" not in logs or optimizer is None:
            return
        figures = self.figures(optimizer)
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)


class OptimizerStateCallback(_LogFigures):
    """Logs ``optimizer_state_bytes`` and ``optimizer_state_bytes_per_param``; with Frugal also
    ``frugal_refreshes`` and ``frugal_last_refresh_step``, and (``log_on_refresh``) a log line at each refresh."""

    def __init__(self, log_on_refresh: bool = True):
        self.log_on_refresh = log_on_refresh

    def figures(self, optimizer) -> dict:
        optimizer = _unwrap(optimizer)
        total = optimizer_state_bytes(optimizer)
        figures = {"optimizer_state_bytes": total,
                   "optimizer_state_bytes_per_param": round(total / max(1, optimized_parameter_count(optimizer)), 4)}
        if isinstance(optimizer, Frugal):
            figures["frugal_refreshes"], figures["frugal_last_refresh_step"] = frugal_refreshes(optimizer)
        return figures

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        optimizer = _unwrap(optimizer)
        if self.log_on_refresh and isinstance(optimizer, Frugal):
            count, last = frugal_refreshes(optimizer)
            if count and last == _frugal_step(optimizer):
                control.should_log = True


def _frugal_step(optimizer: Frugal) -> int:
    """Frugal's step counter (the largest over its projected weights)."""
    counters = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    return max(counters, default=0)


class NonFiniteGradientCallback(_LogFigures):
    """Logs ``nonfinite_grad_elements`` (NaN/Inf gradient elements when the optimizer stepped) and
    ``nonfinite_grad_steps`` (steps with any), summed since the previous log. Counted after the Trainer's
    gradient clipping, so what is counted is what the optimizer receives: one NaN makes the clipping norm NaN,
    which turns every gradient into NaN (set ``max_grad_norm=0`` to keep a NaN where it arose)."""

    def __init__(self):
        self._elements: torch.Tensor | None = None  # kept on the gradients' device: no synchronisation per step
        self._steps: torch.Tensor | None = None
        self._warned_frugal = False

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        counts = torch.stack([(~torch.isfinite(g)).sum() for g in grads])
        elements = counts.sum()
        self._elements = elements if self._elements is None else self._elements + elements
        self._steps = (elements > 0).long() if self._steps is None else self._steps + (elements > 0).long()
        optimizer = _unwrap(optimizer)
        if isinstance(optimizer, Frugal) and not self._warned_frugal:
            projected = _frugal_projected(optimizer)
            hit = [p for p, c in zip((p for p in model.parameters() if p.grad is not None), counts)
                   if id(p) in projected and c > 0]
            if hit:
                self._warned_frugal = True
                warnings.warn(f"{len(hit)} weight(s) projected by Frugal have NaN/Inf gradient elements at step "
                              f"{state.global_step + 1}. Frugal does not skip them element by element as the "
                              "blockwise optimizers do: an SVD or random projection mixes each into a whole row "
                              "of coordinates, an SVD refresh on such a gradient fails, and with state_free='sgd' "
                              "the weight itself can become non-finite", RuntimeWarning, stacklevel=2)

    def figures(self, optimizer) -> dict:
        elements = int(self._elements) if self._elements is not None else 0
        steps = int(self._steps) if self._steps is not None else 0
        self._elements = self._steps = None
        return {"nonfinite_grad_elements": elements, "nonfinite_grad_steps": steps}


class QuantizedStateWarningCallback(TrainerCallback):
    """After the first optimizer step (states exist then), warns once about parameters whose state is quantized
    although they are input embeddings or tiny; ``findings`` keeps them. Keep such parameters at 32 bits with
    ``effllm.optim.override(module, state_bits=32)`` (or ``optimizer_cls_and_kwargs``' ``embeddings_32bit``)."""

    def __init__(self, min_elements: int = TINY_PARAMETER_ELEMENTS):
        self.min_elements = min_elements
        self.findings: list[tuple[str, int, str]] | None = None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.findings is not None or optimizer is None:
            return
        self.findings = quantized_state_findings(model, optimizer, self.min_elements)
        if self.findings:
            listed = "; ".join(f"{name}: {bits}-bit, {why}" for name, bits, why in self.findings[:5])
            more = f" (and {len(self.findings) - 5} more)" if len(self.findings) > 5 else ""
            warnings.warn(f"quantized optimizer state on {len(self.findings)} parameter(s) that should keep 32 bits: "
                          f"{listed}{more}", UserWarning, stacklevel=2)


def effllm_callbacks() -> list[TrainerCallback]:
    """One of each callback, for ``Trainer(callbacks=...)`` or ``attach_callbacks``."""
    return [OptimizerStateCallback(), NonFiniteGradientCallback(), QuantizedStateWarningCallback()]


def attach_callbacks(trainer, callbacks: Sequence[TrainerCallback] | None = None) -> list[TrainerCallback]:
    """Add ``callbacks`` (default ``effllm_callbacks()``) to this trainer *before* its reporting integrations
    (TensorBoard, W&B, ...), so that these receive the figures too; callbacks given to ``Trainer(callbacks=...)``
    run after them, and their figures reach only ``log_history`` and the console."""
    callbacks = list(callbacks) if callbacks is not None else effllm_callbacks()
    handler = trainer.callback_handler.callbacks
    flow = next((i for i, cb in enumerate(handler) if type(cb).__name__ == "DefaultFlowCallback"), -1)
    handler[flow + 1:flow + 1] = callbacks
    return callbacks


__all__ = [
    "FACTORY_OPTIONS",
    "OPTIMIZERS",
    "NonFiniteGradientCallback",
    "OptimizerStateCallback",
    "QuantizedStateWarningCallback",
    "attach_callbacks",
    "create_optimizer",
    "decay_parameter_names",
    "effllm_callbacks",
    "frugal_refreshes",
    "grouped_parameters",
    "keep_embeddings_32bit",
    "optimizer_cls_and_kwargs",
    "optimizer_options",
    "optimizer_state_bytes",
    "quantized_state_findings",
    "resolve_optimizer",
]

