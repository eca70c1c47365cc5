"""Preference tuning through the one training path: every stage of the DPO recipe, the reference model in
each of its three forms (adapter disabled, frozen copy, precomputed and cached), exact resume, and the
same losses on every strategy as in one process."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from toolkit.run.pipeline import run_pipeline
from toolkit.training.checkpoints import read_state_dict
from toolkit.training.reference import REFERENCE_CACHE

from .helpers import COMMON, compose_config, kill_after_a_checkpoint, toolkit_train, train

LN2 = math.log(2)


def preference_overrides(model_dir: Path, recipe: str = "nlp/smollm2_dpo") -> list[str]:
    return [
        f"recipe={recipe}",
        f"model.name_or_path={model_dir}",
        "data.max_train_examples=16",
        "data.max_eval_examples=8",
        "data.batch_size=4",
        "data.max_length=256",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "progress_bar=false",
    ]


def run(run_dir: Path, overrides: list[str]) -> pd.DataFrame:
    cfg = compose_config(overrides)
    assert run_pipeline(cfg, run_dir) == list(cfg.stages)
    return pd.read_csv(run_dir / "csv" / "version_0" / "metrics.csv")


def train_losses(metrics: pd.DataFrame) -> list[float]:
    return metrics.dropna(subset=["train/loss"]).sort_values("step")["train/loss"].tolist()


def test_dpo_recipe_runs_every_stage_against_the_base_model(tmp_path, tiny_llama_dir):
    """LoRA DPO: the reference is the adapter-disabled model, so the first loss is exactly log 2; every
    variant's rewards are measured against the base model (the base's own are zero)."""
    stages = "stages=[train,export,quantize,evaluate,report]"
    quantize = ["quantize=int8_weight_only", "quantize.max_metric_drop=1.0", "evaluate.max_new_tokens=3"]
    metrics = run(tmp_path, [*preference_overrides(tiny_llama_dir), stages, *quantize])
    losses = train_losses(metrics)
    assert losses[0] == pytest.approx(LN2, abs=1e-6)
    logged = metrics.dropna(subset=["train/reward_margin"])
    assert {"train/reward_accuracy", "train/rewards_chosen", "train/logps_rejected"} <= set(logged.columns)
    assert metrics["val/preference_accuracy"].notna().any()
    results = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert set(results) == {"base", "fine_tuned", "quantized"}
    base = results["base"]
    assert base["reward_accuracy"] == 0 and base["rewards_chosen"] == 0 and base["reward_margin"] == 0
    assert base["preference_loss"] == pytest.approx(LN2, abs=1e-6)
    for variant in ("fine_tuned", "quantized"):
        assert 0 <= results[variant]["preference_accuracy"] <= 1
        assert results[variant]["rewards_chosen"] != 0
    gate = json.loads((tmp_path / "quantize" / "gate.json").read_text())
    assert gate["metric"] == "preference_accuracy"
    samples = json.loads((tmp_path / "evaluate" / "samples.json").read_text())
    assert len(samples) == 4 and set(samples[0]["answers"]) == {"base", "fine_tuned", "quantized"}
    assert samples[0]["prompt"].endswith("<|im_start|>assistant\n") and samples[0]["reference"]
    report = (tmp_path / "report.md").read_text()
    assert "format `sharegpt_pairs` (pairs as given" in report and "| reward_accuracy |" in report


@pytest.mark.parametrize("recipe,first", [("nlp/smollm2_kto", 0.5), ("nlp/smollm2_orpo", None)])
def test_kto_and_orpo_recipes_train(tmp_path, tiny_llama_dir, recipe, first):
    """KTO at the first step: policy = reference and z0 = 0, so each example's loss is 1 - sigmoid(0). Its
    quantize gate measures reward accuracy against the base model."""
    stages = ["stages=[train,export,quantize]", "quantize=int8_weight_only", "quantize.max_metric_drop=1.0"]
    metrics = run(tmp_path, [*preference_overrides(tiny_llama_dir, recipe), *stages])
    gate = json.loads((tmp_path / "quantize" / "gate.json").read_text())
    assert gate["metric"] == ("reward_accuracy" if first else "preference_accuracy")
    assert 0 <= gate["quantized"] <= 1
    losses = train_losses(metrics)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    if first is not None:
        assert losses[0] == pytest.approx(first, abs=1e-6)
    if recipe.endswith("orpo"):
        assert metrics["train/nll"].notna().any()
    else:
        assert metrics["train/kl"].notna().any()


KILLABLE = [
    "recipe=nlp/smollm2_dpo",
    "adapter=none",
    "scheduler=constant",
    "data.max_train_examples=16",  # 4 steps an epoch: most kills land mid-epoch
    "data.max_eval_examples=8",
    "data.max_length=256",
    "data.batch_size=4",
    "trainer.max_steps=24",
    "trainer.max_epochs=10",
    "trainer.limit_val_batches=0",
    "checkpoint.every_n_train_steps=1",
    "stages=[train]",
]


@pytest.mark.faults
@pytest.mark.parametrize("form", [pytest.param("precomputed", marks=pytest.mark.slow), "frozen_copy"])
def test_a_full_fine_tune_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path, tiny_llama_dir, form
):
    """Full fine-tuning, the reference precomputed (cached in the run directory) or a frozen copy (kept out
    of checkpoints, rebuilt from the model's source): SIGKILL at a random moment after the first checkpoint,
    resume from last in a new job: the final weights equal an uninterrupted run's, bit for bit. The cached
    values are read back: the restored weights are no longer the reference; without the cache a resume is
    refused in one line, not computed wrong."""
    common = [*KILLABLE, *REFERENCE_FORMS[form]]
    losses = train(tmp_path / "straight", tiny_llama_dir, *common)
    assert losses[0] == pytest.approx(LN2, abs=1e-6) and losses[-1] != losses[0]
    killed = tmp_path / "killed"
    stopped_at = kill_after_a_checkpoint(killed, tiny_llama_dir, *common)
    assert stopped_at < 24, "the run finished before it could be killed"
    train(killed, tiny_llama_dir, *common, f"from_run={killed}", "resume=last")
    expected = read_state_dict(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    resumed = read_state_dict(killed / "checkpoints" / "last.ckpt")
    assert resumed.keys() == expected.keys() and not any("reference" in key for key in resumed)
    diff = max((resumed[k] - expected[k]).abs().max().item() for k in expected)
    assert diff == 0.0, f"{form}, killed after step {stopped_at}: max |dw| after resume = {diff}"
    if form == "precomputed":
        cache = json.loads((killed / REFERENCE_CACHE).read_text())
        assert len(cache["values"]["train"]["ref_chosen_logps"]) == 16
        (killed / REFERENCE_CACHE).unlink()
        rerun = [*COMMON, f"model.name_or_path={tiny_llama_dir}", *common, f"from_run={killed}",
                 "resume=last", "trainer.max_steps=26"]  # fmt: skip
        result = toolkit_train(rerun, tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert re.search(r"error: resuming a full fine-tune .* needs .*reference_logps.json", result.stderr)


STRATEGY_COMMON = [
    "recipe=nlp/smollm2_dpo",
    "data.max_train_examples=16",
    "data.max_eval_examples=8",
    "data.max_length=256",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
]
REFERENCE_FORMS = {
    "lora": [],
    "frozen_copy": ["adapter=none"],
    "precomputed": ["adapter=none", "task.precompute_reference=true"],
}


@pytest.fixture(scope="module")
def single_dpo_losses(tmp_path_factory, tiny_llama_dir):
    """First losses of one process, per reference form, once each."""
    losses: dict[str, list[float]] = {}

    def of(form: str) -> list[float]:
        if form not in losses:
            run_dir = tmp_path_factory.mktemp(f"dpo_single_{form}") / "run"
            overrides = [*STRATEGY_COMMON, *REFERENCE_FORMS[form], "data.batch_size=4"]
            losses[form] = train(run_dir, tiny_llama_dir, *overrides)
        return losses[form]

    return of


@pytest.mark.parametrize(
    "strategy,form",
    [("ddp", "lora"), ("deepspeed_zero3", "frozen_copy"), ("fsdp2", "frozen_copy"),
     ("deepspeed_zero3", "precomputed"),
     pytest.param("fsdp2", "lora", marks=pytest.mark.slow),
     pytest.param("fsdp2", "precomputed", marks=pytest.mark.slow)],
)  # fmt: skip
def test_dpo_on_two_ranks_matches_one_process(strategy, form, tmp_path, tiny_llama_dir, single_dpo_losses):
    """Each form of the reference gives one process's losses on 2 ranks: LoRA's adapter-disabled base; a
    full fine-tune's frozen copy, sharded like the policy (ZeRO-3: its own partitions and an engine without
    optimizer; FSDP2: fully_shard per block), kept out of checkpoints; and precomputed log-probabilities
    (every rank runs the sharded initial model over the data before the first step)."""
    run_dir = tmp_path / "run"
    losses = train(run_dir, tiny_llama_dir, *STRATEGY_COMMON, *REFERENCE_FORMS[form], f"strategy={strategy}",
                   "trainer.devices=2", "data.batch_size=2")  # fmt: skip
    expected = single_dpo_losses(form)
    assert expected[0] == pytest.approx(LN2, abs=1e-6)
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-5)
    assert (run_dir / REFERENCE_CACHE).exists() == (form == "precomputed")
    if form == "frozen_copy":  # each rank holds about half of the copy (ZeRO-3 keeps tiny tensors whole)
        line = re.search(r"this rank holds ([\d,]+) of ([\d,]+)", (run_dir / "train.log").read_text())
        assert line, "train.log has no 'reference model' line"
        held, total = (int(n.replace(",", "")) for n in line.groups())
        assert 0.45 < held / total < 0.55


@pytest.mark.slow  # ~40 min on 2 CPU cores: 60 real LoRA DPO steps of a 135M model on pairs of ~1,000 tokens
def test_dpo_recipe_as_written_prefers_the_chosen_answers_more_than_its_base(tmp_path):
    """The real SmolLM2-135M-Instruct, DPO-tuned by `nlp/smollm2_dpo` as written: on the held-out pairs, the
    tuned model gives the chosen answer the higher per-token log-probability more often than the base does,
    and its implicit reward ranks most pairs right (measured on 30 test pairs: preference accuracy 0.367 ->
    0.400, reward accuracy 0.600, margin +0.020: a weak signal; the recipe's steps and rate need tuning)."""
    cfg = compose_config(["recipe=nlp/smollm2_dpo", "stages=[train,export,evaluate]", "logger=none",
                          "progress_bar=false", "evaluate.samples=0"])  # fmt: skip
    assert run_pipeline(cfg, tmp_path) == ["train", "export", "evaluate"]
    results = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    base, tuned = results["base"], results["fine_tuned"]
    print({k: (base[k], tuned[k]) for k in ("preference_accuracy", "reward_accuracy", "reward_margin")})
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    assert tuned["reward_accuracy"] > 0.5 and tuned["reward_margin"] > 0
