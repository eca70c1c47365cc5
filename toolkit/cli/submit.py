"""`toolkit-submit recipe=... slurm.nodes=2 [--dry-run]`: render the sbatch script and submit it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hydra.errors import HydraException

from toolkit.checks import check_options
from toolkit.config import compose_config
from toolkit.console import console
from toolkit.errors import ToolkitError
from toolkit.files import atomic_write_text
from toolkit.layout import new_run_dir, recipe_name
from toolkit.run.slurm import render_sbatch, sbatch


def submit(overrides: list[str], dry_run: bool) -> Path | None:
    overrides = [absolute_recipe_file(arg) for arg in overrides]  # the job may start in another directory
    cfg = compose_config(overrides)
    check_options(cfg)  # before anything reaches the queue
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


def absolute_recipe_file(arg: str) -> str:
    key, _, value = arg.partition("=")
    if key == "recipe" and value.endswith((".yaml", ".yml")):
        return f"recipe={Path(value).expanduser().resolve()}"
    return arg


def main() -> None:
    args = sys.argv[1:]
    dry_run = "--dry-run" in args
    overrides = [a for a in args if a != "--dry-run"]
    try:
        submit(overrides, dry_run)
    except (ToolkitError, HydraException) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
