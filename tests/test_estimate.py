"""toolkit-estimate: exact model-state counts, the sharding arithmetic, and a check against the bytes one
ZeRO-3 rank really held (its checkpoint shard)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from toolkit.config import compose_config, config_dir
from toolkit.models.build import build_model
from toolkit.training.memory import GB, SHARDING, estimate, per_device

from .conftest import TINY_BERT, toolkit_train

FULL = ["recipe=quickstart", TINY_BERT, "adapter=none", "trainer.devices=2", "data.batch_size=8"]


def test_model_states_are_exact_counts():
    cfg = compose_config([*FULL, "strategy=deepspeed_zero3"])
    rows = estimate(cfg)
    model = build_model(AutoModelForSequenceClassification, None, dict(cfg.model.config), num_labels=2)
    n = sum(p.numel() for p in model.parameters())
    assert rows["ddp"]["parameters"] == rows["ddp"]["gradients"] == 4 * n  # fp32, full fine-tune
    assert rows["ddp"]["optimizer"] == 8 * n  # AdamW's two fp32 moments
    assert rows["deepspeed_zero1"]["optimizer"] == 4 * n and rows["deepspeed_zero1"]["gradients"] == 4 * n
    assert rows["deepspeed_zero3"]["parameters"] == rows["fsdp2"]["parameters"] == 2 * n
    assert rows["deepspeed_zero3_offload"]["optimizer"] == rows["fsdp2_offload"]["parameters"] == 0
    assert all(row["activations"] > 0 for row in rows.values())


def test_lora_states_count_only_trainable_gradients_and_moments():
    cfg = compose_config(["recipe=quickstart", TINY_BERT, "trainer.devices=2"])
    row = estimate(cfg)["ddp"]
    assert row["gradients"] < row["parameters"] / 10 and row["optimizer"] == 2 * row["gradients"]


def test_sharding_arithmetic():
    from toolkit.training.memory import ModelStates

    states = ModelStates(parameters=800, gradients=800, optimizer=1600)
    assert per_device(states, "deepspeed_zero2", 4) == {"parameters": 800, "gradients": 200, "optimizer": 400}
    assert per_device(states, "deepspeed_zero2_offload", 4)["optimizer"] == 0


def test_estimate_matches_what_a_zero3_rank_holds(tmp_path):
    """ZeRO-3 rank r's optimizer shard file holds its fp32 parameter partition and both Adam moments:
    the estimate's parameters + optimizer per device, to within DeepSpeed's partition padding."""
    run_dir = tmp_path / "run"
    args = [
        *FULL,
        "strategy=deepspeed_zero3",
        "trainer.accelerator=cpu",
        "trainer.max_steps=1",
        "data.max_train_examples=32",
        "data.max_eval_examples=8",
        "logger=none",
        "progress_bar=false",
        "stages=[train]",
        f"hydra.run.dir={run_dir}",
    ]
    result = toolkit_train(args, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    row = estimate(compose_config([*FULL, "strategy=deepspeed_zero3"]))["deepspeed_zero3"]
    expected = row["parameters"] + row["optimizer"]
    for rank in (0, 1):
        shard = next(
            (run_dir / "checkpoints" / "last.ckpt" / "checkpoint").glob(f"zero_pp_rank_{rank}_*optim*")
        )
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        held = sum(t.numel() * t.element_size() for t in tensors(state))
        assert abs(held - expected) / expected < 0.02, (
            f"rank {rank}: held {held / GB:.4f} GiB, estimated {expected / GB:.4f}"
        )


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from tensors(value)


def test_every_strategy_config_has_a_sharding_entry():
    """The estimator, the strategy tests and the benchmark all enumerate strategies from SHARDING."""
    configs = {p.stem for p in (Path(config_dir()) / "strategy").glob("*.yaml")}
    assert configs == set(SHARDING)
