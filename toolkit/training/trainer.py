"""Build the Lightning Trainer from config: strategy, loggers, callbacks, plugins, thread settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from toolkit.training.callbacks import build_callbacks
from toolkit.training.checkpoints import (
    AtomicCheckpointIO,
)
from toolkit.training.loggers import build_logger
from toolkit.training.strategies import strategy_kind


def configure_threads(devices: int, accelerator: str) -> None:
    """Give each CPU rank its share of the cores; Lightning's launcher leaves every rank using all of them."""
    if accelerator not in ("cpu", "auto") or torch.cuda.is_available() or devices <= 1:
        return
    per_rank = max(1, (os.cpu_count() or 1) // devices)
    os.environ.setdefault("OMP_NUM_THREADS", str(per_rank))  # inherited by the ranks Lightning launches
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def plugins(cfg: DictConfig) -> list[Any]:
    found: list[Any] = []
    if strategy_kind(cfg.strategy) != "deepspeed":  # DeepSpeed writes its own directories
        found.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect():
        # under Slurm, RequeueOnSignal replaces Lightning's USR1 handler (which saves mid-step)
        found.append(SLURMEnvironment(auto_requeue=False))
    return found


def build_trainer(cfg: DictConfig, run_dir: Path, monitor: str, mode: str) -> L.Trainer:
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    configure_threads(
        trainer_kwargs.get("devices", 1) if isinstance(trainer_kwargs.get("devices"), int) else 1,
        trainer_kwargs.get("accelerator", "auto"),
    )
    strategy = instantiate(cfg.strategy) if cfg.strategy.get("_target_") else cfg.strategy.get("name", "auto")
    return L.Trainer(
        **trainer_kwargs,
        strategy=strategy,
        logger=build_logger(cfg.logger, run_dir, cfg),
        callbacks=build_callbacks(cfg, run_dir, monitor, mode),
        enable_progress_bar=bool(cfg.progress_bar),
        default_root_dir=str(run_dir),  # where hpc_ckpt_*.ckpt goes and is found again after a requeue
        plugins=plugins(cfg),
        # the data module hands out StatefulDistributedSampler itself (exact mid-epoch resume on DDP)
        use_distributed_sampler=False,
    )
