"""Faults in training: non-finite losses, dying ranks, kills during saves, full disks, corrupted files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from toolkit.checkpoint import check_checkpoint, read_state_dict
from toolkit.errors import ToolkitError
from toolkit.module import TaskModule

from .conftest import TINY_CLASSIFIER, TINY_RUN, compose_config, run_pipeline, toolkit_train
from .test_errors import run_cli

pytestmark = pytest.mark.faults
EXPLODING = [*TINY_RUN, "adapter=none", "optim=sgd", "optim.lr=1e30", "trainer.gradient_clip_val=null"]


def test_a_nonfinite_loss_stops_the_run_naming_step_and_batch(monkeypatch, tmp_path, capsys):
    code, err = run_cli([*EXPLODING, "trainer.max_steps=6", "logger=none"], monkeypatch, tmp_path, capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: non-finite training loss \((nan|inf)\) at step \d \(epoch 0, batch \d\); lower optim.lr, "
        r"check the data, or set on_nonfinite_loss=skip to skip such batches",
        line,
    ), line


def test_skip_policy_skips_the_nonfinite_batch_and_trains_on(monkeypatch, tmp_path):
    """The third batch's loss is made NaN: with on_nonfinite_loss=skip that batch updates nothing (it still
    counts as one of the 6 steps, as in Lightning), the run completes and the weights stay finite."""
    forward = TaskModule.forward
    calls = {"n": 0}

    def third_batch_nan(self, batch):
        outputs = forward(self, batch)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(TaskModule, "forward", third_batch_nan)
    cfg = compose_config([*TINY_CLASSIFIER, "logger=csv", "on_nonfinite_loss=skip", "stages=[train]"])
    run_pipeline(cfg, tmp_path)
    metrics = pd.read_csv(next((tmp_path / "csv").glob("version_*/metrics.csv")))
    assert metrics["train/skipped_batches"].max() == 1  # a running count
    assert calls["n"] == 6
    weights = read_state_dict(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.fixture
def run_copy(classifier_run, tmp_path) -> tuple[DictConfig, Path]:
    """A private copy of the tiny trained classifier run, to damage."""
    cfg, run_dir = classifier_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return cfg, copy


def truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def with_overrides(cfg: DictConfig, **values) -> DictConfig:
    cfg = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_a_truncated_export_is_refused_naming_the_file(run_copy):
    cfg, run_dir = run_copy
    weights = run_dir / "export" / "model" / "model.safetensors"
    truncate(weights)
    with pytest.raises(ToolkitError, match=re.escape(f"{weights} is corrupted: ")):
        run_pipeline(with_overrides(cfg, stages=["evaluate"]), run_dir)


def test_a_truncated_checkpoint_is_refused_naming_the_file(run_copy):
    cfg, run_dir = run_copy
    last = run_dir / "checkpoints" / "last.ckpt"
    truncate(last)
    with pytest.raises(ToolkitError, match=re.escape(f"checkpoint file {last} is truncated or corrupted")):
        run_pipeline(with_overrides(cfg, stages=["train"], resume="last"), run_dir)
    with pytest.raises(ToolkitError, match=re.escape(f"checkpoint file {last} is truncated or corrupted")):
        run_pipeline(with_overrides(cfg, stages=["export"]), run_dir)


def test_a_truncated_dcp_shard_is_refused_naming_the_file(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "strategy=fsdp2", "trainer.devices=1", "trainer.max_steps=2", "logger=none"]
    done = toolkit_train([*args, "stages=[train]", f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    check_checkpoint(checkpoint)  # complete: passes
    (shard,) = checkpoint.glob("*.distcp")
    truncate(shard)
    with pytest.raises(ToolkitError, match=re.escape(f"checkpoint file {shard} is truncated or missing")):
        check_checkpoint(checkpoint)
