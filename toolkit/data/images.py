"""Image classification data: labelled images, tensor-only augmentation, and the image processor to export.

Images are held as uint8 tensors and turned into `pixel_values` per batch: optional resize / channel
conversion to the model's input, scale to [0, 1], train-time augmentation (random crop with zero padding,
horizontal flip; set in YAML), then normalisation by the training split's per-channel mean and std (or given
values, e.g. a pretrained checkpoint's). Export saves the matching `ViTImageProcessor`, so users preprocess
raw images the same way with `AutoImageProcessor.from_pretrained(export/model)`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; no display
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import ViTImageProcessor

import toolkit.models.mlp  # noqa: F401  (registers its model types)
from toolkit.data.image_files import describe_shape, load_images
from toolkit.data.samplers import SplitLoaders
from toolkit.errors import ToolkitError

SPLITS = ("train", "validation", "test")


class ImageSet(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) -> `channels` channels: grey repeated to RGB, RGB averaged to grey; alpha dropped."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 4:
        images = images[:, :3]
    if channels == 3 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if channels == 1 and images.shape[1] == 3:
        return images.float().mean(1, keepdim=True).round().to(images.dtype)
    raise ToolkitError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to `padding` pixels (zero fill): a crop of the zero-padded image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets.tolist())])


def horizontal_flip(
    images: torch.Tensor, prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator) < prob
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class ImageClassificationData(SplitLoaders):
    """Labelled images -> {pixel_values (B, C, H, W) float, labels (B,)}; see the module docstring."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        label_names: list[str] | None = None,
        image_size: int = 28,
        num_channels: int = 1,
        resize: bool = False,
        normalize: bool = True,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augment: dict[str, float] | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_size: float = 0.1,
        test_size: float = 0.1,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.name = path, name
        self.image_column, self.label_column = image_column, label_column
        self.label_names = list(label_names) if label_names is not None else None
        self.image_size, self.num_channels, self.resize = image_size, num_channels, resize
        self.normalize = normalize
        self.mean = [float(x) for x in mean] if mean is not None else None
        self.std = [float(x) for x in std] if std is not None else None
        self.augment = dict(augment or {})
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.test_size, self.seed = val_size, test_size, seed
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.num_workers = num_workers
        self.splits: dict[str, ImageSet] | None = None

    pad_token_id = None

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names is not None else None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        raw, names = load_images(
            self.path,
            self.name,
            self.image_column,
            self.label_column,
            self.label_names,
        )
        self.label_names = self.label_names or (list(names) if names else None)
        splits = self._held_out(raw)
        for split in SPLITS:  # every split: a test set of another size would be resized silently
            self._check_shape(splits[split][0], split)
        self.splits = {s: ImageSet(*self._limit(s, *splits[s])) for s in SPLITS}
        if self.normalize and self.mean is None:
            pixels = convert_channels(self.splits["train"].images, self.num_channels).float() / 255
            self.mean = pixels.mean((0, 2, 3)).tolist()
            self.std = pixels.std((0, 2, 3)).tolist()

    def _held_out(self, raw: dict[str, tuple]) -> dict[str, tuple]:
        """Missing validation/test splits come from one seeded permutation of the training images."""
        images, labels = raw["train"]
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        cut = {}
        if "test" not in raw:
            n_test = round(self.test_size * len(labels))
            cut["test"], order = order[:n_test], order[n_test:]
        if "validation" not in raw:
            n_val = round(self.val_size * len(labels))
            cut["validation"], order = order[:n_val], order[n_val:]
        cut["train"] = order
        out = {s: (images[idx], labels[idx]) for s, idx in cut.items()}
        return {**{s: raw[s] for s in raw if s != "train"}, **out}

    def _limit(self, split: str, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        limit = self.max_train_examples if split == "train" else self.max_eval_examples
        return (images[:limit], labels[:limit]) if limit else (images, labels)

    def _check_shape(self, images: torch.Tensor, split: str) -> None:
        expected = (self.num_channels, self.image_size, self.image_size)
        if tuple(images.shape[1:]) != expected and not self.resize:
            raise ToolkitError(
                f"{split} images are {describe_shape(images.shape)} but the model expects "
                f"{describe_shape(expected)} "
                f"(data.image_size={self.image_size}, data.num_channels={self.num_channels}); "
                "set data.resize=true to resize and convert them"
            )

    def pixel_values(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 (B, C, H, W) -> the model's float input (resized, augmented when `train`, normalised)."""
        images = convert_channels(images, self.num_channels)
        x = images.float() / 255
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        if train and self.augment.get("crop_padding"):
            x = random_crop(x, int(self.augment["crop_padding"]))  # pads with black, before normalising
        if train and self.augment.get("horizontal_flip"):
            x = horizontal_flip(x, float(self.augment["horizontal_flip"]))
        if self.normalize:
            x = (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
        return x

    def _collate(self, rows: list[tuple], train: bool) -> dict[str, torch.Tensor]:
        images = torch.stack([r[0] for r in rows])
        return {"pixel_values": self.pixel_values(images, train), "labels": torch.stack([r[1] for r in rows])}

    def collate_train(self, rows: list[tuple]) -> dict[str, torch.Tensor]:
        return self._collate(rows, train=True)

    def collate_eval(self, rows: list[tuple]) -> dict[str, torch.Tensor]:
        return self._collate(rows, train=False)

    @property
    def processor(self) -> ViTImageProcessor:
        """The eval-time preprocessing as an HF image processor (saved by export beside the model)."""
        self.setup()
        return ViTImageProcessor(
            do_resize=True,
            size={"height": self.image_size, "width": self.image_size},
            resample=2,  # bilinear, as F.interpolate here
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=self.normalize,
            image_mean=self.mean if self.normalize else None,
            image_std=self.std if self.normalize else None,
        )

    def split_fingerprints(self) -> dict[str, Any]:
        self.setup()
        out = {}
        for s, data in self.splits.items():
            digest = hashlib.sha256(data.images.numpy().tobytes())
            digest.update(data.labels.numpy().tobytes())
            out[s] = {"rows": len(data), "sha256": digest.hexdigest()[:16]}
        return out
