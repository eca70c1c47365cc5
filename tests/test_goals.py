"""The issue's quality goals on the full data, run by hand (`pytest -m slow tests/test_goals.py`): minutes."""

from __future__ import annotations

import json

import pytest

from toolkit.recsys import ndcg_ratio
from toolkit.stages import run_pipeline

from .conftest import FAST, compose_config


@pytest.mark.slow
def test_sasrec_beats_popularity_twice_on_movielens(tmp_path):
    """NDCG@10 of the recipe as written at least twice the popularity baseline's on the same split.

    Measured: 0.0597 vs 0.0198 (3.0x), 30 epochs; ~10 min unloaded, 88 min on a heavily shared 2-core CPU."""
    cfg = compose_config(["recipe=recsys/sasrec_movielens", *FAST])
    run_pipeline(cfg, tmp_path)
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert ndcg_ratio(metrics) >= 2.0, metrics
