"""The run directory: its name, the recipe it came from, a stable id, and every folder and file name in it.

This is the one module that knows the names (stages, evaluate, report, sweeps and the checkpoint code all
read them from here). It imports nothing else from the toolkit, so every layer may use it.

    runs/<recipe>/<timestamp>/
      .hydra/  checkpoints/  export/{adapter,model}/  prune/  distill/  quantize/  evaluate/metrics.json
      data_split.json  train.log  report.md  serve/completions.jsonl  feedback/feedback.jsonl
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from toolkit.errors import ToolkitError


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


STAGE_ORDER = ("train", "export", "prune", "distill", "quantize", "evaluate", "report")
# Folders a run's stages write, in pipeline order.
STAGE_FOLDERS = ("checkpoints", "export", "prune", "distill", "quantize", "evaluate")
CHECKPOINTS = "checkpoints"
ADAPTER = "export/adapter"
METRICS = "evaluate/metrics.json"
SAMPLES = "evaluate/samples.json"  # held-out prompts with every variant's answer
REPORT = "report.md"
TRAIN_LOG = "train.log"
SAVED_CONFIG = ".hydra/config.yaml"


# Saved model variants of a run, in pipeline order: variant name in evaluate/metrics.json -> folder.
VARIANT_DIRS = {
    "fine_tuned": "export/model",
    "pruned": "prune/model",
    "distilled": "distill/model",
    "quantized": "quantize/model",
}


SPLIT_RECORD = "data_split.json"
COMPLETIONS = "serve/completions.jsonl"  # every answer the server gave, with the messages it answered
FEEDBACK = "feedback/feedback.jsonl"  # ratings and comparisons of those answers (data=feedback reads it)


def saved_variants(run_dir: Path) -> dict[str, Path]:
    """The saved model variants present in the run directory, in pipeline order."""
    folders = {name: run_dir / folder for name, folder in VARIANT_DIRS.items()}
    return {name: folder for name, folder in folders.items() if (folder / "config.json").exists()}


def compression_source(run_dir: Path, produces: str) -> tuple[str, Path]:
    """(variant, folder) the compression step that `produces` a variant starts from: the last saved variant
    before it in pipeline order (quantize takes the distilled model, else the pruned, else the export)."""
    earlier = list(VARIANT_DIRS)[: list(VARIANT_DIRS).index(produces)]
    variants = {k: v for k, v in saved_variants(run_dir).items() if k in earlier}
    if not variants:
        raise ToolkitError(
            f"no exported model in {run_dir / VARIANT_DIRS['fine_tuned']}; run the export stage first "
            "(stages=[export,...] on a run with checkpoints)"
        )
    return list(variants.items())[-1]
