"""Faults in training: non-finite losses, dying ranks, kills during saves, full disks, corrupted files."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from toolkit.errors import ToolkitError
from toolkit.run.pipeline import run_pipeline
from toolkit.training.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint,
    existing_checkpoint,
    read_state_dict,
)
from toolkit.training.module import TaskModule

from .helpers import TINY_CLASSIFIER, TINY_RUN, TOOLKIT_TRAIN, compose_config, run_cli, toolkit_train

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


def launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    args = [*TINY_RUN, "logger=none", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(
        [str(TOOLKIT_TRAIN), *args],
        cwd=run_dir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, job: subprocess.Popen, timeout: float = 300, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert job.poll() is None, f"the job ended first: {job.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(every)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


TWO_RANKS = [
    "strategy=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "checkpoint.every_n_train_steps=1",
]


def test_a_rank_that_dies_ends_the_job_promptly_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    job = launch(run_dir, *TWO_RANKS, "trainer.max_steps=200", "trainer.max_epochs=100", "stages=[train]")
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for(last.exists, job)
    (rank1,) = children(job.pid)
    os.kill(rank1, signal.SIGKILL)
    started = time.time()
    code = job.wait(timeout=120)  # gloo sees the peer gone; Lightning's launcher ends the job
    assert code != 0
    assert time.time() - started < 120
    resumed = toolkit_train(
        [*TINY_RUN, "logger=none", *TWO_RANKS, "trainer.max_steps=12", f"from_run={run_dir}", "resume=last"],
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(last, weights_only=True)["global_step"] == 12


def test_a_kill_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL the job while a ZeRO-3 checkpoint is being written (its staging directory exists): the last
    complete checkpoint is still whole, the partial one is never taken for it, and resume finishes."""
    run_dir = tmp_path / "run"
    common = [*TWO_RANKS, "strategy=deepspeed_zero3", "trainer.max_steps=12", "stages=[train]"]
    job = launch(run_dir, *common)
    last = run_dir / "checkpoints" / "last.ckpt"
    staging = last.with_name("last.ckpt.tmp")
    wait_for(last.exists, job)  # a first complete checkpoint
    wait_for(staging.exists, job, every=0.001)  # the next save has begun
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    complete = existing_checkpoint(last)
    assert complete is not None and complete.name != staging.name
    check_checkpoint(complete)
    assert read_state_dict(complete)
    resumed = toolkit_train(
        [*TINY_RUN, "logger=none", *common, f"from_run={run_dir}", "resume=last"], tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not staging.exists(), "the next save cleans the partial staging directory"


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: room for one checkpoint of the tiny model (~4 MB), not for the next beside it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here: {done.stderr.decode().strip()}"
        if os.environ.get("CI"):  # CI must run every fault, not skip it
            pytest.fail(reason)
        pytest.skip(reason)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_a_save_fails_clearly_and_keeps_the_previous_checkpoint(small_disk, tmp_path):
    run_dir = small_disk / "run"
    done = toolkit_train(
        [
            *TINY_RUN,
            "logger=none",
            "checkpoint.every_n_train_steps=1",
            "trainer.max_steps=6",
            "stages=[train]",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: disk full while training in {run_dir} ("), line
    assert line.endswith(
        f"the last complete checkpoint is kept: free space, then rerun with from_run={run_dir} resume=last"
    ), line
    last = run_dir / "checkpoints" / "last.ckpt"
    check_checkpoint(last)
    assert torch.load(last, weights_only=True)["global_step"] == 1


def test_last_checkpoint_is_saved_from_the_first_steps_and_at_the_end(tmp_path):
    """Every 4 steps from step 4 on (before any validation), and at the end of a run that max_steps stops
    mid-epoch (step 6 of 8): export must never see weights older than the final ones."""
    cfg = compose_config([*TINY_CLASSIFIER, "checkpoint.every_n_train_steps=4", "stages=[train]"])
    saved = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        saved.append((Path(path).name, checkpoint["global_step"]))
        return real_save(self, checkpoint, path, storage_options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
        run_pipeline(cfg, tmp_path)
    assert ("last.ckpt", 4) in saved and saved[-1] == ("last.ckpt", 6)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
