"""QLoRA's base model: pretrained weights quantized to 4-bit NormalFloat as they load (bitsandbytes, through
transformers' `BitsAndBytesConfig`), prepared for k-bit training by PEFT; LoRA then trains on top of it.

Export never merges into the 4-bit weights: it rebuilds the base in full precision and merges there, which
is the model users deploy (a merge into NF4 would re-quantize and round the adapter's update away).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig


def compute_dtype(precision: Any) -> torch.dtype:
    """The dtype 4-bit layers dequantize into and multiply in: the trainer's precision."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def four_bit_config(
    settings: dict[str, Any], precision: Any, trained_whole: list[str] | None = None
) -> BitsAndBytesConfig:
    """`BitsAndBytesConfig(**settings)`. A null compute dtype takes the trainer's precision, a null quant
    storage bitsandbytes' default (uint8); `trained_whole` (the adapter's modules_to_save) joins the modules
    left unquantized: a layer that trains must keep full-precision weights."""
    settings = {k: v for k, v in settings.items() if v is not None}
    settings.setdefault("bnb_4bit_compute_dtype", compute_dtype(precision))
    settings["llm_int8_skip_modules"] = unquantized_modules(settings, trained_whole)
    return BitsAndBytesConfig(**settings)


def unquantized_modules(settings: dict[str, Any], trained_whole: list[str] | None) -> list[str]:
    """Name patterns of the linear layers that stay in full precision (transformers' matching: a prefix, a
    regex or a suffix of the module name)."""
    return [*(settings.get("llm_int8_skip_modules") or []), *(trained_whole or [])]


def four_bit_linears(model: nn.Module, patterns: list[str]) -> list[nn.Module]:
    """The linear layers transformers' bitsandbytes integration converts to 4-bit under `patterns`."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    kinds = (nn.Linear, Conv1D)
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, kinds) and should_convert_module(name, patterns)
    ]


def prepare_four_bit(model: nn.Module) -> nn.Module:
    """PEFT's k-bit preparation (everything frozen, the layers bitsandbytes left unquantized in fp32), with
    activation checkpointing left to `model.activation_checkpointing` (PEFT would enable it through a name
    transformers deprecates).

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time it runs in eval mode
    without grad (a validation pass), into a layout whose kernel has no backward: every later training step
    would silently lose the gradients flowing through the base. Turning that fast path off keeps them.
    """
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def four_bit_params(model: nn.Module) -> list[nn.Parameter]:
    """The packed 4-bit weights (`Params4bit`): frozen, and never sharded (their quantization state is not
    part of the tensor, so a shard could not be dequantized)."""
    if "bitsandbytes" not in sys.modules:
        return []  # nothing can be 4-bit before bitsandbytes is imported; its import is not free
    import bitsandbytes as bnb

    return [p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)]
