"""Save quantized models as Hugging Face folders and load them back (``effllm.load``).

A folder is what ``save_pretrained`` writes (``config.json``, safetensors weights, tokenizer files), with a
``quantization_config`` whose ``quant_method`` is ``effllm``. Writing goes to a temporary sibling folder that is
renamed into place at the end, so an interrupted save never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from .hf_registration import QUANT_METHOD, install

# architectures suffix -> transformers auto class that loads it
_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yields a temporary folder next to ``out_dir``; on success it becomes ``out_dir``, on error it vanishes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {out_dir} already exists; choose another --out or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, quantization_config: dict, tokenizer=None,
                   extra_json: dict[str, dict] | None = None, overwrite: bool = False) -> Path:
    """``save_pretrained`` into ``out_dir`` with ``quantization_config`` in config.json, atomically."""
    config = dict(quantization_config, quant_method=QUANT_METHOD)
    model.config.quantization_config = config
    with atomic_output_dir(out_dir, overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, payload in (extra_json or {}).items():
            (staging / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def load(path: str | os.PathLike, **from_pretrained_kwargs):
    """Load a folder written by effllm (or any Hugging Face folder) with the right transformers auto class."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
    install()
    import transformers

    architectures = json.loads(config_file.read_text()).get("architectures") or []
    auto_name = "AutoModel"
    for suffix, name in _AUTO_CLASSES:
        if any(arch.endswith(suffix) for arch in architectures):
            auto_name = name
            break
    from_pretrained_kwargs.setdefault("trust_remote_code", False)
    return getattr(transformers, auto_name).from_pretrained(path, **from_pretrained_kwargs)
