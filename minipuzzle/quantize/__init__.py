"""Quantization with NVIDIA Model Optimizer: FP8 / NVFP4 post-training quantization of Nemotron-H hybrids
(configs.py: what stays in bf16; calibrate.py: `mtq.quantize` over token windows), the serving checkpoint
(export.py) and its fake-quantized reload for evaluation (load.py)."""
