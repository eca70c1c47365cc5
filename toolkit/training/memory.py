"""`toolkit-estimate`: per-device memory of a recipe under each strategy, before anything is launched.

    toolkit-estimate recipe=nlp/llama3_8b_lora_sft trainer.devices=8 trainer.num_nodes=2 \
        [estimate.device_memory_gb=80]

Model states are exact counts from the model built on the meta device (no weights are loaded), each
divided by the ranks that shard it:
- parameters: in the model's dtype; QLoRA's 4-bit linear weights at NF4's 0.5 bytes plus their block scales
  (0.516 bytes with double quantization), the layers it leaves unquantized in fp32 (PEFT's preparation);
  FSDP2 keeps the 4-bit weights whole on every rank;
- gradients: of the trainable parameters, in their dtype (PEFT keeps LoRA weights in fp32);
- optimizer: two fp32 moments per trainable parameter (8 bytes), bitsandbytes' 8-bit ones in 2 bytes plus
  one fp32 scale per 256 (tensors of min_8bit_size elements or more), SGD's momentum 4; plus an fp32 master
  copy of trainable weights that are not fp32.
Activations are a rough term from Korthikanti et al. (2022), s*b*h*(34 + 5*a*s/h) bytes per layer in
16-bit (s: tokens, or a ViT's patches + [CLS]); with activation checkpointing each layer keeps only its
input (2*s*b*h) and one layer's full activations live during its recompute. Causal LMs add their logits
(s*b*vocab in the compute dtype plus the fp32 copy the loss takes). The seed MLP keeps each layer's input
and ReLU output instead.

Nothing is downloaded when the recipe can say what the model is: its config comes from model.config, else a
local directory's config.json, else model.architecture (the published config of a hub model, in its
conf/model YAML), and only then from the hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from transformers import AutoConfig, PretrainedConfig

from toolkit.console import console
from toolkit.errors import ToolkitError
from toolkit.models.adapters import adapter_settings, apply_adapter, quantization_settings
from toolkit.models.build import check_source as check_source
from toolkit.models.build import torch_dtype
from toolkit.models.qlora import four_bit_linears, unquantized_modules
from toolkit.tasks.base import Task
from toolkit.training.strategies import strategy_kind

GB = 1024**3


# strategy -> what is sharded across ranks / what lives in CPU RAM instead of the device
SHARDING = {
    "single": ((), ()),
    "ddp": ((), ()),
    "ddp_local_sgd": ((), ()),  # as DDP (an outer step adds 2 copies of the trainable weights)
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
    """Whole-model bytes of each kind of state (before sharding); `unsharded`: the part of `parameters` no
    strategy shards (QLoRA's 4-bit weights)."""

    parameters: float
    gradients: float
    optimizer: float
    unsharded: float = 0.0


def model_config(cfg: DictConfig, **model_kwargs: Any) -> PretrainedConfig:
    """The HF config the recipe's model is built from (no weights are read; the hub only as a last resort)."""
    model_kwargs.pop("ignore_mismatched_sizes", None)  # a loading option, not a config value
    m = cfg.model
    if m.config is not None:
        return _for_model(OmegaConf.to_container(m.config, resolve=True), model_kwargs)
    source = m.name_or_path
    check_source(source)  # training's one-line errors: an empty value, a directory without config.json
    if Path(source).is_dir():
        return AutoConfig.from_pretrained(source, **model_kwargs)
    architecture = _architecture_of(m, source)
    if architecture is not None:
        return _for_model(architecture, model_kwargs)
    return _from_hub(source, model_kwargs)


def _for_model(values: dict, model_kwargs: dict) -> PretrainedConfig:
    values = dict(values)
    if "model_type" not in values:
        raise ToolkitError("model.config needs a model_type (e.g. llama, bert, gpt2, vit)")
    return AutoConfig.for_model(values.pop("model_type"), **values, **model_kwargs)


def _architecture_of(m: DictConfig, source: str) -> dict | None:
    """model.architecture, if it describes `source`: one that names another hub id (a YAML's numbers after
    `model.name_or_path=<other model>`) would silently estimate the wrong model, so it is not used."""
    architecture = m.get("architecture")
    if architecture is None:
        return None
    values = OmegaConf.to_container(architecture, resolve=True)
    return values if values.get("name_or_path", source) == source else None


def _from_hub(source: str, model_kwargs: dict) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source, **model_kwargs)
    except OSError as err:  # offline, unknown id, gated without a login: the hub's own text is many lines
        raise ToolkitError(
            f"cannot read the config of model '{source}': it is not a local directory, no model.architecture "
            "describes it, and the hub could not give it; set model.architecture to its HF config "
            "(model_type, hidden_size, num_hidden_layers, ...) or point model.name_or_path at a local "
            "directory holding its config.json"
        ) from err


def count_states(cfg: DictConfig, task: Task, hf_config: PretrainedConfig) -> tuple[ModelStates, int, int]:
    """Build the model (and adapter) on the meta device; returns states and (total, trainable) counts."""
    dtype = torch_dtype(cfg.model.dtype)
    quantization = quantization_settings(cfg.adapter)
    with torch.device("meta"):
        model = task.auto_class.from_config(hf_config, dtype=dtype)
        adapter = adapter_settings(cfg.adapter)
        unquantized = unquantized_modules(quantization or {}, (adapter or {}).get("modules_to_save"))
        four_bit = {id(m.weight) for m in four_bit_linears(model, unquantized)} if quantization else set()
        model = apply_adapter(model, adapter, task.peft_task_type)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    # after PEFT's k-bit preparation everything but the 4-bit weights is fp32
    other = (lambda p: 4) if quantization else (lambda p: p.element_size())
    four_bit_bytes = sum(p.numel() for p in params if id(p) in four_bit) * nf4_bytes_per_weight(quantization)
    weights = four_bit_bytes + sum(p.numel() * other(p) for p in params if id(p) not in four_bit)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    master = sum(4 * p.numel() for p in trainable if p.dtype != torch.float32)  # fp32 beside 16-bit weights
    optimizer = sum(optimizer_state_bytes(cfg.optim, p.numel()) for p in trainable) + master
    total, n_trainable = sum(p.numel() for p in params), sum(p.numel() for p in trainable)
    return ModelStates(weights, grads, optimizer, four_bit_bytes), total, n_trainable


def held_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> ModelStates:
    """The bytes a training process really holds, to check `count_states` against: every parameter (a 4-bit
    weight with its quantization state), every gradient, every optimizer state tensor (each storage once:
    bitsandbytes shares its quantization maps between tensors)."""
    seen: set[int] = set()

    def size(tensors: Any) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    params = list(model.parameters())
    quant_states = [p.quant_state for p in params if getattr(p, "quant_state", None) is not None]
    scales = [t for q in quant_states for t in (q.absmax, q.code, q.offset, *_nested(q))]
    return ModelStates(
        parameters=size(p.data for p in params) + size(scales),
        gradients=size(p.grad for p in params),
        optimizer=size(t for state in optimizer.state.values() for t in state.values()),
    )


def _nested(quant_state: Any) -> tuple:
    nested = getattr(quant_state, "state2", None)
    return (nested.absmax, nested.code) if nested is not None else ()


def nf4_bytes_per_weight(quantization: dict | None) -> float:
    """A 4-bit weight with one absmax per block of 64: fp32 absmax, or (double quantization) an 8-bit one
    with an fp32 scale per 256 absmax."""
    if not quantization:
        return 0.0
    return 0.5 + (1 / 64 + 4 / (64 * 256) if quantization.get("bnb_4bit_use_double_quant") else 4 / 64)


def optimizer_state_bytes(optim: DictConfig, numel: int) -> float:
    """The optimizer's state for one trainable tensor of `numel` elements."""
    name = optim._target_.rsplit(".", 1)[-1]
    if name.endswith("8bit"):  # bitsandbytes: two uint8 moments and an fp32 absmax each per 256 values
        return numel * (2 + 8 / 256) if numel >= optim.get("min_8bit_size", 4096) else numel * 8
    if name == "SGD":
        return numel * 4 if optim.get("momentum") else 0
    return numel * 8  # Adam's two fp32 moments


def positions(cfg: DictConfig, hf_config: PretrainedConfig) -> int:
    """Positions each layer sees per example: the data's tokens (or items), else a ViT's patches + [CLS]."""
    if "max_length" in cfg.data:
        return cfg.data.max_length
    patch = getattr(hf_config, "patch_size", None)
    return (hf_config.image_size // patch) ** 2 + 1 if patch else 1


def activation_bytes(cfg: DictConfig, hf_config: PretrainedConfig, causal_lm: bool = False) -> int:
    """Rough activations of one micro-batch per device (16-bit; doubled for 32-bit training)."""
    s, b = positions(cfg, hf_config), cfg.data.batch_size
    scale = 2 if str(cfg.trainer.precision).startswith("32") else 1
    if hf_config.model_type == "toolkit_mlp":
        # no attention: each Linear keeps its input and each ReLU its output for the backward pass
        widths = [hf_config.image_size**2 * hf_config.num_channels, *hf_config.hidden_sizes]
        return b * (sum(widths) + sum(hf_config.hidden_sizes)) * 2 * scale
    h = getattr(hf_config, "hidden_size", 0)
    layers, heads = getattr(hf_config, "num_hidden_layers", 0), getattr(hf_config, "num_attention_heads", 1)
    per_layer = s * b * h * (34 + 5 * heads * s / max(h, 1))
    if cfg.model.get("activation_checkpointing"):
        blocks = layers * 2 * s * b * h + per_layer  # block inputs, and one block during its recompute
    else:
        blocks = layers * per_layer
    logits = s * b * getattr(hf_config, "vocab_size", 0) * (2 * scale + 4) if causal_lm else 0
    return int(blocks * scale + logits)


def per_device(states: ModelStates, strategy: str, ranks: int) -> dict[str, float]:
    sharded, offloaded = SHARDING[strategy]
    out = {}
    for kind in ("parameters", "gradients", "optimizer"):
        whole = states.unsharded if kind == "parameters" else 0.0
        value = getattr(states, kind) - whole
        out[kind] = whole + (0.0 if kind in offloaded else value / (ranks if kind in sharded else 1))
    return out


def estimate(cfg: DictConfig, describe: bool = True) -> dict[str, dict[str, float]]:
    task = instantiate(cfg.task)
    if hasattr(task, "bind"):  # the model's shape comes from the data (next-item: the item vocabulary)
        task.bind(instantiate(cfg.data))
    hf_config = model_config(cfg, **task.model_kwargs())
    states, total, trainable = count_states(cfg, task, hf_config)
    ranks = (cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1) * cfg.trainer.num_nodes
    activations = activation_bytes(cfg, hf_config, causal_lm=task.peft_task_type == "CAUSAL_LM")
    rows = {}
    for strategy in SHARDING:
        row = per_device(states, strategy, 1 if strategy == "single" else ranks)
        row["activations"] = activations
        row["total"] = sum(row.values())
        rows[strategy] = row
    if describe:
        console.print(
            f"{total:,} parameters, {trainable:,} trainable; {ranks} ranks; "
            f"micro-batch {cfg.data.batch_size} x {positions(cfg, hf_config)} positions"
        )
    return rows


def levers(cfg: DictConfig) -> list[str]:
    """Overrides that cut a recipe's memory and that it does not use yet, cheapest in quality first:
    recomputing activations, 8-bit optimizer states, an adapter instead of full fine-tuning, a 4-bit base.
    Each is left out where the recipe's strategy or model refuses it (see toolkit.checks)."""
    kind = strategy_kind(cfg.strategy)
    method = cfg.adapter.get("method") if cfg.adapter else None
    out = [] if cfg.model.get("activation_checkpointing") else ["model.activation_checkpointing=true"]
    if cfg.optim._target_ == "torch.optim.AdamW" and kind != "fsdp2":
        out.append("optim=adamw_8bit")
    if method is None:
        out.append("adapter=lora")
    if method in (None, "lora") and cfg.model.config is None and cfg.strategy.get("stage") != 3:
        out.append("adapter=qlora")
    return out


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
