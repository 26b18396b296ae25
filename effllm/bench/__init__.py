"""Benchmarks behind ``effllm bench``: one shared harness (``harness``) and one module per benchmark."""
