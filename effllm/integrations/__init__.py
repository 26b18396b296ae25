"""Integrations with other libraries: the Hugging Face ``Trainer`` (``effllm.integrations.hf``)."""

from .hf import (
    NonFiniteGradientCallback,
    OptimizerStateCallback,
    QuantizedStateWarningCallback,
    attach_callbacks,
    create_optimizer,
    effllm_callbacks,
    optimizer_cls_and_kwargs,
)

__all__ = [
    "NonFiniteGradientCallback",
    "OptimizerStateCallback",
    "QuantizedStateWarningCallback",
    "attach_callbacks",
    "create_optimizer",
    "effllm_callbacks",
    "optimizer_cls_and_kwargs",
]
