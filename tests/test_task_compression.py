"""Quantize, prune and distill work for every task, not only the text ones: image classification (ViT and the
seed MLP) and next-item recommendation (SASRec and BERT4Rec), each tiny, trained once per module.

Sizes are not compared here: on 16-wide tiny layers int8's per-row scales outweigh the bytes saved.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoConfig

from toolkit.compress.quantize import quantize_model, save_quantized
from toolkit.run.build import build_data_and_task
from toolkit.run.pipeline import run_pipeline
from toolkit.tasks.base import model_inputs

from .helpers import (
    TINY_BERT4REC,
    TINY_IMAGES,
    TINY_RECSYS,
    TINY_SASREC,
    TINY_VIT,
    compose_config,
    copy_run,
    quantize_cfg,
    run_load_lines,
)

TASKS = {
    "vit": ["recipe=vision/vit_fashion_mnist", TINY_VIT, *TINY_IMAGES],
    "mlp": ["recipe=vision/mlp_mnist_seed", *TINY_IMAGES],
    "sasrec": ["recipe=recsys/sasrec_movielens", TINY_SASREC, *TINY_RECSYS],
    "bert4rec": ["recipe=recsys/bert4rec_movielens", TINY_BERT4REC, *TINY_RECSYS],
}
PRIMARY = {"vit": "accuracy", "mlp": "accuracy", "sasrec": "ndcg@10", "bert4rec": "ndcg@10"}


@pytest.fixture(scope="module", params=list(TASKS))
def task_run(request, tmp_path_factory):
    """(name, cfg, run directory) of one tiny trained and exported run per task."""
    run_dir = tmp_path_factory.mktemp(f"{request.param}_run")
    student = "distill.student.num_hidden_layers=1"
    cfg = compose_config([*TASKS[request.param], "stages=[train,export]", student])
    assert run_pipeline(cfg, run_dir) == ["train", "export"]
    return request.param, cfg, run_dir


def first_test_batch(cfg) -> dict[str, torch.Tensor]:
    data, _ = build_data_and_task(cfg)
    data.setup("test")
    return model_inputs(next(iter(data.test_dataloader())))


def outputs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("embeddings", [True, False], ids=["with_embeddings", "linear_only"])
def test_every_task_quantizes_and_reloads_identically(task_run, embeddings, tmp_path):
    name, cfg, run_dir = task_run
    task = instantiate(cfg.task)
    source = run_dir / "export" / "model"
    q = quantize_cfg("int8_dynamic")
    model = quantize_model(source, task.auto_class, instantiate(q.quantization_config), embeddings)
    save_quantized(model, tmp_path / "q")
    reloaded = task.auto_class.from_pretrained(tmp_path / "q").eval()
    batch = first_test_batch(cfg)
    torch.testing.assert_close(outputs(reloaded, batch), outputs(model, batch), atol=0, rtol=0)
    fp32 = outputs(task.auto_class.from_pretrained(source).eval(), batch)
    assert (outputs(model, batch) - fp32).abs().max() < 0.05 * fp32.abs().max()  # quantized, not broken
    weight_types = {type(m.weight).__name__ for m in reloaded.modules() if isinstance(m, torch.nn.Linear)}
    assert weight_types - {"Parameter"}, f"no linear layer was quantized: {weight_types}"
    embedding = reloaded.get_input_embeddings()
    if embeddings and name in ("sasrec", "bert4rec"):  # the item embedding also scores every item
        assert type(embedding.weight).__name__ != "Parameter"


def test_every_task_runs_prune_distill_quantize_and_evaluate(task_run, tmp_path):
    name, cfg, _ = task_run
    run_dir = copy_run(task_run[1:], tmp_path)
    stages = ["prune", "distill", "quantize", "evaluate", "report"]
    cfg = OmegaConf.merge(cfg, {"stages": stages, "quantize": {"max_metric_drop": None}})
    assert run_pipeline(cfg, run_dir) == stages
    # the report's load lines work as written for the toolkit's own model types too (they import them)
    model_lines = [c for c in run_load_lines((run_dir / "report.md").read_text()) if "from_pretrained" in c]
    assert len(model_lines) == 4  # fine-tuned, pruned, distilled, quantized
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    for variant in ("base", "fine_tuned", "pruned", "distilled", "quantized"):
        assert 0.0 <= metrics[variant][PRIMARY[name]] <= 1.0, (variant, metrics[variant])
        assert metrics[variant]["size_bytes"] > 0 and metrics[variant]["latency_ms_single"] > 0
    sparsity = json.loads((run_dir / "prune" / "summary.json").read_text())["sparsity"]
    assert sparsity == pytest.approx(0.3, abs=1e-3)


def test_exported_image_classifiers_name_their_labels(task_run):
    """id2label comes from the data's class names, so HF clients show `Sneaker`, not `LABEL_7`."""
    name, cfg, run_dir = task_run
    if name not in ("vit", "mlp"):
        pytest.skip("recommenders have no labels")
    config = AutoConfig.from_pretrained(run_dir / "export" / "model")
    names = list(cfg.data.label_names)
    assert [config.id2label[i] for i in range(len(names))] == names
    assert config.label2id == {n: i for i, n in enumerate(names)}
