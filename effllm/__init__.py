"""effllm: efficient-LLM toolkit on one blockwise-quantization core.

Importing effllm stays lean: no CUDA initialisation and no Triton import happen here. Submodules:
``effllm.quant`` (blockwise core), ``effllm.optim`` (8-bit optimizers), ``effllm.kernels`` (hot paths).
"""

__version__ = "0.1.0"
