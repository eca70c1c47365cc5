"""Compression of an exported model: pruning, distillation, post-training quantization."""
