"""Every Lightning callback the toolkit adds: checkpoints (best, last), exact RNG resume, Slurm requeue on
SIGUSR1, and the resource meters the benchmarks attach (step time, peak RSS, tensors held).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    RichProgressBar,
)
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

from toolkit.console import console
from toolkit.layout import CHECKPOINTS


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's state as tensors: raw arrays do not load under torch.load(weights_only=True)
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class RNGStateCallback(L.Callback):
    """Saves every rank's torch/python/numpy RNG state and restores it when training restarts.

    Lightning does not checkpoint RNG states, so dropout after a resume would differ. States are applied
    in `on_train_start`, not at load time: setting up the dataloaders draws from the RNG in between.

    Each epoch's first batch also starts from RNGs seeded by (seed, epoch): a checkpoint taken on an
    epoch's last batch resumes at the next epoch, while the uninterrupted run drew from the RNG in between
    (end-of-epoch validation, new loader iterators), so its dropout masks would differ from there on.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._pending: list[dict[str, Any]] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:  # also after a resume at an epoch boundary, where on_train_epoch_start is skipped
            epoch_seed = self.seed + 1_000_003 * (trainer.current_epoch + 1)
            torch.manual_seed(epoch_seed)
            random.seed(epoch_seed)
            np.random.seed(epoch_seed % 2**32)

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        state = _rng_state()
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, state)
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [state]

    def on_load_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._pending and len(self._pending) == trainer.world_size:
            _set_rng_state(self._pending[trainer.global_rank])
        self._pending = None


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt every N steps and whenever training ends, without a monitor.

    With a monitor, Lightning defers step saves until the first validation has logged it (a long first
    epoch would have no checkpoint at all); and its end-of-training save only happens when no last.ckpt
    was written during the fit, so a run saving every 1000 steps and stopped by max_steps at 1500,
    mid-epoch, would have exported the weights of step 1000.
    """

    def __init__(self, dirpath: Path, every_n_train_steps: int | None) -> None:
        super().__init__(
            dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps
        )

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips when this step is saved already
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class RankPlacement(L.Callback):
    """One train.log line per rank: its global rank and the host it runs on, so a multi-node run's log shows
    which node each rank landed on (Lightning's own line names ranks only)."""

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        log = logging.getLogger("toolkit.ranks")
        log.setLevel(logging.INFO)
        where = f"{socket.gethostname()} (node rank {trainer.node_rank}, local rank {trainer.local_rank})"
        log.info("rank %d of %d on %s", trainer.global_rank, trainer.world_size, where)


def build_callbacks(cfg: DictConfig, run_dir: Path, monitor: str, mode: str) -> list[L.Callback]:
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / CHECKPOINTS,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            auto_insert_metric_name=False,
        ),
        LastCheckpoint(run_dir / CHECKPOINTS, every_n_train_steps=cfg.checkpoint.every_n_train_steps),
        RNGStateCallback(cfg.seed),
        RankPlacement(),
        ModelSummary(max_depth=1),  # logged (to train.log), in place of the rich table on the terminal
    ]
    if SLURMEnvironment.detect():
        callbacks.append(RequeueOnSignal())
    if cfg.logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.early_stopping.patience is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping.patience))
    if cfg.progress_bar:
        callbacks.append(RichProgressBar(refresh_rate=cfg.progress_bar_refresh))
    callbacks += [instantiate(extra) for extra in cfg.get("callbacks", {}).values()]
    return callbacks


def finish_loggers(trainer: L.Trainer) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        logger.finalize("requeued")
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()


class RequeueOnSignal(L.Callback):
    """On SIGUSR1, checkpoint at the end of the current step and requeue the job.

    Lightning's own handler saves inside the signal handler, possibly halfway through an optimizer step;
    deferring to the step boundary keeps the checkpoint consistent, so the requeued job resumes exactly.
    The checkpoint goes where Lightning looks on restart (hpc_ckpt_<n>.ckpt in the run directory).
    """

    def __init__(self) -> None:
        self.signalled = False

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        signal.signal(signal.SIGUSR1, self._flag)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # after training there is nothing to resume; ignore a late USR1 rather than die of it
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def _flag(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        finish_loggers(trainer)  # flush now: the requeue kills this process within seconds
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            console.print(
                f"SIGUSR1: checkpoint saved; requeue of job {job}: "
                f"{'done' if requeued.returncode == 0 else requeued.stderr.strip()}"
            )
        raise SystemExit(0)  # the requeued job carries on from the checkpoint; this one must not go further


def held_tensor_bytes(model: torch.nn.Module | None = None) -> int:
    """Bytes of every distinct tensor storage alive in this process (CPU and accelerator, not meta).

    Tensors only C++ holds have no Python object for the garbage collector to find: gradients get one
    when read, so the model's are read here; DDP's C++ gradient buckets stay uncounted."""
    grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
    seen: dict[tuple[str, int], int] = {}
    for obj in [*grads, *gc.get_objects()]:
        if not isinstance(obj, torch.Tensor):
            continue
        tensor = obj._local_tensor if isinstance(obj, DTensor) else obj
        if tensor.device.type == "meta" or type(tensor).__name__ == "FakeTensor":
            continue
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage of their own
            continue
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def peak_rss_bytes() -> int:
    """This process's peak resident set size: Linux's VmHWM, else ru_maxrss (KiB on Linux).

    ru_maxrss survives exec: a process started by a large parent (subprocess uses vfork) reports the
    parent's peak (measured: LoRA and full fine-tuning both "4.865 GiB" when launched from a 4.9 GiB parent).
    VmHWM belongs to the process's own address space."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ResourceReport(L.Callback):
    """Times every training step and, once, counts the tensors held just before an optimizer step (when
    parameters, gradients and the optimizer states of the previous step are all alive)."""

    def __init__(self, path: str, warmup_steps: int = 2, census_step: int = 3) -> None:
        self.path, self.warmup_steps, self.census_step = Path(path), warmup_steps, census_step
        self.step_seconds: list[float] = []
        self.tensor_bytes: int | None = None
        self._started = 0.0
        self._sent_at_start = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sent_at_start = sent_bytes()  # after setup: DDP's first broadcast of the weights is not counted

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.step_seconds.append(time.perf_counter() - self._started)

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.census_step - 1 and self.tensor_bytes is None:
            self.tensor_bytes = held_tensor_bytes(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        timed = self.step_seconds[self.warmup_steps :] or self.step_seconds
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "steps": len(self.step_seconds),
            "median_step_seconds": statistics.median(timed) if timed else None,
            "peak_rss_bytes": peak_rss_bytes(),
            "tensor_bytes": self.tensor_bytes,
            "sent_bytes": sent_bytes() - self._sent_at_start,
        }
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=2) + "\n")


def sent_bytes() -> int:
    """Bytes this network namespace sent over its interfaces other than loopback (/proc/net/dev): on a
    node of its own, what its ranks put on the wire (ranks on one machine talk over loopback: not counted)."""
    total = 0
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, counters = line.partition(":")
        if name.strip() != "lo":
            total += int(counters.split()[8])  # receive has 8 columns, then transmit bytes
    return total


def batch_tokens(batch: Any) -> int:
    """Tokens a batch holds: its attention mask's ones, else its input ids (0 for batches without either)."""
    if isinstance(batch, dict) and "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch["input_ids"].numel()
    return 0


class StepClock(L.Callback):
    """Records when each training step ends and when the first one starts (perf_counter; and Unix time, to
    compare with a launch time in another process), and each step's tokens (non-padding ones where the batch
    has an attention mask)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.first_start: float | None = None
        self.first_start_perf: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.first_start is None:
            self.first_start, self.first_start_perf = time.time(), time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self.ends.append(time.perf_counter())
        self.tokens.append(batch_tokens(batch))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        timing = {
            "first_start": self.first_start,
            "first_start_perf": self.first_start_perf,
            "ends": self.ends,
            "tokens": self.tokens,
        }
        self.path.write_text(json.dumps(timing))
