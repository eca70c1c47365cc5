"""Every strategy on 2 CPU ranks: first losses equal the single-process run, sharded checkpoints export
to HF/PEFT directories that hold the trained weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, BertModel

from toolkit.checkpoint import read_state_dict

from .conftest import TINY_BERT, save_tiny_pretrained

STRATEGIES = ["ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"]
# Dropout off (each rank would draw its own masks) and plain shuffling (length grouping sorts per rank):
# then 2 ranks x batch 8 see exactly the single process's batch of 16.
NO_DROPOUT = TINY_BERT.replace(
    "}", ",hidden_dropout_prob:0.0,attention_probs_dropout_prob:0.0,classifier_dropout:0.0}"
)
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


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from toolkit.assets import asset_path

    return save_tiny_pretrained(tmp_path_factory.mktemp("base"), NO_DROPOUT, BertModel, asset_path("minilm"))


def train(run_dir: Path, base: Path, *overrides: str) -> list[float]:
    args = [*COMMON, f"model.name_or_path={base}", f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(
        [str(Path(sys.executable).with_name("toolkit-train")), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=run_dir.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pd.read_csv(run_dir / "csv" / "version_0" / "metrics.csv")
    return metrics.dropna(subset=["train/loss"]).sort_values("step")["train/loss"].tolist()


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory, base_dir) -> list[float]:
    return train(tmp_path_factory.mktemp("single") / "run", base_dir, "data.batch_size=16")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_matches_single_process_and_exports_trained_weights(
    strategy, tmp_path, base_dir, single_losses
):
    run_dir = tmp_path / "run"
    losses = train(run_dir, base_dir, f"strategy={strategy}", "trainer.devices=2", "data.batch_size=8")
    torch.testing.assert_close(losses, single_losses, rtol=0, atol=1e-4)

    trained = read_state_dict(run_dir / "checkpoints" / "last.ckpt")  # sharded for ZeRO and FSDP2
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA weights in the checkpoint are empty"
    inputs = {
        "input_ids": torch.tensor([[101, 2307, 3185, 102], [101, 6659, 102, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }
    with torch.no_grad():
        merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "export" / "model").eval()
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
        adapted = PeftModel.from_pretrained(base, run_dir / "export" / "adapter").eval()
        torch.testing.assert_close(adapted(**inputs).logits, merged(**inputs).logits, atol=1e-5, rtol=1e-4)
    exported_b = {k: v for k, v in adapted.state_dict().items() if "lora_B" in k}
    assert len(exported_b) == len(lora_b) and all(v.abs().sum() > 0 for v in exported_b.values())
