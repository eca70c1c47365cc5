"""Data pipeline: tokenization cached by `datasets`, fixed-length padding (and its bad value)."""

from __future__ import annotations

import datasets
import pytest

from toolkit.errors import ToolkitError

from .helpers import ROWS, data_module


def test_second_setup_loads_the_tokenized_splits_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    ROWS.to_csv(tmp_path / "reviews.csv", index=False)
    first = data_module(tmp_path / "reviews.csv")
    first.setup()
    written = sorted(cache.rglob("*.arrow"))
    tokenized = [f["filename"] for f in first.splits["train"].cache_files]
    assert any("cache-" in name for name in tokenized), "the tokenized split lives in a cache file"
    second = data_module(tmp_path / "reviews.csv")
    second.setup()
    # a function datasets cannot hash gets a random fingerprint: the second run would tokenize again
    assert sorted(cache.rglob("*.arrow")) == written, "the second setup recomputed something"
    assert [f["filename"] for f in second.splits["train"].cache_files] == tokenized
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]


def test_padding_to_max_length_gives_every_batch_the_same_shape(tmp_path):
    ROWS.to_csv(tmp_path / "reviews.csv", index=False)
    data = data_module(tmp_path / "reviews.csv", padding="max_length")
    data.setup()
    shapes = {tuple(batch["input_ids"].shape) for batch in data.train_dataloader()}
    assert shapes == {(4, 16), (2, 16)}  # 30 rows: 7 batches of 4, a last one of 2
    longest = data_module(tmp_path / "reviews.csv")
    longest.setup()
    assert max(batch["input_ids"].shape[1] for batch in longest.train_dataloader()) < 16


def test_unknown_padding_is_refused():
    expected = r"data.padding 'max' is not supported; valid: longest, max_length$"
    with pytest.raises(ToolkitError, match=expected):
        data_module("unused.csv", padding="max")
