"""`toolkit-estimate`: per-device memory of a recipe under each strategy, before anything is launched.

    toolkit-estimate recipe=nlp/llama3_8b_lora_sft trainer.devices=8 trainer.num_nodes=2 \
        [estimate.device_memory_gb=80]

Model states are exact counts from the model built on the meta device (no weights are loaded):
parameters, gradients of the trainable ones, AdamW's two fp32 moments (plus an fp32 master copy when the
weights are not fp32), each divided by the ranks that shard it. Activations are a rough term from
Korthikanti et al. (2022), s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, without activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from transformers import AutoConfig, PretrainedConfig

from toolkit.console import console
from toolkit.models.adapters import adapter_settings, apply_adapter
from toolkit.models.build import torch_dtype

GB = 1024**3


# strategy -> what is sharded across ranks / what lives in CPU RAM instead of the device
SHARDING = {
    "single": ((), ()),
    "ddp": ((), ()),
    "deepspeed_zero1": (("optimizer",), ()),
    "deepspeed_zero2": (("optimizer", "gradients"), ()),
    "deepspeed_zero2_offload": (("optimizer", "gradients"), ("optimizer",)),
    "deepspeed_zero3": (("optimizer", "gradients", "parameters"), ()),
    "deepspeed_zero3_offload": (("optimizer", "gradients", "parameters"), ("optimizer", "parameters")),
    "fsdp2": (("optimizer", "gradients", "parameters"), ()),
    "fsdp2_offload": (("optimizer", "gradients", "parameters"), ("optimizer", "gradients", "parameters")),
}


@dataclass
class ModelStates:
    """Whole-model bytes of each kind of state (before sharding)."""

    parameters: int
    gradients: int
    optimizer: int


def model_config(cfg: DictConfig, **model_kwargs: Any) -> PretrainedConfig:
    """The HF config the recipe's model is built from (no weights are read)."""
    if cfg.model.config is not None:
        values = OmegaConf.to_container(cfg.model.config, resolve=True)
        return AutoConfig.for_model(values.pop("model_type"), **values, **model_kwargs)
    return AutoConfig.from_pretrained(cfg.model.name_or_path, **model_kwargs)


def count_states(cfg: DictConfig, task: Any, hf_config: PretrainedConfig) -> tuple[ModelStates, int, int]:
    """Build the model (and adapter) on the meta device; returns states and (total, trainable) counts."""
    dtype = torch_dtype(cfg.model.dtype)
    with torch.device("meta"):
        model = task.auto_class.from_config(hf_config, dtype=dtype)
        adapter = adapter_settings(cfg.adapter)
        model = apply_adapter(model, adapter, task.peft_task_type)
    total = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    master = 0 if dtype == torch.float32 else 4  # fp32 master weights beside 16-bit ones
    return ModelStates(weight_bytes, grad_bytes, n_trainable * (8 + master)), total, n_trainable


def activation_bytes(cfg: DictConfig, hf_config) -> int:
    """Rough activations of one micro-batch per device (16-bit; doubled for 32-bit training)."""
    s, b = cfg.data.max_length, cfg.data.batch_size
    h = getattr(hf_config, "hidden_size", 0)
    layers, heads = getattr(hf_config, "num_hidden_layers", 0), getattr(hf_config, "num_attention_heads", 1)
    per_layer = s * b * h * (34 + 5 * heads * s / max(h, 1))
    scale = 2 if str(cfg.trainer.precision).startswith("32") else 1
    return int(layers * per_layer * scale)


def per_device(states: ModelStates, strategy: str, ranks: int) -> dict[str, float]:
    sharded, offloaded = SHARDING[strategy]
    out = {}
    for kind in ("parameters", "gradients", "optimizer"):
        value = getattr(states, kind)
        out[kind] = 0.0 if kind in offloaded else value / (ranks if kind in sharded else 1)
    return out


def estimate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    task = instantiate(cfg.task)
    hf_config = model_config(cfg, **task.model_kwargs())
    states, total, trainable = count_states(cfg, task, hf_config)
    ranks = (cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1) * cfg.trainer.num_nodes
    activations = activation_bytes(cfg, hf_config)
    rows = {}
    for strategy in SHARDING:
        row = per_device(states, strategy, 1 if strategy == "single" else ranks)
        row["activations"] = activations
        row["total"] = sum(row.values())
        rows[strategy] = row
    console.print(
        f"{total:,} parameters, {trainable:,} trainable; {ranks} ranks; "
        f"micro-batch {cfg.data.batch_size} x {cfg.data.max_length} tokens"
    )
    return rows


def table(rows: dict[str, dict[str, float]], selected: str, device_gb: float | None) -> Table:
    """GiB per device; the selected strategy is starred, `fits` compares the total with device_gb."""
    out = Table(title="estimated memory per device (GiB)")
    out.add_column("strategy", no_wrap=True)
    for column in ("params", "grads", "optim", "activ.", "total") + (("fits",) if device_gb else ()):
        out.add_column(column, justify="right")
    for strategy, row in rows.items():
        values = [
            f"{row[k] / GB:.3f}" for k in ("parameters", "gradients", "optimizer", "activations", "total")
        ]
        if device_gb:
            values.append("yes" if row["total"] / GB <= device_gb else "no")
        out.add_row(f"{strategy}{' *' if strategy == selected else ''}", *values)
    return out
