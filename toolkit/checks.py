"""Pre-flight checks: combinations refused before anything is loaded, trained or queued."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from toolkit.compress.quantize import check_quantize_config
from toolkit.errors import ToolkitError
from toolkit.models.adapters import quantization_settings
from toolkit.tasks.harness import harness_tasks, task_manager
from toolkit.training.strategies import strategy_kind


def check_options(cfg: DictConfig) -> None:
    """Refuse allocations that cannot run the recipe, before anything reaches the queue."""
    s = cfg.slurm
    for key in ("nodes", "tasks_per_node", "cpus_per_task"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise ToolkitError(f"slurm.{key}={s[key]} must be a positive integer")
    if s.gpus_per_node and s.tasks_per_node > s.gpus_per_node:
        raise ToolkitError(
            f"slurm.tasks_per_node={s.tasks_per_node} exceeds slurm.gpus_per_node="
            f"{s.gpus_per_node}: a GPU job runs one task per GPU"
        )
    if s.nodes * s.tasks_per_node > 1 and strategy_kind(cfg.strategy) == "single":
        raise ToolkitError(
            f"slurm.nodes={s.nodes} x slurm.tasks_per_node={s.tasks_per_node} ranks need a "
            "multi-process strategy (e.g. strategy=ddp)"
        )


def check_nonfinite_policy(policy: str, strategy: DictConfig) -> None:
    if policy not in ("stop", "skip"):
        raise ToolkitError(f"on_nonfinite_loss='{policy}' is not a policy; valid: stop, skip")
    if policy == "skip" and strategy_kind(strategy) == "deepspeed":
        raise ToolkitError(
            "on_nonfinite_loss=skip is not possible under DeepSpeed (its engine cannot skip an optimizer "
            "step); use on_nonfinite_loss=stop or another strategy"
        )


def check_strategy(strategy: dict, optimizer_target: str, accelerator: str, devices: Any) -> None:
    """Refuse, before launching ranks, combinations the strategy or the machine cannot run."""

    if strategy.get("offload_optimizer") and not optimizer_target.endswith("DeepSpeedCPUAdam"):
        raise ToolkitError(
            f"DeepSpeed offloads the optimizer here and refuses optim._target_={optimizer_target}; "
            "use optim=deepspeed_cpu_adam"
        )
    if not isinstance(devices, int):
        return
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    available = torch.cuda.device_count() if on_gpu else os.cpu_count() or 1
    if devices > available:
        kind = "CUDA devices" if on_gpu else "CPU cores (one rank per core)"
        raise ToolkitError(f"trainer.devices={devices} but this machine has {available} {kind}")


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def check_attention(attn: str | None, accelerator: str) -> None:
    """model.attn_implementation: a kernel transformers knows, installed, that can train on this machine."""
    if attn is None:
        return
    if attn not in ATTENTION:
        raise ToolkitError(
            f"model.attn_implementation='{attn}' is not supported; valid: null, {', '.join(ATTENTION)}"
        )
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if attn == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None or not on_gpu):
        raise ToolkitError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            f"({'not installed' if on_gpu else 'no GPU here'}); use sdpa or eager"
        )
    if attn == "flex_attention" and not on_gpu:
        raise ToolkitError(
            "model.attn_implementation=flex_attention cannot train on CPU (torch has no FlexAttention "
            "backward there); use sdpa or eager, or train on a GPU"
        )


def check_memory_levers(cfg: DictConfig) -> None:
    """QLoRA's base and bitsandbytes optimizers, where a strategy cannot hold them."""
    kind = strategy_kind(cfg.strategy)
    if quantization_settings(cfg.adapter):
        if cfg.model.config is not None:
            raise ToolkitError(
                "adapter=qlora quantizes pretrained weights but model.config builds a random model; set "
                "model.name_or_path to a model directory or hub id and model.config=null"
            )
        if kind == "deepspeed" and cfg.strategy.get("stage") == 3:
            raise ToolkitError(
                "adapter=qlora cannot run under DeepSpeed ZeRO-3 (it partitions the weights as they load, "
                "which a 4-bit load cannot be); use strategy=fsdp2 or deepspeed_zero2"
            )
    if cfg.optim._target_.startswith("bitsandbytes.") and kind == "fsdp2":
        raise ToolkitError(
            f"optim._target_={cfg.optim._target_} cannot step FSDP2's sharded parameters (bitsandbytes' "
            "kernels take plain tensors, not DTensors); use optim=adamw with fsdp2, or a DeepSpeed strategy"
        )


def preflight(cfg: DictConfig, stages: list[str]) -> None:
    """Every check of a run's config, before its first stage: a bad combination fails in a second, not
    after an hour of training. Checks of the training setup apply only when the run trains."""
    if "train" in stages:
        check_nonfinite_policy(cfg.get("on_nonfinite_loss", "stop"), cfg.strategy)
        check_strategy(
            OmegaConf.to_container(cfg.strategy, resolve=True),
            cfg.optim._target_,
            cfg.trainer.accelerator,
            cfg.trainer.devices,
        )
        check_attention(cfg.model.get("attn_implementation"), cfg.trainer.accelerator)
        check_memory_levers(cfg)
    if "quantize" in stages and cfg.quantize.quantization_config is not None:
        check_quantize_config(cfg.quantize)
    lm_eval = OmegaConf.select(cfg, "evaluate.lm_eval")
    if "evaluate" in stages and harness_tasks(lm_eval):
        task_manager(lm_eval)  # an unknown task name fails now, not after training
