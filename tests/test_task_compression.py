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

from toolkit.compress.quantize import quantize_model, save_quantized
from toolkit.run.build import build_data_and_task
from toolkit.run.pipeline import run_pipeline
from toolkit.tasks.base import model_inputs

from .conftest import TINY_VIT, compose_config
from .test_quantize import copy_run, quantize_cfg
from .test_recsys import TINY_BERT4REC, TINY_RECSYS, TINY_SASREC
from .test_vision import TINY_IMAGES

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
    stages = ["prune", "distill", "quantize", "evaluate"]
    cfg = OmegaConf.merge(cfg, {"stages": stages, "quantize": {"max_metric_drop": None}})
    assert run_pipeline(cfg, run_dir) == stages
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    for variant in ("base", "fine_tuned", "pruned", "distilled", "quantized"):
        assert 0.0 <= metrics[variant][PRIMARY[name]] <= 1.0, (variant, metrics[variant])
        assert metrics[variant]["size_bytes"] > 0 and metrics[variant]["latency_ms_single"] > 0
    sparsity = json.loads((run_dir / "prune" / "summary.json").read_text())["sparsity"]
    assert sparsity == pytest.approx(0.3, abs=1e-3)
