"""Slurm: `toolkit-submit` renders an sbatch script from the composed config and submits it; a callback
checkpoints and requeues the job when Slurm warns with SIGUSR1 (time limit or preemption).

    toolkit-submit recipe=nlp/llama3_8b_lora_sft slurm=gpu slurm.nodes=2 [--dry-run]
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import lightning as L
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from toolkit.checkpoint import atomic_write_text
from toolkit.console import console
from toolkit.errors import ToolkitError
from toolkit.runs import new_run_dir, recipe_name

TEMPLATE = "train.sbatch.j2"


def template_dir() -> Path:
    """slurm/ of a source checkout, else the copy shipped inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "slurm_files", here.parent / "slurm"):
        if (candidate / TEMPLATE).exists():
            return candidate
    raise RuntimeError(f"{TEMPLATE} not found next to {here}")


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
    single_process = not cfg.strategy.get("_target_") and cfg.strategy.get("name", "auto") == "auto"
    if s.nodes * s.tasks_per_node > 1 and single_process:
        raise ToolkitError(
            f"slurm.nodes={s.nodes} x slurm.tasks_per_node={s.tasks_per_node} ranks need a "
            "multi-process strategy (e.g. strategy=ddp)"
        )


def train_command(overrides: list[str], run_dir: Path, cfg: DictConfig) -> str:
    """The `toolkit-train` line every srun task runs: the user's overrides pinned to this allocation."""
    executable = Path(sys.executable).with_name("toolkit-train")
    pinned = [
        f"hydra.run.dir={run_dir}",
        f"trainer.num_nodes={cfg.slurm.nodes}",
        f"trainer.devices={cfg.slurm.tasks_per_node}",
    ]
    if not cfg.slurm.gpus_per_node:
        pinned.append("trainer.accelerator=cpu")
    words = [str(executable) if executable.exists() else "toolkit-train", *overrides, *pinned]
    return " ".join(shlex.quote(w) for w in words)


def render_sbatch(cfg: DictConfig, overrides: list[str], run_dir: Path) -> str:
    check_options(cfg)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    slurm_options = OmegaConf.to_container(cfg.slurm, resolve=True)
    slurm_options["job_name"] = slurm_options["job_name"] or (recipe_name() or "run").replace("/", "-")
    return env.get_template(TEMPLATE).render(
        s=slurm_options, run_dir=run_dir, command=train_command(overrides, run_dir, cfg)
    )


def sbatch(script: Path) -> str:
    """Submit `script`; returns the job id."""
    if shutil.which("sbatch") is None:
        raise ToolkitError(
            "sbatch not found on PATH: run toolkit-submit on a Slurm login node, "
            "or add --dry-run to print the script"
        )
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise ToolkitError(f"sbatch rejected the job: {message}")
    return result.stdout.strip().split(";")[0]


def submit(overrides: list[str], dry_run: bool) -> Path | None:
    from toolkit.train import compose_config  # train imports this module (via trainer)

    cfg = compose_config(overrides)
    run_dir = Path(new_run_dir(recipe_name() or "run", None)).resolve()
    script_text = render_sbatch(cfg, overrides, run_dir)
    if dry_run:
        print(script_text, end="")
        return None
    run_dir.mkdir(parents=True)
    script = run_dir / "submit.sbatch"
    atomic_write_text(script, script_text)
    try:
        job_id = sbatch(script)
    except ToolkitError:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing was queued: leave no run behind
        raise
    console.print(f"submitted job {job_id}\n  run dir: {run_dir}\n  log: {run_dir}/slurm-{job_id}.out")
    return run_dir


def main() -> None:
    args = sys.argv[1:]
    dry_run = "--dry-run" in args
    overrides = [a for a in args if a != "--dry-run"]
    try:
        submit(overrides, dry_run)
    except (ToolkitError, HydraException) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


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
