"""Tokenization runs once: a second setup of the same data finds every split in the `datasets` cache."""

from __future__ import annotations

import datasets

from .test_data import ROWS, data_module


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
