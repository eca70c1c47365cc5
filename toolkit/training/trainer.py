"""Build the Lightning Trainer from config: strategy, logger, callbacks, thread settings."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from toolkit.console import console
from toolkit.layout import (
    recipe_name,
    run_id,
)
from toolkit.redaction import redact
from toolkit.training.callbacks import build_callbacks
from toolkit.training.checkpoints import (
    AtomicCheckpointIO,
)


def configure_threads(devices: int, accelerator: str) -> None:
    """Give each CPU rank its share of the cores; Lightning's launcher leaves every rank using all of them."""
    if accelerator not in ("cpu", "auto") or torch.cuda.is_available() or devices <= 1:
        return
    per_rank = max(1, (os.cpu_count() or 1) // devices)
    os.environ.setdefault("OMP_NUM_THREADS", str(per_rank))  # inherited by the ranks Lightning launches
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def wandb_offline_default() -> bool:
    """Offline unless W&B credentials are configured (env key or a ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def build_logger(logger_cfg: DictConfig | None, run_dir: Path, cfg: DictConfig) -> Any:
    if not logger_cfg:
        return False
    target = logger_cfg.get("_target_", "")
    if target.endswith("WandbLogger"):
        wandb_dir = run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            os.environ.setdefault(var, str(wandb_dir))  # otherwise W&B writes under ~ as well
        offline = logger_cfg.get("offline")
        logger = instantiate(
            logger_cfg,
            save_dir=str(run_dir),
            offline=wandb_offline_default() if offline is None else offline,
            # one W&B run per run directory: a resumed or requeued job continues it instead of starting anew
            id=logger_cfg.get("id") or run_id(run_dir),
            name=logger_cfg.get("name") or recipe_name(),
            resume="allow",
        )
    else:
        logger = instantiate(logger_cfg, save_dir=str(run_dir))
    logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))
    if isinstance(logger, CSVLogger):
        return logger
    return [logger, CSVLogger(save_dir=str(run_dir), name="csv")]  # report.md draws its curve from the CSV


def plugins(cfg: DictConfig) -> list[Any]:
    found: list[Any] = []
    if "DeepSpeed" not in (cfg.strategy.get("_target_") or ""):  # DeepSpeed writes its own directories
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


def _print_wandb_sync(trainer: L.Trainer) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._offline:
            run_path = Path(logger.experiment.dir).parent
            console.print(f"W&B run saved offline; upload it with: wandb sync {run_path}")
            logger.experiment.finish()
