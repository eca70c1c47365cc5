"""Where data comes from (a hub id, a local directory or file) and its fixed train/validation/test split."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from toolkit.errors import ToolkitError

FILE_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


COMPRESSION = (".bz2", ".gz", ".xz", ".zst")


SPLITS = ("train", "validation", "test")


def load_splits(
    path: str,
    name: str | None,
    val_size: float,
    test_size: float,
    seed: int,
    keep: tuple[Callable[[dict], bool], str] | None = None,
) -> DatasetDict:
    """Load `path` (hub id, directory or file) and return train/validation/test splits; with `keep`
    (a row test and what it keeps, e.g. "comparison feedback"), of those rows alone, chosen before the split
    so that each split holds its share of them."""
    raw = DatasetDict({split: numbered(rows) for split, rows in load_raw(path, name).items()})
    if keep is not None:
        test, what = keep
        raw = DatasetDict({split: rows.filter(test) for split, rows in raw.items()})
        if not any(len(rows) for rows in raw.values()):
            raise ToolkitError(f"data.path='{path}' holds no {what}")
    if all(s in raw for s in SPLITS):
        return DatasetDict({s: raw[s] for s in SPLITS})
    base = raw["train"] if "train" in raw else raw[next(iter(raw))]
    # Held-out splits come from one seeded shuffle, so every rank and every rerun sees the same test set.
    first = base.train_test_split(test_size=test_size, seed=seed)
    rest = first["train"].train_test_split(test_size=val_size / (1 - test_size), seed=seed)
    return DatasetDict(train=rest["train"], validation=rest["test"], test=first["test"])


def numbered(rows: Dataset) -> Dataset:
    """`_row`: each row's index in its file, so that a data module can name a bad row as the user sees it."""
    return rows if "_row" in rows.column_names else rows.add_column("_row", list(range(len(rows))))


def load_raw(path: str, name: str | None) -> DatasetDict:
    local = Path(path)
    try:
        if local.is_file():
            suffixes = [s for s in local.suffixes if s not in COMPRESSION]
            suffix = suffixes[-1] if suffixes else ""
            if suffix not in FILE_FORMATS:
                raise ToolkitError(
                    f"data.path '{path}' has an unknown format; valid: {', '.join(FILE_FORMATS)} "
                    f"(optionally {'/'.join(COMPRESSION)} compressed)"
                )
            fmt = FILE_FORMATS[suffix]
            kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
            return load_dataset(fmt, data_files=str(local), **kwargs)
        if not local.exists() and (path.startswith((".", "/", "~")) or local.suffix in FILE_FORMATS):
            raise ToolkitError(f"data.path '{path}' does not exist")
        return load_dataset(path, name)  # a local dataset directory or a hub id
    except ToolkitError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the path and the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ToolkitError(f"cannot read data.path '{path}': {first}") from err


def fingerprint(dataset: Dataset, columns: list[str]) -> str:
    """A content hash of the given columns, to recognise the same split later."""
    digest = hashlib.sha256()
    for column in columns:
        digest.update(repr(dataset[column]).encode())
    return digest.hexdigest()[:16]


def check_columns(dataset: Dataset, wanted: dict[str, str | None]) -> None:
    present = [c for c in dataset.column_names if c != "_row"]  # the file's own columns, not our row index
    for key, column in wanted.items():
        if column is not None and column not in present:
            raise ToolkitError(
                f"data.{key}='{column}' is not a column of the dataset; columns: {', '.join(present)}"
            )


def encode_labels(labels: list, label_names: list[str] | None, ignore_labels: list[str]) -> list[int]:
    """Map raw labels to ids (positions in label_names); -1 marks rows to drop (ignore_labels)."""
    if label_names is None:
        return [int(x) for x in labels]
    index = {str(name): i for i, name in enumerate(label_names)}
    ignored = {str(x) for x in ignore_labels}
    out = []
    for raw in labels:
        key = str(raw)
        if key not in index and key not in ignored:
            raise ToolkitError(
                f"label '{raw}' is not in data.label_names {list(label_names)} "
                f"nor in data.ignore_labels {list(ignore_labels)}"
            )
        out.append(index.get(key, -1))
    return out
