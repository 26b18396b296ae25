"""Post-training quantization: a block-sequential calibration runner with RTN (and later GPTQ, CBQ) plug-ins."""
