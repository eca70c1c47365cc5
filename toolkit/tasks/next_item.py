"""Next-item prediction: full-catalogue HR@K and NDCG@K (seen items excluded) beside a popularity baseline."""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import MeanMetric, MetricCollection
from transformers import AutoModel

import toolkit.models.recommenders  # noqa: F401  (registers its model types)
from toolkit.data.interactions import PAD, SequentialRecData


def rank_of_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items; ties go to the lower item id (as a stable sort would)."""
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    ids = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > target_scores) | ((scores == target_scores) & (ids < targets[:, None]))
    return ahead.sum(1)


def hit_rate_and_ndcg(ranks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example HR@k (target in the top k) and NDCG@k (1/log2(rank+2) there, 0 below)."""
    hit = (ranks < k).float()
    return hit, hit / torch.log2(ranks.float() + 2)


def exclude(scores: torch.Tensor, seen: torch.Tensor, never: list[int]) -> torch.Tensor:
    """Scores with the already-seen items (and padding, [MASK]) pushed to -inf, so they are never ranked."""
    scores = scores.float().scatter(1, seen, float("-inf"))
    scores[:, never] = float("-inf")
    return scores


class NextItemPrediction:
    """Next-item prediction over the full catalogue: HR@k and NDCG@k, popularity baseline beside them."""

    auto_class = AutoModel
    peft_task_type = None

    def __init__(self, k: int = 10, exclude_seen: bool = True) -> None:
        self.k, self.exclude_seen = k, exclude_seen
        self.primary_metric, self.mode = f"ndcg@{k}", "max"
        self.data: SequentialRecData | None = None

    def bind(self, data: SequentialRecData) -> None:
        """The model's vocabulary comes from the data (items are only known once the log is read)."""
        self.data = data

    def model_kwargs(self) -> dict[str, Any]:
        return self.data.model_config()

    def metrics(self) -> MetricCollection:
        return MetricCollection({f"hr@{self.k}": MeanMetric(), f"ndcg@{self.k}": MeanMetric()})

    def update(self, metrics: MetricCollection, model: Any, batch: dict, outputs: Any, stage: str) -> None:
        self._update_scores(metrics, outputs.logits, batch)

    def _update_scores(self, metrics: MetricCollection, scores: torch.Tensor, batch: dict) -> None:
        never = [PAD] + ([self.data.vocab.mask_id] if self.data.vocab.masked else [])
        seen = batch["seen"] if self.exclude_seen else torch.zeros_like(batch["seen"])
        ranks = rank_of_targets(exclude(scores, seen, never), batch["labels"][:, -1])
        hit, ndcg = hit_rate_and_ndcg(ranks, self.k)
        metrics[f"hr@{self.k}"].update(hit)
        metrics[f"ndcg@{self.k}"].update(ndcg)

    def baselines(self, data: SequentialRecData) -> dict[str, dict[str, float]]:
        """Most-popular items (history excluded the same way) on the same test split."""
        counts, metrics = data.popularity(), self.metrics()
        for batch in data.test_dataloader():
            self._update_scores(metrics, counts.expand(len(batch["seen"]), -1), batch)
        return {"popularity": {name: float(m.compute()) for name, m in metrics.items()}}


def ndcg_ratio(metrics: dict[str, dict[str, float]], k: int = 10) -> float:
    """Fine-tuned NDCG@k over popularity's (the recipes' goal is >= 2)."""
    base = metrics["popularity"][f"ndcg@{k}"]
    return metrics["fine_tuned"][f"ndcg@{k}"] / base if base else math.inf
