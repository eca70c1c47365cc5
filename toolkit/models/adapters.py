"""Parameter-efficient adapters through PEFT's public API (LoRA, DoRA, and QLoRA: LoRA on a 4-bit base);
none means full fine-tuning."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.build import linear_layers


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the Linear/Conv1D layers: the names LoRA can target."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in linear_layers(model, conv1d=True)})


def adapter_settings(adapter: DictConfig | None) -> dict[str, Any] | None:
    """The PEFT keys of the recipe's adapter group, or None for full fine-tuning.

    Only a chosen adapter group (conf/adapter/lora.yaml, dora.yaml) carries `method`. A recipe's own
    `adapter:` values (rank, modules_to_save) merge on top of whichever group is chosen, so with
    `adapter=none` they arrive alone: that is still full fine-tuning, and they are ignored.
    """
    if not adapter or adapter.get("method") is None:
        return None
    settings = OmegaConf.to_container(adapter, resolve=True)
    settings.pop("method")
    settings.pop("quantization", None)  # the base's, not PEFT's: see quantization_settings
    return settings


def quantization_settings(adapter: DictConfig | None) -> dict[str, Any] | None:
    """`BitsAndBytesConfig` keys of a 4-bit base (conf/adapter/qlora.yaml); None: a full-precision base."""
    if not adapter or adapter.get("method") is None or not adapter.get("quantization"):
        return None
    return OmegaConf.to_container(adapter.quantization, resolve=True)


def apply_adapter(model: PreTrainedModel, adapter: dict[str, Any] | None, task_type: str) -> nn.Module:
    """Wrap `model` in the PEFT adapter `adapter` (LoraConfig keys); unchanged when it is None."""
    if not adapter:
        return model
    config = LoraConfig(task_type=task_type, **adapter)
    _check_targets(model, config.target_modules)
    return get_peft_model(model, config)


def _check_targets(model: nn.Module, targets: Any) -> None:
    if targets is None or isinstance(targets, str):  # None: PEFT's per-architecture default; str: a regex
        if isinstance(targets, str) and not any(re.fullmatch(targets, n) for n, _ in model.named_modules()):
            raise ToolkitError(
                f"adapter.target_modules regex '{targets}' matches no module; "
                f"linear modules: {', '.join(linear_module_names(model))}"
            )
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ToolkitError(
            f"adapter.target_modules {missing} not in the model; "
            f"linear modules: {', '.join(linear_module_names(model))}"
        )


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3-partitioned parameters count whole (ds_numel), 4-bit ones
    by the weight they stand for (two values are packed per byte)."""
    sizes = [(logical_numel(p), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)


def logical_numel(p: nn.Parameter) -> int:
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:
        return quant_state.shape.numel()
    return getattr(p, "ds_numel", p.numel())


def is_adapter(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)
