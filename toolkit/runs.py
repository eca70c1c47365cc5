"""Naming of runs: the run directory, the recipe a run came from, a stable id per run directory."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig


def new_run_dir(recipe: str, from_run: str | None) -> str:
    """runs/<recipe>/<timestamp to the microsecond>; a rerun on `from_run` records itself under it."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return f"{from_run}/reruns/{stamp}" if from_run else f"runs/{recipe}/{stamp}"


def recipe_name() -> str | None:
    """The recipe the process was launched with (None outside a Hydra launch)."""
    return HydraConfig.get().runtime.choices.get("recipe") if HydraConfig.initialized() else None


def run_id(run_dir: Path) -> str:
    """Stable per run directory: a resumed or requeued job gets the same id (e.g. its W&B run)."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
