"""Pruning and distillation stages: what they write, what they change, and how the report shows it."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, BertConfig

from toolkit.compress.distill import distillation_loss
from toolkit.compress.prune import body_linears, prune_model
from toolkit.errors import ToolkitError
from toolkit.run.pipeline import run_pipeline

from .helpers import copy_run


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_prune_stage_zeroes_the_body_and_the_report_says_size_is_unchanged(classifier_run, tmp_path):
    cfg, _ = classifier_run
    run_dir = copy_run(classifier_run, tmp_path)
    cfg = OmegaConf.merge(cfg, {"stages": ["prune", "evaluate", "report"], "prune": {"amount": 0.5}})
    assert run_pipeline(cfg, run_dir) == ["prune", "evaluate", "report"]
    tuned = AutoModelForSequenceClassification.from_pretrained(run_dir / "export" / "model")
    pruned = AutoModelForSequenceClassification.from_pretrained(run_dir / "prune" / "model")
    body = {name for name, _ in body_linears(pruned)}
    before, after = linear_weights(tuned), linear_weights(pruned)
    zeros = sum(int((after[n] == 0).sum()) for n in body)
    assert zeros == pytest.approx(0.5 * sum(after[n].numel() for n in body), abs=1)
    torch.testing.assert_close(after["classifier"], before["classifier"], atol=0, rtol=0)  # head untouched
    kept = [n for n in body if (after[n] != 0).any()]
    assert all(torch.equal(after[n][after[n] != 0], before[n][after[n] != 0]) for n in kept)
    summary = json.loads((run_dir / "prune" / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["pruned"]["size_bytes"] == pytest.approx(metrics["fine_tuned"]["size_bytes"], rel=0.01)
    report = (run_dir / "report.md").read_text()
    assert "| pruned model |" in report and "stored dense" in report


def test_structured_pruning_removes_whole_rows():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = AutoModelForSequenceClassification.from_config(config)
    stats = prune_model(model, amount=0.25, structured=True)
    for _, module in body_linears(model):
        zero_rows = int((module.weight == 0).all(dim=1).sum())
        assert zero_rows == round(0.25 * module.out_features)
    assert stats["sparsity"] == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("amount", [0.0, 1.5])
def test_prune_amount_must_be_a_fraction(amount):
    model = AutoModelForSequenceClassification.from_config(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    with pytest.raises(ToolkitError, match=f"prune.amount={amount} must be a fraction between 0 and 1"):
        prune_model(model, amount)


def test_distillation_loss_is_zero_for_the_teacher_itself_and_ignores_unlabelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[:, 3:] = 1
    assert distillation_loss(logits, logits.clone(), labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    # logits at t predict token t+1: positions 0 and 1 (next token unlabelled) and 4 (nothing follows) are out
    other[:, [0, 1, 4]] += torch.randn(2, 3, 7)
    assert distillation_loss(logits, other, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    other[:, 2] += 1.0 + torch.randn(2, 7)  # position 2 predicts labelled token 3
    assert distillation_loss(logits, other, labels, 2.0).item() > 0.01
    flat = torch.randn(4, 2)
    assert distillation_loss(flat, flat + torch.tensor([0.0, 3.0]), torch.zeros(4), 1.0).item() > 0.1


@pytest.mark.parametrize("run_fixture", ["classifier_run", "sft_run"])
def test_distilled_student_is_smaller_trained_and_quantized_next(request, run_fixture, tmp_path):
    run = request.getfixturevalue(run_fixture)
    run_dir = copy_run(run, tmp_path)
    cfg = OmegaConf.merge(
        run[0],
        {
            "stages": ["distill", "quantize", "evaluate"],
            "distill": {"student": {"num_hidden_layers": 1}, "lr": 1e-3},
            "trainer": {"max_steps": 3, "val_check_interval": 3},
            "quantize": {"max_metric_drop": None},
        },
    )
    assert run_pipeline(cfg, run_dir) == ["distill", "quantize", "evaluate"]
    task_class = instantiate(run[0].task).auto_class
    student = task_class.from_pretrained(run_dir / "distill" / "model")
    teacher = task_class.from_pretrained(run_dir / "export" / "model")
    assert student.config.num_hidden_layers == 1 < teacher.config.num_hidden_layers
    # initialised from the teacher where shapes match, then trained: close to it but moved
    name = "embeddings.word_embeddings.weight" if run_fixture == "classifier_run" else "embed_tokens.weight"
    s = dict(student.named_parameters())[f"{student.base_model_prefix}.{name}"]
    t = dict(teacher.named_parameters())[f"{teacher.base_model_prefix}.{name}"]
    assert not torch.equal(s, t) and (s - t).abs().max() < 0.05
    assert str(run_dir / "distill" / "model") in (run_dir / "quantize" / "model" / "README.md").read_text()
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert {"fine_tuned", "distilled", "quantized"} <= set(metrics)
    assert metrics["distilled"]["size_bytes"] < metrics["fine_tuned"]["size_bytes"]
