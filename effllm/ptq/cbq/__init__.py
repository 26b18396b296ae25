"""CBQ (Cross-Block Quantization, Ding et al.): windows of overlapping blocks reconstructed jointly, coarse-to-fine
pre-processing of outliers, LoRA-Rounding with learnable step sizes. A plug-in of ``effllm.ptq.runner``::

    from effllm.ptq.cbq import CBQ, CBQConfig
    quantize_blocks(model, input_ids, WeightQuantSpec(4, 64), CBQ(CBQConfig()))
"""

from .calibrate import CBQ, WindowStats
from .config import CBQConfig

__all__ = ["CBQ", "CBQConfig", "WindowStats"]
