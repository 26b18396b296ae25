"""effllm: efficient-LLM toolkit on one blockwise-quantization core.

Importing effllm stays lean: no CUDA initialisation, no Triton and no transformers import happen here.
Submodules: ``effllm.quant`` (blockwise core, quantized layers, saving/loading), ``effllm.optim`` (8-bit
optimizers), ``effllm.ptq`` (post-training quantization), ``effllm.eval``, ``effllm.kernels`` (hot paths).
"""

from effllm.quant.hf_registration import install as _install_hf_registration

__version__ = "0.1.0"

# transformers learns to load effllm folders as soon as its quantizer registry is imported.
_install_hf_registration()


def load(path, **from_pretrained_kwargs):
    """Load a quantized (or any) Hugging Face folder; see ``effllm.quant.serialization.load``."""
    from effllm.quant.serialization import load as _load

    return _load(path, **from_pretrained_kwargs)
