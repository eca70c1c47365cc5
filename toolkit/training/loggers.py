"""Experiment loggers from config: W&B, MLflow, TensorBoard or CSV, one run per run directory.

Every logger gets the config with secrets redacted, and a CSV logger beside it (report.md draws its training
curve from the CSV). A resumed or requeued job continues its W&B or MLflow run instead of starting another.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from toolkit.console import console
from toolkit.layout import recipe_name, run_id
from toolkit.redaction import redact


def build_logger(logger_cfg: DictConfig | None, run_dir: Path, cfg: DictConfig) -> Any:
    if not logger_cfg:
        return False
    target = logger_cfg.get("_target_", "")
    continued = False  # an MLflow run continued: its params are logged, and MLflow refuses to change one
    if target.endswith("WandbLogger"):
        logger = wandb_logger(logger_cfg, run_dir)
    elif target.endswith("MLFlowLogger"):
        logger, continued = mlflow_logger(logger_cfg, run_dir)
    else:
        logger = instantiate(logger_cfg, save_dir=str(run_dir))
    if not continued:
        logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))
    if isinstance(logger, CSVLogger):
        return logger
    return [logger, CSVLogger(save_dir=str(run_dir), name="csv")]


def wandb_logger(logger_cfg: DictConfig, run_dir: Path) -> WandbLogger:
    wandb_dir = run_dir / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ.setdefault(var, str(wandb_dir))  # otherwise W&B writes under ~ as well
    offline = logger_cfg.get("offline")
    return instantiate(
        logger_cfg,
        save_dir=str(run_dir),
        offline=wandb_offline_default() if offline is None else offline,
        # one W&B run per run directory: a resumed or requeued job continues it instead of starting anew
        id=logger_cfg.get("id") or run_id(run_dir),
        name=logger_cfg.get("name") or recipe_name(),
        resume="allow",
    )


def wandb_offline_default() -> bool:
    """Offline unless W&B credentials are configured (env key or a ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def mlflow_logger(logger_cfg: DictConfig, run_dir: Path) -> tuple[Any, bool]:
    """Lightning's MLFlowLogger on `logger.tracking_uri` (MLFLOW_TRACKING_URI), else a SQLite store in
    <run>/mlruns; returns (logger, whether it continues an earlier run of this run directory)."""
    # MLflow 3 refuses its plain file store (./mlruns, "maintenance mode") unless MLFLOW_ALLOW_FILE_STORE
    # is set; SQLite is its supported local store (mlflow-skinny + sqlalchemy + alembic)
    local = None if logger_cfg.get("tracking_uri") else (run_dir / "mlruns").resolve()
    if local:
        local.mkdir(parents=True, exist_ok=True)
    uri = logger_cfg.get("tracking_uri") or f"sqlite:///{local / 'mlflow.db'}"
    experiment = logger_cfg.get("experiment_name") or recipe_name() or "toolkit"
    # one MLflow run per run directory: a resumed or requeued job finds it by its tag and continues it
    tag = run_id(run_dir)
    existing = logger_cfg.get("run_id") or mlflow_run(uri, experiment, tag)
    logger = instantiate(
        logger_cfg,
        tracking_uri=uri,
        experiment_name=experiment,
        run_name=logger_cfg.get("run_name") or recipe_name(),
        run_id=existing,
        tags={"toolkit.run_id": tag},
        artifact_location=(local / "artifacts").as_uri() if local else None,
    )
    inherited = os.environ.get("MLFLOW_TRACKING_URI")
    _ = logger.experiment  # opens the run, and mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI:
    if inherited is None:  # a later run in this process (a sweep's next job) must not log into this store
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = inherited
    return logger, bool(existing)


def mlflow_run(tracking_uri: str, experiment: str, tag: str) -> str | None:
    """The id of the MLflow run tagged `toolkit.run_id=<tag>` in `experiment`, if there is one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.`toolkit.run_id` = '{tag}'", max_results=1)
    return runs[0].info.run_id if runs else None


def print_wandb_sync(trainer: L.Trainer) -> None:
    """After training offline: the command that uploads the W&B run."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._offline:
            run_path = Path(logger.experiment.dir).parent
            console.print(f"W&B run saved offline; upload it with: wandb sync {run_path}")
            logger.experiment.finish()
