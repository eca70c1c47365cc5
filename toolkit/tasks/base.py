"""The task contract, and what every task shares: the keys a HF forward takes, reading a metric collection.

A task says what a batch looks like to the model, which HF Auto class holds the model, and which metrics
judge it. The loss comes from the HF model's own output unless the task defines `training_loss`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torchmetrics import MetricCollection


class Task(Protocol):
    """What TaskModule, the stages and the estimator ask of a task. Optional, where a task has them:
    `training_loss(model, batch)`, `eval_forward(model, batch)` (the outputs `update` reads, when the full
    logits are more than it needs), `bind(data)` (model shape from the data, e.g. an item vocabulary),
    `save_figures(variants, loader, directory)` (e.g. a confusion matrix), `answer_choices`."""

    auto_class: ClassVar[Any]  # the transformers Auto class that builds and loads the model
    peft_task_type: ClassVar[str | None]  # PEFT's task type for the adapter (None: modules_to_save)
    primary_metric: str  # what checkpointing, early stopping, the gate and the report use
    mode: str  # "max" or "min": which way the primary metric improves

    def model_kwargs(self) -> dict[str, Any]: ...  # extra arguments to build or load the model
    def metrics(self) -> MetricCollection: ...
    def update(
        self, metrics: MetricCollection, model: Any, batch: dict, outputs: Any, stage: str
    ) -> None: ...
    def baselines(self, data: Any) -> dict[str, dict[str, float]]: ...  # e.g. majority, popularity


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


def eval_forward(task: Task, model: Any, batch: dict[str, torch.Tensor]) -> Any:
    """The forward whose outputs the task's `update` reads (and whose `loss` is logged): the model's own,
    unless the task scores batches more cheaply."""
    forward = getattr(task, "eval_forward", None)
    return forward(model, batch) if forward else model(**model_inputs(batch))
