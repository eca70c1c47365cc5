"""Text classification: an `AutoModelForSequenceClassification` head, accuracy and macro P/R/F1."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
)


class SequenceClassification:
    """Text classification with an `AutoModelForSequenceClassification` head."""

    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"
    primary_metric, mode = "accuracy", "max"

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels}

    def metrics(self) -> MetricCollection:
        n = self.num_labels
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(n, average="micro"),
                "precision_macro": MulticlassPrecision(n, average="macro"),
                "recall_macro": MulticlassRecall(n, average="macro"),
                "f1_macro": MulticlassF1Score(n, average="macro"),
            }
        )

    def update(
        self, metrics: MetricCollection, model: PreTrainedModel, batch: dict, outputs: Any, stage: str
    ) -> None:
        metrics.update(outputs.logits.argmax(-1), batch["labels"])

    def majority(self, dataset: Any) -> dict[str, float]:
        """The majority-class baseline on the same split, reported beside the model."""
        counts = torch.bincount(torch.tensor(dataset["labels"]), minlength=self.num_labels)
        return {"accuracy": float(counts.max() / counts.sum())}

    def baselines(self, data: Any) -> dict[str, dict[str, float]]:
        return {"majority": self.majority(data.splits["test"])}
