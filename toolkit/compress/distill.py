"""Knowledge distillation: a student trained on the fine-tuned teacher's logits through the same TaskModule.

The loss mixes the teacher's softened distribution (KL at temperature T, scaled by T^2 so its gradients keep
their size as T changes) with the task's own loss on the labels: `alpha * soft + (1 - alpha) * hard`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, PreTrainedModel

from toolkit.tasks.base import Task, model_inputs
from toolkit.training.module import TaskModule


def build_student(teacher_dir: Path, auto_class: Any, overrides: dict[str, Any]) -> PreTrainedModel:
    """The teacher's architecture with `overrides` (e.g. fewer layers), initialised from the teacher's
    weights wherever names and shapes match (DistilBERT's recipe: keep the first layers)."""
    config = AutoConfig.from_pretrained(teacher_dir)
    for key, value in overrides.items():
        setattr(config, key, value)
    student = auto_class.from_config(config)
    teacher_state = auto_class.from_pretrained(teacher_dir).state_dict()
    own = student.state_dict()
    matching = {k: v for k, v in teacher_state.items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(matching, strict=False)
    return student


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) at `temperature`, over examples (sequence classification) or over the positions
    that have a label (causal LM: logits at t predict the label at t+1)."""
    if student.dim() == 3:
        keep = labels[:, 1:] != -100
        student, teacher = student[:, :-1][keep], teacher[:, :-1][keep]
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


class DistillModule(TaskModule):
    """TaskModule whose training loss adds the teacher's soft targets; validation and metrics as usual."""

    def __init__(self, task: Task, teacher: PreTrainedModel, temperature: float, alpha: float, **kwargs):
        super().__init__(task, **kwargs)
        # a tuple keeps the frozen teacher out of the module's parameters, optimizer and checkpoints
        self._teacher = (teacher.eval().requires_grad_(False),)
        self.temperature, self.alpha = temperature, alpha

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        outputs = self(batch)
        with torch.no_grad():
            teacher_logits = self._teacher[0](**model_inputs(batch)).logits
        soft = distillation_loss(outputs.logits, teacher_logits, batch["labels"], self.temperature)
        loss = self.alpha * soft + (1 - self.alpha) * outputs.loss
        size = batch["labels"].shape[0]
        self.log_dict({"train/loss": loss, "train/soft_loss": soft}, prog_bar=True, batch_size=size)
        return loss
