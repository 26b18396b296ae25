"""Load any model reference as the architecture its checkpoint names (``config.json``'s ``architectures``): the
transformers class of that name when transformers has one (``GPT2LMHeadModel``, ``BertForSequenceClassification``),
else the auto class its suffix suggests (``...ForSequenceClassification``, ``...ForCausalLM``, ``...ForMaskedLM``,
anything else ``AutoModel``).

``effllm.model_loading.load_causal_lm`` is the causal-LM-only counterpart the PTQ commands use; this one serves
``effllm compress`` and GLUE evaluation, whose models are mostly encoders.
"""

from __future__ import annotations

from pathlib import Path

from effllm.model_loading import ModelRef

# files a saved tokenizer leaves in its folder (transformers builds a vocabulary-less one from config.json alone)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def auto_class_name(architectures: list[str] | None) -> str:
    """The transformers auto class for a checkpoint's ``architectures`` list."""
    from effllm.quant.serialization import _AUTO_CLASSES  # the table effllm.load uses: one mapping, not two

    for suffix, name in _AUTO_CLASSES:
        if any(arch.endswith(suffix) for arch in architectures or []):
            return name
    return "AutoModel"


def load_pretrained(ref: ModelRef, trust_remote_code: bool = False):
    """The model (eval mode) for ``ref``: an effllm folder through ``effllm.load``, a GGUF file as a causal LM,
    anything else through the auto class its config names."""
    import transformers

    import effllm

    kwargs = dict(trust_remote_code=trust_remote_code)
    if ref.is_effllm_quantized:
        return effllm.load(ref.path, **kwargs).eval()
    if ref.gguf_file:
        return transformers.AutoModelForCausalLM.from_pretrained(ref.path, gguf_file=ref.gguf_file, **kwargs).eval()
    config = transformers.AutoConfig.from_pretrained(ref.path, **kwargs)
    architectures = getattr(config, "architectures", None) or []
    named = getattr(transformers, architectures[0], None) if architectures else None
    if not (isinstance(named, type) and issubclass(named, transformers.PreTrainedModel)):
        named = getattr(transformers, auto_class_name(architectures))
    return named.from_pretrained(ref.path, config=config, **kwargs).eval()


def load_tokenizer_if_any(ref: ModelRef, trust_remote_code: bool = False):
    """The tokenizer saved with ``ref``, or None when it has none (a model built from a config alone)."""
    from transformers import AutoTokenizer

    kwargs = dict(trust_remote_code=trust_remote_code)
    if ref.gguf_file:
        kwargs["gguf_file"] = ref.gguf_file
    elif Path(ref.path).is_dir() and not any((Path(ref.path) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(ref.path, **kwargs)
    except (OSError, ValueError, TypeError, KeyError):
        return None
