"""The pipeline: the listed stages in their fixed order, after every pre-flight check."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from toolkit.checks import preflight
from toolkit.errors import ToolkitError
from toolkit.layout import STAGE_ORDER
from toolkit.run.stages import (
    distill_stage,
    evaluate_stage,
    export_stage,
    prune_stage,
    quantize_stage,
    report_stage,
    train_stage,
)

STAGES = {
    "train": train_stage,
    "export": export_stage,
    "prune": prune_stage,
    "distill": distill_stage,
    "quantize": quantize_stage,
    "evaluate": evaluate_stage,
    "report": report_stage,
}


def ordered_stages(stages: list[str]) -> list[str]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ToolkitError(f"stages {unknown} unknown; valid stages, in run order: {', '.join(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in stages]


def run_pipeline(cfg: DictConfig, run_dir: Path, done: list[str] | None = None) -> list[str]:
    """Run the listed stages in order; returns the stages that completed on this process (also appended
    to `done` as they complete, so a caller knows what finished when a later stage fails)."""
    done = [] if done is None else done
    stages = ordered_stages(list(cfg.stages))
    preflight(cfg, stages)
    for stage in stages:
        if stage == "train":
            if not train_stage(cfg, run_dir):
                return done  # a non-zero rank: its part ends with training
        else:
            STAGES[stage](cfg, run_dir)
        done.append(stage)
    return done
