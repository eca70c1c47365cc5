"""End-to-end tiny runs through train -> export -> evaluate; artifacts load with the HF/PEFT loaders."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from toolkit.models.build import build_model
from toolkit.run.build import build_data_and_task, build_module, model_kwargs
from toolkit.training.checkpoints import find_checkpoint, load_weights
from toolkit.training.trainer import build_trainer

from .helpers import TINY_CLASSIFIER, compose_config

CLASSIFIER_METRICS = {
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "size_bytes",
    "latency_ms",
    "latency_ms_single",
}


def trained_module(cfg, run_dir):
    """The model as training left it: a fresh module with the run's checkpoint loaded."""
    data, task = build_data_and_task(cfg)
    module = build_module(cfg, task, data.tokenizer.pad_token_id)
    module.configure_model()
    load_weights(module, find_checkpoint(run_dir))
    return data, task, module.eval()


def first_test_batch(data):
    data.setup("test")
    return next(iter(data.test_dataloader()))


@pytest.mark.parametrize(
    "run_fixture,auto_class",
    [("classifier_run", AutoModelForSequenceClassification), ("sft_run", AutoModelForCausalLM)],
)
def test_exported_model_and_adapter_reproduce_the_trained_model(request, run_fixture, auto_class):
    cfg, run_dir = request.getfixturevalue(run_fixture)
    data, task, module = trained_module(cfg, run_dir)
    batch = first_test_batch(data)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = module.model(**inputs).logits
        merged = auto_class.from_pretrained(run_dir / "export" / "model").eval()
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
        base = build_model(
            task.auto_class, **model_kwargs(cfg, data.tokenizer.pad_token_id), **task.model_kwargs()
        )
        adapted = PeftModel.from_pretrained(base, run_dir / "export" / "adapter").eval()
        torch.testing.assert_close(adapted(**inputs).logits, expected, atol=1e-6, rtol=1e-5)
    assert (run_dir / "export" / "model" / "tokenizer.json").exists()
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name], "temporary directories left behind"


def test_classifier_metrics_json(classifier_run):
    _, run_dir = classifier_run
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"base", "fine_tuned", "majority"}
    for variant in ("base", "fine_tuned"):
        assert set(metrics[variant]) == CLASSIFIER_METRICS
        assert all(0.0 <= metrics[variant][k] <= 1.0 for k in ("accuracy", "f1_macro"))
        assert metrics[variant]["size_bytes"] > 1_000_000
    assert 0.5 <= metrics["majority"]["accuracy"] <= 1.0
    split = json.loads((run_dir / "data_split.json").read_text())
    assert {s: split[s]["rows"] for s in split} == {"train": 64, "validation": 32, "test": 32}


def test_sft_metrics_json(sft_run):
    _, run_dir = sft_run
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"base", "fine_tuned", "majority"}
    for variant in ("base", "fine_tuned"):
        assert metrics[variant]["perplexity"] > 1.0
        assert 0.0 <= metrics[variant]["gen_accuracy"] <= 1.0
    assert 0.5 <= metrics["majority"]["gen_accuracy"] <= 1.0


def test_sft_loss_covers_the_answer_only(sft_run):
    cfg, _ = sft_run
    data, _ = build_data_and_task(cfg)
    data.setup("fit")
    row = data.splits["train"][0]
    answer = [t for t in row["labels"] if t != -100]
    tokenizer = data.tokenizer
    assert tokenizer.decode(answer).strip() in {"positive<|im_end|>", "negative<|im_end|>"}
    assert row["input_ids"][: len(row["prompt_input_ids"])] == row["prompt_input_ids"]
    assert tokenizer.decode(row["prompt_input_ids"]).endswith("<|im_start|>assistant\n")


def test_lora_trains_only_adapter_weights_and_merge_matches(tmp_path, tiny_bert_dir):
    cfg = compose_config([*TINY_CLASSIFIER, f"model.name_or_path={tiny_bert_dir}", "model.config=null"])
    L.seed_everything(cfg.seed)
    data, task = build_data_and_task(cfg)
    data.setup("fit")
    module = build_module(cfg, task, data.tokenizer.pad_token_id, total_steps=6)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    build_trainer(cfg, tmp_path, "val/accuracy", "max").fit(module, datamodule=data)
    after = dict(module.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert changed and changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:3]}"
    assert any("lora_B" in n for n in changed) and any("modules_to_save" in n for n in changed)
    batch = first_test_batch(data)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    module.model.eval()
    with torch.no_grad():
        unmerged = module.model(**inputs).logits
        merged = module.model.merge_and_unload()(**inputs).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_exported_classifier_names_its_labels_for_any_hf_client(classifier_run):
    """id2label from data.label_names: a transformers pipeline answers `fresh`, not `LABEL_1`."""
    from transformers import pipeline

    _, run_dir = classifier_run
    classify = pipeline("text-classification", model=str(run_dir / "export" / "model"))
    assert {r["label"] for r in classify(["a wonderful film", "a dull mess"])} <= {"rotten", "fresh"}
