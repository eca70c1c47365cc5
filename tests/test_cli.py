"""The command line for real, in subprocesses: exact resume after kill -9, DDP on 2 CPU ranks, W&B read back,
reruns on an earlier run, and `python -m toolkit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from .helpers import TINY_RUN, TOOLKIT_TRAIN, toolkit_train

TINY = [*TINY_RUN, "trainer.accelerator=cpu"]


def only_run_dir(root: Path) -> Path:
    runs = [p for p in (root / "runs" / "quickstart").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("every,max_steps", [(1, 24), (8, 160)], ids=["mid-epoch", "epoch-boundary"])
def test_resume_after_kill_is_exact(tmp_path, every, max_steps):
    """Dropout on, shuffled data, 8 batches per epoch, killed once a checkpoint at step >= 3 exists: the
    resumed run ends with bit-identical weights to an uninterrupted one. With a checkpoint every 8 steps
    every checkpoint falls on an epoch's last batch, which Lightning resumes at the next epoch."""
    args = [
        *TINY,
        f"trainer.max_steps={max_steps}",
        f"trainer.max_epochs={max_steps // 8}",
        f"checkpoint.every_n_train_steps={every}",
        "logger=none",
        "stages=[train]",
    ]
    reference = tmp_path / "reference"
    reference.mkdir()
    assert toolkit_train(args, reference).returncode == 0
    expected = weights(only_run_dir(reference) / "checkpoints" / "last.ckpt")

    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen(
        [str(TOOLKIT_TRAIN), *args], cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpts = list(killed.glob("runs/quickstart/*/checkpoints/last.ckpt"))
        if ckpts and torch.load(ckpts[0], map_location="cpu", weights_only=True)["global_step"] >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = only_run_dir(killed)
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= stopped_at < max_steps, "the run finished before it could be killed"
    assert stopped_at % every == 0
    resumed = toolkit_train([*args, f"from_run={run_dir}", "resume=last"], killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = weights(run_dir / "checkpoints" / "last.ckpt")
    assert final.keys() == expected.keys()
    diff = max((final[k] - expected[k]).abs().max().item() for k in expected)
    assert diff == 0.0, f"resumed from step {stopped_at}: max |dw| = {diff}"


def test_ddp_on_two_cpu_ranks_writes_one_run_dir(tmp_path):
    result = toolkit_train(
        [*TINY, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=4", "logger=csv"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)  # asserts a single run directory for both ranks
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "export" / "model" / "model.safetensors").exists()
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert {"base", "fine_tuned", "majority"} <= set(metrics)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert len(ckpt["rng_states"]) == 2, "each rank's RNG state is checkpointed"


def test_wandb_offline_run_reads_back(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc credentials: the logger must choose offline by itself
    result = toolkit_train(
        # 8 steps: the whole epoch of 64 examples, so that the epoch-end validation logs val/accuracy
        [*TINY, "trainer.max_steps=8", "trainer.log_every_n_steps=1", "stages=[train]"],
        tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert f"wandb sync {offline_runs[0]}" in result.stdout
    wandb = Path(sys.executable).with_name("wandb")
    summary = subprocess.run(
        [str(wandb), "leet", "inspect", "--summary", "--json", str(offline_runs[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summary.returncode == 0, summary.stderr
    text = summary.stdout
    logged = json.loads(text)["summary"]
    assert "train/loss" in logged and "val/accuracy" in logged
    assert "rotten_tomatoes" in text or "label_names" in text, "the resolved config is logged"


def test_rerun_evaluate_on_an_earlier_run_and_refuse_another_test_split(tmp_path):
    first = toolkit_train([*TINY, "trainer.max_steps=2", "logger=none"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = only_run_dir(tmp_path)
    what_ran = next(line for line in (run_dir / "report.md").read_text().splitlines() if "- recipe:" in line)
    assert what_ran.startswith("- recipe: `quickstart`; overrides: `recipe=quickstart ")  # from .hydra
    assert what_ran.endswith(" trainer.max_steps=2 logger=none`")
    metrics = run_dir / "evaluate" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    again = toolkit_train(["recipe=quickstart", "stages=[evaluate]", f"from_run={run_dir}"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert metrics.stat().st_mtime_ns > before
    assert json.loads(metrics.read_text()).keys() == {"base", "fine_tuned", "quantized", "majority"}
    other = toolkit_train(
        ["recipe=quickstart", "stages=[evaluate]", f"from_run={run_dir}", "data.seed=7"], tmp_path
    )
    assert other.returncode == 2
    assert "test split differs" in other.stderr and "refuses a different test set" in other.stderr


def test_python_dash_m_is_the_same_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "toolkit", "recipe=nlp/smollm2_lora_sft", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "_target_: toolkit.data.chat.ChatSFTData" in result.stdout


@pytest.mark.parametrize(
    "logger,pattern",
    [("csv", "csv/version_0/metrics.csv"), ("tensorboard", "tensorboard/version_0/events.out.tfevents.*")],
)
def test_other_loggers_write_into_the_run_dir(tmp_path, logger, pattern):
    result = toolkit_train(
        [*TINY, "trainer.max_steps=2", "trainer.log_every_n_steps=1", f"logger={logger}", "stages=[train]"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(only_run_dir(tmp_path).glob(pattern))


def test_a_run_prints_what_a_user_needs_and_keeps_the_rest_in_train_log(tmp_path, tiny_bert_dir):
    """A pretrained base with a new head (transformers reports the missing head), every default stage."""
    args = [*TINY_RUN, "model.config=null", f"model.name_or_path={tiny_bert_dir}", "trainer.max_steps=2"]
    result = toolkit_train([*args, "logger=csv"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout + result.stderr
    for noise in (
        "LOAD REPORT",
        "litlogger",
        "_pytree",
        "Modules in train mode",
        "GPU available",
        "Seed set",
    ):
        assert noise not in shown, noise
    assert result.stdout.count("trainable parameters:") == 1
    assert result.stdout.count("┃ metric ") == 1  # the metrics table, once
    log = (only_run_dir(tmp_path) / "train.log").read_text()
    for line in (
        "trainable parameters:",
        "LOAD REPORT",
        "GPU available",
        "Modules in train mode",
        "report: ",
    ):
        assert line in log, line
    assert "┃ metric " in log and "\x1b[" not in log and "\r" not in log


def test_a_recipe_file_outside_the_catalogue_runs(tmp_path):
    recipe = tmp_path / "mine" / "my_recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        "# @package _global_\ndefaults:\n  - override /adapter: none\noptim:\n  lr: 1.5e-4\nstages: [train]\n"
    )
    args = [f"recipe={recipe}", *TINY_RUN[1:], "trainer.max_steps=2", "logger=none"]
    result = toolkit_train(args, tmp_path / "mine")
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "mine" / "runs" / "user" / "my_recipe").iterdir()
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.optim.lr == 1.5e-4 and saved.adapter.get("method") is None and saved.stages == ["train"]
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
