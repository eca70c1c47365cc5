"""Image classification: image readers, shape checks, augmentation, metrics, the seed MLP, the recipes."""

from __future__ import annotations

import gzip
import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from toolkit.data.image_files import load_idx_dir
from toolkit.data.images import ImageClassificationData, horizontal_flip, random_crop
from toolkit.errors import ToolkitError
from toolkit.models.mlp import MLPForImageClassification
from toolkit.run.pipeline import run_pipeline
from toolkit.tasks.image_classification import ImageClassification

from .helpers import TINY_IMAGES, TINY_VIT, assert_no_run_left, compose_config, last_line, run_cli


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_read_back_exactly(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4))
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array([0, 1, 2, 1, 0]))
    splits = load_idx_dir(tmp_path)
    assert set(splits) == {"train", "test"}
    pixels, labels = splits["test"]
    assert pixels.shape == (5, 1, 3, 4) and pixels.dtype == torch.uint8
    assert np.array_equal(pixels[:, 0].numpy(), images) and labels.tolist() == [0, 1, 2, 1, 0]


def image_folder(root, size: tuple[int, int], mode: str = "RGB", odd: str | None = None):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            shape = (*size, 3) if mode == "RGB" else size
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")
    if odd:
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "dog" / odd)
    return root


def test_image_size_or_channel_mismatch_says_what_was_expected(tmp_path):
    root = image_folder(tmp_path / "pets", (32, 32))
    data = ImageClassificationData(str(root), image_size=28, num_channels=1, val_size=0.2, test_size=0.2)
    with pytest.raises(ToolkitError) as err:
        data.setup()
    assert str(err.value) == (
        "train images are 32x32 with 3 channels but the model expects 28x28 with 1 channel "
        "(data.image_size=28, data.num_channels=1); set data.resize=true to resize and convert them"
    )
    resized = ImageClassificationData(
        str(root), image_size=28, num_channels=1, resize=True, val_size=0.2, test_size=0.2
    )
    resized.setup()
    assert resized.label_names == ["cat", "dog"]
    batch = next(iter(resized.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 1, 28, 28) and set(batch["labels"].tolist()) <= {0, 1}


def test_a_test_split_of_another_size_is_refused_not_resized(tmp_path):
    image_folder(tmp_path / "pets" / "train", (28, 28), mode="L")
    image_folder(tmp_path / "pets" / "test", (32, 32), mode="L")
    data = ImageClassificationData(str(tmp_path / "pets"), image_size=28, num_channels=1, val_size=0.2)
    with pytest.raises(ToolkitError, match="^test images are 32x32 with 1 channel but the model expects 28"):
        data.setup()


def test_images_of_different_sizes_are_named(tmp_path):
    root = image_folder(tmp_path / "pets", (16, 16), odd="tiny.png")
    with pytest.raises(
        ToolkitError, match=r"image .*dog/tiny.png is 8x8 with 3 channels but .*cat/0.png is 16x16"
    ):
        ImageClassificationData(str(root), image_size=16, num_channels=3).setup()


def test_mismatch_from_the_command_line_exits_2_and_leaves_no_run(monkeypatch, tmp_path, capsys):
    args = ["recipe=vision/mlp_mnist_seed", "data.image_size=32", *TINY_IMAGES]
    code, err = run_cli(args, monkeypatch, tmp_path, capsys)
    assert code == 2
    assert last_line(err).startswith("error: train images are 28x28 with 1 channel but the model expects 32")
    assert_no_run_left(tmp_path)


def test_augmentation_shifts_and_flips_without_changing_content():
    torch.manual_seed(0)
    images = torch.zeros(4, 1, 10, 10)
    images[:, :, 4:6, 4:6] = 1.0  # a centred square survives any shift of up to 2 pixels
    shifted = random_crop(images, padding=2)
    assert shifted.shape == images.shape and shifted.sum((1, 2, 3)).tolist() == [4.0] * 4
    assert not all(torch.equal(s, images[0]) for s in shifted), "some image moved"
    assert torch.equal(random_crop(images, padding=0), images)
    ramp = torch.arange(6.0).view(1, 1, 2, 3).expand(2, 1, 2, 3)
    assert torch.equal(horizontal_flip(ramp, prob=1.0), ramp.flip(-1))
    assert torch.equal(horizontal_flip(ramp, prob=0.0), ramp)


def test_augmentation_is_configured_in_yaml_and_only_for_training():
    cfg = compose_config(["recipe=vision/vit_fashion_mnist", TINY_VIT, "data.augment.crop_padding=3"])
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    assert data.augment == {"crop_padding": 3, "horizontal_flip": 0.5}
    data.max_train_examples, data.max_eval_examples = 8, 8
    data.setup()
    assert data.mean == pytest.approx([0.286], abs=0.02) and data.std == pytest.approx([0.353], abs=0.02)
    images = data.splits["test"].images[:4]
    torch.testing.assert_close(data.pixel_values(images, train=False), data.pixel_values(images, train=False))
    torch.manual_seed(1)
    assert not torch.equal(data.pixel_values(images, train=True), data.pixel_values(images, train=False))


def test_classification_metrics_and_confusion_match_hand_computed_values():
    task = ImageClassification(num_labels=3)
    preds = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    labels = torch.tensor([0, 1, 1, 2, 2, 0, 1])
    metrics = task.metrics()
    metrics.update(preds, labels)
    values = {k: float(v) for k, v in metrics.compute().items()}
    # per class precision 2/3, 1/2, 1/2; recall 1, 1/3, 1/2; F1 4/5, 2/5, 1/2
    assert values == pytest.approx(
        {"accuracy": 4 / 7, "precision_macro": 5 / 9, "recall_macro": 11 / 18, "f1_macro": 1.7 / 3}
    )

    def one_hot_model(pixel_values, labels=None):  # the "pixel" holds the prediction
        return SimpleNamespace(logits=torch.nn.functional.one_hot(pixel_values.long().flatten(), 3).float())

    loader = [{"pixel_values": preds[:4].float(), "labels": labels[:4]},
              {"pixel_values": preds[4:].float(), "labels": labels[4:]}]  # fmt: skip
    one_hot_model.eval = lambda: None
    matrix = task.confusion(one_hot_model, loader).compute()
    assert matrix.tolist() == [[2, 0, 0], [1, 1, 1], [0, 1, 1]]  # rows: true class, columns: predicted


def test_seed_mlp_is_a_registered_transformers_model(tmp_path):
    config = AutoConfig.for_model("toolkit_mlp", num_labels=10)
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(config).eval()
    assert isinstance(model, MLPForImageClassification)
    assert [tuple(p.shape) for p in model.parameters()] == [(500, 784), (500,), (10, 500), (10,)]
    assert model.hidden[0].weight.abs().max() <= 1 / 784**0.5  # PyTorch's own Linear init, as the seed
    x = torch.rand(3, 1, 28, 28)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)
        loss = model(pixel_values=x, labels=torch.tensor([1, 2, 3])).loss
    assert loss == pytest.approx(
        float(torch.nn.functional.cross_entropy(model(pixel_values=x).logits, torch.tensor([1, 2, 3]))),
    )


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """The Fashion-MNIST ViT recipe, tiny, through train, export, evaluate."""
    run_dir = tmp_path_factory.mktemp("vit_run")
    cfg = compose_config(["recipe=vision/vit_fashion_mnist", TINY_VIT, *TINY_IMAGES])
    assert run_pipeline(cfg, run_dir) == ["train", "export", "evaluate", "report"]
    return cfg, run_dir


def test_vit_recipe_end_to_end_with_confusion_matrix(vit_run):
    cfg, run_dir = vit_run
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"base", "fine_tuned", "majority"}
    assert {"accuracy", "precision_macro", "recall_macro", "f1_macro"} <= set(metrics["fine_tuned"])
    confusion = json.loads((run_dir / "evaluate" / "confusion_matrix.json").read_text())
    counts = torch.tensor(confusion["counts"])
    assert confusion["variant"] == "fine_tuned" and counts.shape == (10, 10) and counts.sum() == 32
    assert float(counts.diag().sum() / 32) == pytest.approx(metrics["fine_tuned"]["accuracy"])
    assert confusion["labels"][0] == "T-shirt/top"
    png = (run_dir / "evaluate" / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_exported_vit_and_processor_reproduce_the_pipeline(vit_run):
    cfg, run_dir = vit_run
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    data.setup()
    images = data.splits["test"].images[:4]
    processor = AutoImageProcessor.from_pretrained(run_dir / "export" / "model")
    raw = [Image.fromarray(img[0].numpy()) for img in images]
    expected = data.pixel_values(images, train=False)
    torch.testing.assert_close(processor(images=raw, return_tensors="pt")["pixel_values"], expected)
    model = AutoModelForImageClassification.from_pretrained(run_dir / "export" / "model").eval()
    assert model.config.image_size == 28 and model.config.num_channels == 1 and model.config.num_labels == 10


def test_lora_transfer_recipe_from_the_exported_vit(vit_run, tmp_path):
    _, vit_dir = vit_run
    exported = vit_dir / "export" / "model"
    cfg = compose_config(["recipe=vision/vit_lora_transfer", f"model.name_or_path={exported}", *TINY_IMAGES])
    assert run_pipeline(cfg, tmp_path) == ["train", "export", "evaluate", "report"]
    adapter = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    every_linear = ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(adapter["target_modules"]) == every_linear and adapter["modules_to_save"] == ["classifier"]
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"base", "fine_tuned", "majority"}
    assert metrics["majority"]["accuracy"] < 0.25  # MNIST-5k test digits are balanced


def test_adapter_none_on_a_lora_recipe_is_full_fine_tuning(vit_run, tmp_path):
    """The transfer recipe sets LoRA values (rank, modules_to_save) of its own; adapter=none drops them
    (they used to reach PEFT without target_modules and fail) and trains every weight."""
    _, vit_dir = vit_run
    exported = vit_dir / "export" / "model"
    overrides = ["recipe=vision/vit_lora_transfer", f"model.name_or_path={exported}", *TINY_IMAGES]
    cfg = compose_config([*overrides, "adapter=none", "stages=[train,export]"])
    assert cfg.adapter.r == 8 and "method" not in cfg.adapter  # the recipe's values arrive alone
    assert run_pipeline(cfg, tmp_path) == ["train", "export"]
    assert not (tmp_path / "export" / "adapter").exists()
    trained = AutoModelForImageClassification.from_pretrained(tmp_path / "export" / "model")
    start = AutoModelForImageClassification.from_pretrained(exported)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert "vit.layers.0.attention.q_proj.weight" in changed
    assert len(changed) == len(list(start.parameters()))


def test_seed_mlp_recipe_end_to_end(tmp_path):
    cfg = compose_config(["recipe=vision/mlp_mnist_seed", *TINY_IMAGES])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.data.batch_size, cfg.trainer.max_epochs) == (
        1e-3,
        0.9,
        16,
        10,
    )
    assert cfg.data.normalize is False and cfg.trainer.gradient_clip_val is None
    assert not any(cfg.data.augment.values())  # the document trains on plain pixels
    fashion = compose_config(["recipe=vision/mlp_mnist_seed", "data=fashion_mnist"])
    assert not any(fashion.data.augment.values()) and fashion.data.batch_size == 64
    assert run_pipeline(cfg, tmp_path) == ["train", "export", "evaluate", "report"]
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "export" / "model")
    assert isinstance(model, MLPForImageClassification)


def test_hub_vit_recipe_runs_with_a_tiny_checkpoint(tiny_vit_rgb_dir, tmp_path):
    """vit_base_lora as written (resize to the checkpoint's RGB input, new head, LoRA), tiny 32x32 ViT."""
    overrides = [f"model.name_or_path={tiny_vit_rgb_dir}", "data.image_size=32", "data.eval_batch_size=32"]
    cfg = compose_config(["recipe=vision/vit_base_lora", *overrides, *TINY_IMAGES])
    assert cfg.data.resize and cfg.data.num_channels == 3 and list(cfg.data.mean) == [0.5, 0.5, 0.5]
    assert run_pipeline(cfg, tmp_path) == ["train", "export", "evaluate", "report"]
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "export" / "model")
    assert model.config.num_labels == 10 and model.classifier.out_features == 10  # the 3-class head replaced


def test_hf_image_dataset_with_class_names(tmp_path):
    """The `load_dataset` path (hub datasets such as fashion_mnist look the same): image + ClassLabel."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(10)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["even", "odd"])})
    path = tmp_path / "digits.parquet"
    table = Dataset.from_dict({"image": images, "label": [i % 2 for i in range(10)]}, features=features)
    table.to_parquet(path)
    data = ImageClassificationData(str(path), val_size=0.2, test_size=0.2)
    data.setup()
    assert data.label_names == ["even", "odd"]
    assert {s: len(d) for s, d in data.splits.items()} == {"train": 6, "validation": 2, "test": 2}
    original = torch.stack([torch.from_numpy(np.asarray(im))[None] for im in images])
    assert any(torch.equal(data.splits["test"].images[0], img) for img in original)
