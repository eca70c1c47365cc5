"""Evaluate every model variant of a run on the test split: task metrics, size and CPU latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from omegaconf import DictConfig
from rich.table import Table
from transformers import AutoModelForCausalLM

from toolkit.console import console
from toolkit.run.samples import answer_prompts, held_out_prompts, samples_record
from toolkit.tasks.base import Task, compute_metrics, eval_forward, model_inputs
from toolkit.tasks.harness import harness_metrics, harness_tasks, task_manager


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, task: Task, loader: Any, stage: str = "test") -> dict[str, float]:
    """The task's metrics of `model` over `loader` (`stage` "val" skips test-only metrics), as floats."""
    model.eval()
    device = next(model.parameters()).device  # a GPU-only quantized model evaluates where it lives
    metrics = task.metrics().to(device)
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        task.update(metrics, model, batch, eval_forward(task, model, batch), stage)
    return {name: float(value) for name, value in compute_metrics(metrics).items()}


class LanguageChecks:
    """For causal LMs, per variant: lm-evaluation-harness scores (`evaluate.lm_eval`) and greedy answers to
    held-out prompts (`evaluate.samples`), written side by side to evaluate/samples.json."""

    def __init__(self, options: DictConfig, task: Task, test_split: Any) -> None:
        is_lm = task.auto_class is AutoModelForCausalLM
        self.options, self.tokenizer = options, getattr(task, "tokenizer", None)
        count = options.get("samples", 0) if is_lm else 0
        self.prompts = held_out_prompts(test_split, count) if count else []
        lm_eval = options.get("lm_eval")
        self.harness = task_manager(lm_eval) if is_lm and harness_tasks(lm_eval) else None
        self.answers: dict[str, list[str]] = {}

    def run(self, variant: str, model: torch.nn.Module) -> dict[str, float]:
        """The variant's harness metrics (empty without lm_eval tasks); its answers are kept for write."""
        if self.prompts:
            max_new = self.options.get("max_new_tokens", 64)
            self.answers[variant] = answer_prompts(model, self.tokenizer, self.prompts, max_new)
        if self.harness is None:
            return {}
        return harness_metrics(model, self.tokenizer, self.options.lm_eval, self.harness)

    def samples(self) -> list[dict] | None:
        return samples_record(self.tokenizer, self.prompts, self.answers) if self.answers else None


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as held in memory (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def latency_ms(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5) -> dict[str, float]:
    """Median forward time for the batch and for its first example alone, after one warm-up each."""
    model.eval()
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k != "labels"}
    single = {k: v[:1] for k, v in inputs.items()}
    out = {}
    for key, feed in (("latency_ms", inputs), ("latency_ms_single", single)):
        model(**feed)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**feed)
            times.append((time.perf_counter() - start) * 1000)
        out[key] = statistics.median(times)
    return out


def metrics_table(metrics: dict[str, dict[str, float]], title: str) -> Table:
    """One row per metric, one column per variant (variants are few, metrics many)."""
    names = list(dict.fromkeys(k for values in metrics.values() for k in values))
    table = Table(title=title)
    table.add_column("metric")
    for variant in metrics:
        table.add_column(variant, justify="right")
    for name in names:
        table.add_row(name, *[format_value(values.get(name)) for values in metrics.values()])
    return table


def format_value(value: float | None) -> str:
    """How a metric prints, on the console and in report.md alike."""
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def print_metrics(metrics: dict[str, dict[str, float]], title: str = "evaluate/metrics.json") -> None:
    console.print(metrics_table(metrics, title))
