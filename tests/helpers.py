"""Helpers shared by the test files: tiny model configs, override lists, and ways to run the commands."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import (
    AutoConfig,
)

from toolkit.cli import train as train_command
from toolkit.config import compose_config as toolkit_compose_config
from toolkit.data.text import TextClassificationData
from toolkit.training.checkpoints import existing_checkpoint

# Tiny models built from config (real tokenizers): 2-layer BERT / Llama.
TINY_BERT = (
    "model.config={model_type:bert,hidden_size:32,num_hidden_layers:2,num_attention_heads:2,"
    "intermediate_size:64,vocab_size:30522,max_position_embeddings:128}"
)
TINY_LLAMA = (
    "model.config={model_type:llama,hidden_size:32,num_hidden_layers:2,num_attention_heads:4,"
    "num_key_value_heads:2,intermediate_size:64,vocab_size:49152,max_position_embeddings:256,"
    "tie_word_embeddings:true}"
)

ROWS = pd.DataFrame(
    {
        "text": [f"review number {i} " + "good " * (i % 7) for i in range(50)],
        "category": ["fresh" if i % 3 else "rotten" for i in range(50)],
    }
)


def data_module(path, **kwargs) -> TextClassificationData:
    from toolkit.data.assets import asset_path

    return TextClassificationData(
        path=str(path),
        tokenizer=asset_path("minilm"),
        text_column="text",
        label_column="category",
        label_names=["rotten", "fresh"],
        val_size=0.2,
        test_size=0.2,
        max_length=16,
        batch_size=4,
        **kwargs,
    )


FAST = ["logger=none", "progress_bar=false", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1"]
TINY_IMAGES = ["data.max_train_examples=64", "data.max_eval_examples=32", "data.batch_size=16",
               "trainer.max_steps=3", "scheduler.num_warmup_steps=1", *FAST]  # fmt: skip


TINY_RECSYS = ["data.max_users=40", "data.max_length=12", "data.batch_size=16", "trainer.max_steps=3",
               "scheduler.num_warmup_steps=1", *FAST]  # fmt: skip


TINY_SASREC = "model.config={model_type:sasrec,n_embd:16,n_layer:1,n_head:2,n_positions:12}"


TINY_BERT4REC = (
    "model.config={model_type:bert4rec,hidden_size:16,num_hidden_layers:1,num_attention_heads:2,"
    "intermediate_size:32,max_position_embeddings:12}"
)


def quantize_cfg(name: str):
    return compose_config(["recipe=quickstart", f"quantize={name}"]).quantize


def copy_run(run: tuple, tmp_path: Path) -> Path:
    """A private copy of a shared session run (so a test's stages do not leak into others), with the
    .hydra/config.yaml that `from_run` reads."""
    cfg, run_dir = run
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (copy / ".hydra").mkdir()
    OmegaConf.save(cfg, copy / ".hydra" / "config.yaml")
    return copy


def run_cli(args: list[str], monkeypatch, tmp_path, capsys) -> tuple[int, str]:
    """`toolkit-train <args>` in this process, from tmp_path; returns (exit code, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["toolkit-train", *args])
    with pytest.raises(SystemExit) as exit_info:
        train_command.main()
    return exit_info.value.code, capsys.readouterr().err


def last_line(err: str) -> str:
    """The error line (progress bars of `datasets` may precede it on stderr)."""
    return err.strip().splitlines()[-1]


def assert_no_run_left(tmp_path):
    runs = tmp_path / "runs"
    leftovers = [p for p in runs.rglob("*") if p.is_file()] if runs.exists() else []
    assert not leftovers, f"artifacts left behind: {leftovers[:3]}"


# A 1-layer ViT for 28x28 greyscale images, built from config.
TINY_VIT = (
    "model.config={model_type:vit,image_size:28,patch_size:7,num_channels:1,hidden_size:16,"
    "num_hidden_layers:1,num_attention_heads:2,intermediate_size:32}"
)


# The quickstart on a 64-example slice with the tiny BERT: for runs through the command line.
TINY_RUN = [
    "recipe=quickstart",
    TINY_BERT,
    "data.max_train_examples=64",
    "data.max_eval_examples=16",
    "data.batch_size=8",
    "progress_bar=false",
    "scheduler.num_warmup_steps=2",
    "quantize.max_metric_drop=null",  # 16 validation examples: one flipped answer is 6 points
]


TINY_CLASSIFIER = [
    "recipe=quickstart",
    TINY_BERT,
    "data.max_train_examples=64",
    "data.max_eval_examples=32",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "scheduler.num_warmup_steps=2",
    *FAST,
]


TINY_SFT = [
    "recipe=nlp/smollm2_lora_sft",
    TINY_LLAMA,
    "data.max_train_examples=32",
    "data.max_eval_examples=8",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "task.max_new_tokens=3",
    "scheduler.num_warmup_steps=1",
    *FAST,
]


def save_tiny_pretrained(path: Path, config_override: str, model_class: type, tokenizer: str) -> Path:
    """A seeded tiny model saved like a hub checkpoint (weights + tokenizer): the pretrained-base path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from transformers import AutoTokenizer

    values = dict(OverridesParser.create().parse_override(config_override).value())
    torch.manual_seed(0)
    model_class(AutoConfig.for_model(values.pop("model_type"), **values)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)
    return path


TOOLKIT_TRAIN = Path(sys.executable).with_name("toolkit-train")


def toolkit_train(args: list[str], cwd: Path, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """`toolkit-train <args>` in a subprocess from `cwd`, output captured."""
    return subprocess.run(
        [str(TOOLKIT_TRAIN), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `toolkit-train <overrides>` would run with (the toolkit's own composer), without the
    `hydra` node, as Hydra saves it in a run's .hydra/config.yaml."""
    cfg = toolkit_compose_config(overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_cli_line(args: list[str], monkeypatch, tmp_path, capsys) -> tuple[int, str]:
    """As run_cli, with the error line alone."""
    code, err = run_cli(args, monkeypatch, tmp_path, capsys)
    return code, last_line(err)


# With base_dir (dropout off: each rank would draw its own masks) and plain shuffling (length grouping
# sorts per rank), 2 ranks x batch 8 see exactly the single process's batch of 16.
COMMON = [
    "recipe=quickstart",
    "data.group_by_length=false",
    "data.max_train_examples=64",
    "data.max_eval_examples=16",
    "trainer.max_steps=3",
    "trainer.accelerator=cpu",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "progress_bar=false",
    "stages=[train,export]",
]


def checked_collectives(overrides: tuple[str, ...]) -> dict[str, str]:
    """The environment for a job whose ranks torch checks to call the same collectives with the same shapes:
    ranks that fall out of step fail with a report naming both calls, instead of failing later at an
    unrelated barrier. DeepSpeed only: with DDP on gloo, torch 2.13's checking wrapper segfaults."""
    checked = any(o.startswith("strategy=deepspeed") for o in overrides)
    return {**os.environ, **({"TORCH_DISTRIBUTED_DEBUG": "DETAIL"} if checked else {})}


def train(run_dir: Path, base: Path, *overrides: str) -> list[float]:
    """toolkit-train in `run_dir` (or, with from_run= among the overrides, a rerun on it); first losses."""
    rerun = any(o.startswith("from_run=") for o in overrides)
    args = [
        *COMMON,
        f"model.name_or_path={base}",
        *([] if rerun else [f"hydra.run.dir={run_dir}"]),
        *overrides,
    ]
    result = toolkit_train(args, run_dir.parent, timeout=900, env=checked_collectives(overrides))
    # every rank's errors, not only the last lines: a rank that dies first explains the others
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
    assert result.returncode == 0, "\n".join(errors[-20:]) + "\n...\n" + result.stderr[-2000:]
    metrics = pd.read_csv(run_dir / "csv" / "version_0" / "metrics.csv")
    return metrics.dropna(subset=["train/loss"]).sort_values("step")["train/loss"].tolist()


def checkpoint_step(path: Path) -> int:
    """global_step of a Lightning checkpoint: file, DeepSpeed directory or DCP directory."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    if (path / "latest").exists():
        states = sorted((path / "checkpoint").glob("*mp_rank_00_model_states.pt"))[0]
        return torch.load(states, map_location="cpu", weights_only=False)["global_step"]
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(path)["global_step"]


def run_load_lines(report: str) -> list[str]:
    """Every python load line of a report.md table, run as written in a fresh interpreter; returns them."""
    commands = re.findall(r"\| `((?:from|import) [^`]+)` \|", report)
    script = "\n".join([*commands, "print('loaded')"])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-2000:]
    return commands


def kill_after_a_checkpoint(run_dir: Path, base: Path, *overrides: str) -> int:
    """Start a training job, SIGKILL all its ranks at a random moment after its first checkpoint
    (mid-epoch, possibly mid-save), and return the step its last checkpoint holds."""
    args = [*COMMON, f"model.name_or_path={base}", f"hydra.run.dir={run_dir}", *overrides]
    job = subprocess.Popen(
        [str(TOOLKIT_TRAIN), *args],
        cwd=run_dir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=checked_collectives(overrides),
    )
    deadline = time.time() + 600
    while (
        not (run_dir / "checkpoints" / "last.ckpt").exists() and job.poll() is None and time.time() < deadline
    ):
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))
    os.killpg(job.pid, signal.SIGKILL)  # every rank at once, like a lost node
    job.wait()
    return checkpoint_step(existing_checkpoint(run_dir / "checkpoints" / "last.ckpt"))
