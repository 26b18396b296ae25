"""Evaluation that judges any model: perplexity (standard protocol), and later GLUE and fidelity metrics."""
