"""Faults in training: non-finite losses, dying ranks, kills during saves, full disks, corrupted files."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch

from toolkit.checkpoint import read_state_dict
from toolkit.module import TaskModule

from .conftest import TINY_CLASSIFIER, TINY_RUN, compose_config, run_pipeline
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
