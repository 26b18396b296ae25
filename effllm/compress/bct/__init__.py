"""BCT: blockwise compression of every component of a transformer, without retraining (docs/bct.md).

``compress(model, BCTConfig(...))`` patches a Hugging Face encoder or Llama-family decoder in place;
``save_compressed`` writes a folder that ``effllm.load`` reads back; ``compression_report`` counts the bytes
really held.
"""

from .compress import SUPPORTED_MODEL_TYPES, compress, save_compressed
from .config import ActivationSpec, BCTConfig, StoredSpec, TableSpec
from .report import compression_report, format_report

__all__ = ["SUPPORTED_MODEL_TYPES", "ActivationSpec", "BCTConfig", "StoredSpec", "TableSpec", "compress",
           "compression_report", "format_report", "save_compressed"]
