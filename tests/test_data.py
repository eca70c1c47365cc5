"""Data modules on local files of every supported format, fixed splits, and the SFT answer parser."""

from __future__ import annotations

import pytest

from toolkit.errors import ToolkitError
from toolkit.run.build import total_training_steps
from toolkit.tasks.causal_lm import CausalLM

from .helpers import ROWS, compose_config, data_module

WRITERS = {
    "csv": lambda df, p: df.to_csv(p, index=False),
    "jsonl": lambda df, p: df.to_json(p, orient="records", lines=True),
    "parquet": lambda df, p: df.to_parquet(p),
    "csv.gz": lambda df, p: df.to_csv(p, index=False, compression="gzip"),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_local_files_of_each_format_load_and_split_the_same_way(tmp_path, fmt):
    path = tmp_path / f"reviews.{fmt}"
    WRITERS[fmt](ROWS, path)
    data = data_module(path)
    data.setup()
    assert {s: len(data.splits[s]) for s in data.splits} == {"train": 30, "validation": 10, "test": 10}
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and set(batch["labels"].tolist()) <= {0, 1}
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1], "padded to the longest only"


def test_split_is_fixed_by_seed_and_format_independent(tmp_path):
    WRITERS["csv"](ROWS, tmp_path / "a.csv")
    WRITERS["parquet"](ROWS, tmp_path / "a.parquet")
    fingerprints = [data_module(tmp_path / name).split_fingerprints() for name in ("a.csv", "a.parquet")]
    assert fingerprints[0] == fingerprints[1]
    other_seed = data_module(tmp_path / "a.csv", seed=7).split_fingerprints()
    assert other_seed["test"] != fingerprints[0]["test"]


def test_unknown_file_format_is_refused(tmp_path):
    path = tmp_path / "reviews.xlsx"
    path.write_text("x")
    with pytest.raises(ToolkitError, match=r"data.path '.*reviews.xlsx' has an unknown format; valid: .csv"):
        data_module(path).setup()


def test_generated_answer_parser_takes_the_first_choice_that_appears():
    task = CausalLM(tokenizer="unused", answer_choices=["negative", "positive"])
    assert task.parse("Positive.") == 1
    assert task.parse("The review is negative, not positive") == 0
    assert task.parse("The movie review is about a film") == -1


def test_total_steps_follow_the_data_length_not_the_trainer():
    overrides = [
        "recipe=quickstart",
        "trainer.devices=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_epochs=3",
    ]
    trainer = compose_config(overrides).trainer
    # 50 examples per rank -> 7 batches -> 4 optimizer steps per epoch (accumulating 2), 3 epochs
    assert total_training_steps(trainer, batch_size=8, n_train=100) == 12
    trainer = compose_config([*overrides, "trainer.max_steps=5"]).trainer
    assert total_training_steps(trainer, batch_size=8, n_train=100) == 5


def test_early_stopping_is_configured_from_the_primary_metric(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from toolkit.training.trainer import build_trainer

    cfg = compose_config(
        ["recipe=quickstart", "early_stopping.patience=2", "logger=none", "progress_bar=false"]
    )
    stopper = [
        c
        for c in build_trainer(cfg, tmp_path, "val/accuracy", "max").callbacks
        if isinstance(c, EarlyStopping)
    ]
    assert len(stopper) == 1 and stopper[0].monitor == "val/accuracy" and stopper[0].patience == 2
