"""Building a run's parts from its config: data module and task, model arguments, the TaskModule."""

from __future__ import annotations

import math
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from toolkit.data.preference import FORMATS as PREFERENCE_FORMATS
from toolkit.data.preference import PreferenceData
from toolkit.errors import ToolkitError
from toolkit.models.adapters import adapter_settings, quantization_settings
from toolkit.tasks.base import Task
from toolkit.tasks.preference import LOSSES, Preference
from toolkit.training.module import TaskModule


def build_data_and_task(cfg: DictConfig) -> tuple[Any, Any]:
    data, task = instantiate(cfg.data), instantiate(cfg.task)
    data_labels, task_labels = getattr(data, "num_labels", None), getattr(task, "num_labels", None)
    if data_labels is not None and task_labels is not None and data_labels != task_labels:
        raise ToolkitError(
            f"task.num_labels={task_labels} but data.label_names has {data_labels} labels "
            f"({', '.join(data.label_names)}); make them agree"
        )
    check_preference(data, task)
    take_answer_choices(task, data)
    if hasattr(task, "bind"):  # tasks whose model shape comes from the data (e.g. an item vocabulary)
        task.bind(data)
    return data, task


def check_preference(data: Any, task: Any) -> None:
    """Preference data and the preference task come together, paired data with the paired losses."""
    formats, losses = ", ".join(PREFERENCE_FORMATS), ", ".join(LOSSES)
    if isinstance(task, Preference) and not isinstance(data, PreferenceData):
        raise ToolkitError(
            f"task=preference (task.loss={task.loss}) needs preference data (data.format: {formats}; "
            f"e.g. data=dpo_en_demo), not {type(data).__name__}"
        )
    if isinstance(data, PreferenceData) and not isinstance(task, Preference):
        raise ToolkitError(
            f"data.format={data.format} is preference data: it trains a causal LM with task=preference "
            f"(task.loss: {losses}), not {type(task).__name__}"
        )
    if isinstance(task, Preference) and data.paired == (task.loss == "kto"):
        wanted = "data.format=unpaired (answers rated true/false)" if task.loss == "kto" else "pairs"
        raise ToolkitError(f"task.loss={task.loss} needs {wanted}; data.format={data.format} does not fit it")


def build_task(cfg: DictConfig) -> Any:
    """The task alone, for stages that need only its Auto class and metric names (prune, report)."""
    return instantiate(cfg.task)


def take_answer_choices(task: Task, data: Any) -> None:
    """gen_accuracy compares the generated answer's index with the data's `answer_index`, so the task's
    choices must be the data's, in the data's order: they come from `data.answers`. A task given other
    choices would score every answer inverted without a word; it is refused instead."""
    choices = [c.lower() for c in getattr(data, "answer_choices", None) or []]
    if not choices or not hasattr(task, "answer_choices"):
        return
    if task.answer_choices and task.answer_choices != choices:
        raise ToolkitError(
            f"task.answer_choices {task.answer_choices} disagree with the answers of data.answers, in order "
            f"{choices}; drop task.answer_choices (the choices come from data.answers)"
        )
    task.answer_choices = choices


def model_kwargs(cfg: DictConfig, pad_token_id: int | None) -> dict[str, Any]:
    m = cfg.model
    config = OmegaConf.to_container(m.config, resolve=True) if m.config is not None else None
    return {
        "name_or_path": m.name_or_path,
        "config": config,
        "dtype": m.dtype,
        "trust_remote_code": m.trust_remote_code,
        "pad_token_id": pad_token_id,
        "attn_implementation": m.get("attn_implementation"),
    }


def build_module(
    cfg: DictConfig, task: Task, pad_token_id: int | None, total_steps: int = 0, training: bool = True
) -> TaskModule:
    """The recipe's TaskModule. `training=False` (export, evaluation) builds the base in full precision and
    without activation checkpointing: QLoRA's adapter is merged into the weights users deploy."""
    return TaskModule(
        task,
        model=model_kwargs(cfg, pad_token_id),
        adapter=adapter_settings(cfg.adapter),
        quantization=quantization_settings(cfg.adapter) if training else None,
        activation_checkpointing=training and bool(cfg.model.get("activation_checkpointing")),
        optimizer=instantiate(cfg.optim),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        total_steps=total_steps,
        on_nonfinite_loss=cfg.get("on_nonfinite_loss", "stop"),
    )


def total_training_steps(trainer_cfg: DictConfig, batch_size: int, n_train: int) -> int:
    """Optimizer steps the run will take, from the data length (see TaskModule.configure_optimizers)."""
    devices = trainer_cfg.devices if isinstance(trainer_cfg.devices, int) else 1
    per_rank = math.ceil(n_train / (devices * trainer_cfg.num_nodes))
    per_epoch = math.ceil(math.ceil(per_rank / batch_size) / trainer_cfg.accumulate_grad_batches)
    epochs = trainer_cfg.max_epochs if trainer_cfg.max_epochs not in (None, -1) else None
    max_steps = trainer_cfg.max_steps if trainer_cfg.max_steps not in (None, -1) else None
    candidates = [s for s in (per_epoch * epochs if epochs else None, max_steps) if s]
    if not candidates:
        raise ToolkitError("set trainer.max_epochs or trainer.max_steps (both are unlimited)")
    return max(1, min(candidates))
