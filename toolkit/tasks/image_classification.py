"""Image classification: text classification's metrics plus the fine-tuned model's confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; no display
import matplotlib.pyplot as plt  # noqa: E402
import torch
from torchmetrics.classification import MulticlassConfusionMatrix
from transformers import AutoModelForImageClassification

import toolkit.models.mlp  # noqa: F401  (registers its model types)
from toolkit.tasks.base import model_inputs
from toolkit.tasks.classification import SequenceClassification


class ImageClassification(SequenceClassification):
    """Accuracy and macro precision/recall/F1 as for text; plus the confusion matrix of the tuned model."""

    auto_class = AutoModelForImageClassification
    peft_task_type = None  # PEFT has no image task type; recipes list the new head in modules_to_save

    def __init__(self, num_labels: int, label_names: list[str] | None = None) -> None:
        super().__init__(num_labels)
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_labels)]

    def model_kwargs(self) -> dict[str, Any]:
        # a pretrained checkpoint trained on other classes gets a fresh head of num_labels outputs
        return {"num_labels": self.num_labels, "ignore_mismatched_sizes": True}

    def baselines(self, data: Any) -> dict[str, dict[str, float]]:
        counts = torch.bincount(data.splits["test"].labels, minlength=self.num_labels)
        return {"majority": {"accuracy": float(counts.max() / counts.sum())}}

    def confusion(self, model: torch.nn.Module, loader: Any) -> torch.Tensor:
        """Counts (true class, predicted class) over `loader`."""
        matrix = MulticlassConfusionMatrix(self.num_labels)
        model.eval()
        with torch.no_grad():
            for batch in loader:
                matrix.update(model(**model_inputs(batch)).logits.argmax(-1), batch["labels"])
        return matrix

    def save_figures(self, variants: dict[str, Any], loader: Any, directory: Path) -> None:
        """confusion_matrix.png and .json for the fine-tuned model (the base model when there is none)."""
        name = "fine_tuned" if "fine_tuned" in variants else "base"
        matrix = self.confusion(variants[name], loader)
        fig, ax = matrix.plot(labels=self.label_names)
        ax.set_title(f"{name}: confusion matrix (test split)")
        fig.set_size_inches(8, 8)
        fig.savefig(directory / "confusion_matrix.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        counts = matrix.compute().tolist()
        (directory / "confusion_matrix.json").write_text(
            json.dumps({"variant": name, "labels": self.label_names, "counts": counts})
        )
