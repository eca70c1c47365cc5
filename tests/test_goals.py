"""The issues' quality goals on the full data, run by hand (`pytest -m slow tests/test_goals.py`): minutes
to most of an hour on a 2-core CPU."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoImageProcessor, ViTForImageClassification

from toolkit.run.pipeline import run_pipeline
from toolkit.tasks.next_item import ndcg_ratio

from .helpers import FAST, compose_config


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["recsys/sasrec_movielens", "recsys/bert4rec_movielens"])
def test_recommenders_beat_popularity_twice_on_movielens(recipe, tmp_path):
    """NDCG@10 of the recipe as written at least twice the popularity baseline's on the same split.

    Measured: SASRec 0.0536 vs 0.0198 (2.71x), 30 epochs, 21 min on a 2-core CPU shared with another
    training; BERT4Rec 0.0403 (2.03x, at the edge), 200 epochs, 8.6 min."""
    cfg = compose_config([f"recipe={recipe}", *FAST])
    run_pipeline(cfg, tmp_path)
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert ndcg_ratio(metrics) >= 2.0, metrics


def accuracy_of(run_dir) -> float:
    return json.loads((run_dir / "evaluate" / "metrics.json").read_text())["fine_tuned"]["accuracy"]


@pytest.mark.slow
def test_vit_reaches_090_on_fashion_mnist(tmp_path):
    """Test accuracy of vision/vit_fashion_mnist as written at least 0.90.

    Measured: 0.9075 (60 epochs of the 96-wide ViT, ~45 min on the 2-core CPU). With 45 epochs: 0.9026 on
    the CPU and 0.8925 on an H200, about the run-to-run spread across devices."""
    run_pipeline(compose_config(["recipe=vision/vit_fashion_mnist", *FAST]), tmp_path)
    assert accuracy_of(tmp_path) >= 0.90


@pytest.mark.slow
def test_fashion_mnist_features_transfer_to_mnist(tmp_path):
    """vision/vit_lora_transfer from a 3-epoch Fashion-MNIST ViT beats the same LoRA on a randomly
    initialised ViT of the same shape on MNIST-5k: the gain is what transfers.

    Measured: 0.820 vs 0.764 (+5.6 points); ~7 min on the 2-core CPU."""
    source = tmp_path / "fashion_mnist"
    three_epochs = ["trainer.max_epochs=3", "stages=[train,export]"]
    run_pipeline(compose_config(["recipe=vision/vit_fashion_mnist", *FAST, *three_epochs]), source)
    pretrained = source / "export" / "model"
    random_init = tmp_path / "random_vit"
    ViTForImageClassification(AutoConfig.from_pretrained(pretrained)).save_pretrained(random_init)
    AutoImageProcessor.from_pretrained(pretrained).save_pretrained(random_init)
    accuracy = {}
    for name, model_dir in (("pretrained", pretrained), ("random", random_init)):
        cfg = compose_config(["recipe=vision/vit_lora_transfer", *FAST, f"model.name_or_path={model_dir}"])
        run_pipeline(cfg, tmp_path / name)
        accuracy[name] = accuracy_of(tmp_path / name)
    assert accuracy["pretrained"] >= accuracy["random"] + 0.03, accuracy
