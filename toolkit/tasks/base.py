"""What every task shares: the keys a HF forward takes, and reading a metric collection."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")


def compute_metrics(metrics: MetricCollection) -> dict[str, torch.Tensor]:
    """Values of the metrics that saw data (gen_accuracy is only updated in test)."""
    return {name: metric.compute() for name, metric in metrics.items() if metric.update_called}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys the HF forward takes; data modules may carry more (e.g. prompts for generation)."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        # Packed rows (toolkit.data.packing): transformers builds the block-diagonal mask from position ids
        # only when no KV cache exists; with the default use_cache=True, examples attend to each other.
        inputs["use_cache"] = False
    return inputs
