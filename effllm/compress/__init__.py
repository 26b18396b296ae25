"""Compression of whole models: ``effllm.compress.bct`` (blockwise compression of transformers, no retraining)."""
