"""The sbatch script `toolkit-submit` renders from the composed config, and submitting it with `sbatch`.

The callback that checkpoints and requeues on SIGUSR1 lives with the other callbacks
(toolkit.training.callbacks.RequeueOnSignal).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
from omegaconf import DictConfig, OmegaConf

from toolkit.errors import ToolkitError
from toolkit.layout import recipe_name

TEMPLATE = "train.sbatch.j2"


def template_dir() -> Path:
    """slurm/ of a source checkout, else the copy shipped inside the package."""
    here = Path(__file__).resolve().parents[1]  # the package: toolkit/
    for candidate in (here / "slurm_files", here.parent / "slurm"):
        if (candidate / TEMPLATE).exists():
            return candidate
    raise RuntimeError(f"{TEMPLATE} not found next to {here}")


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
