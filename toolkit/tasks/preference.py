"""Preference tuning (DPO, IPO, ORPO, KTO): a causal-LM task whose loss compares answers.

Batches come from toolkit.data.preference: chosen and rejected rows in one forward pass. The reference model
is, in this order: log-probabilities carried by the batch (`task.precompute_reference`: computed once before
training with the initial model and cached in the run directory), the same model with its LoRA adapter
disabled (no second copy in memory), or a frozen copy of the initial model (`reference`, set by TaskModule
for full fine-tuning, and by the evaluate stage to the base model).

Metrics, logged every step and on the held-out splits: reward accuracy and margin, chosen/rejected rewards
and log-probabilities, and `preference_accuracy`: the fraction of pairs whose chosen answer the model gives
a higher per-token log-probability than the rejected one. That one needs no reference, so base and
fine-tuned models are compared on it; it is the primary metric (checkpoints, the quantize gate, the report).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torchmetrics import MeanMetric, MetricCollection
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from toolkit.errors import ToolkitError
from toolkit.models.build import load_tokenizer
from toolkit.tasks.causal_lm import takes_logits_to_keep
from toolkit.tasks.preference_losses import (
    LOSSES,
    WITHOUT_REFERENCE,
    dpo_loss,
    ipo_loss,
    kl_estimate,
    kto_loss,
    orpo_odds_ratio,
)

PAIRED_METRICS = ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected")
KTO_METRICS = ("reward_accuracy", "rewards_desirable", "rewards_undesirable", "kl")


def completion_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the labelled (answer) tokens' log-probabilities, and their count. The LM head runs
    only at positions where some row has an answer token next (the prompt's logits are never needed)."""
    input_ids, labels = batch[f"{prefix}input_ids"], batch[f"{prefix}labels"]
    next_labels = labels[:, 1:]  # position t predicts token t + 1
    inputs = {"input_ids": input_ids, "attention_mask": batch[f"{prefix}attention_mask"]}
    if not takes_logits_to_keep(model):
        return answer_logps(model(**inputs).logits[:, :-1], next_labels)
    keep = (next_labels != -100).any(dim=0).nonzero().squeeze(1)
    return answer_logps(model(**inputs, logits_to_keep=keep).logits, next_labels[:, keep])


def answer_logps(logits: torch.Tensor, next_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the labelled tokens per row (in fp32), and how many there are."""
    logits = logits.float()
    mask = next_labels != -100
    picked = logits.gather(2, next_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


@dataclass
class AnswerScores:
    """What preference metrics read of a forward: answer log-probabilities and lengths per row, and `loss`,
    the answers' token NLL (what the HF model's own loss would be on these labels)."""

    logps: torch.Tensor
    lengths: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return -self.logps.sum() / self.lengths.sum().clamp(min=1)


class Preference:
    """`loss`: dpo | ipo | orpo | kto; `beta`: strength (DPO/IPO/KTO: of the reference constraint; ORPO: the
    weight of the odds-ratio term, its paper's lambda); `label_smoothing`: conservative DPO's flip rate."""

    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"

    def __init__(
        self,
        tokenizer: str,
        loss: str = "dpo",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        precompute_reference: bool = False,
    ) -> None:
        if loss not in LOSSES:
            raise ToolkitError(f"task.loss='{loss}' is not a preference loss; valid: {', '.join(LOSSES)}")
        if not isinstance(beta, int | float) or beta <= 0:
            raise ToolkitError(f"task.beta={beta} must be a positive number (DPO's usual range: 0.01 to 0.5)")
        if not 0 <= label_smoothing < 0.5:
            raise ToolkitError(f"task.label_smoothing={label_smoothing} must be in [0, 0.5)")
        if precompute_reference and loss in WITHOUT_REFERENCE:
            raise ToolkitError(
                f"task.precompute_reference=true with task.loss={loss}, which uses no reference model; "
                "drop task.precompute_reference"
            )
        self.tokenizer_path, self.loss, self.beta = tokenizer, loss, float(beta)
        self.label_smoothing = float(label_smoothing)
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.precompute_reference = precompute_reference
        self.reference: torch.nn.Module | None = None  # a frozen model, when no adapter can be disabled
        self.primary_metric = "reward_accuracy" if loss == "kto" else "preference_accuracy"
        self.mode = "max"

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_path)  # on first use: a task or data module is cheap to build

    @property
    def uses_reference(self) -> bool:
        return self.loss not in WITHOUT_REFERENCE

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def reference_logps(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str = ""
    ) -> torch.Tensor | None:
        """The reference model's answer log-probabilities for the batch's rows (None: no reference here)."""
        if f"{prefix}ref_logps" in batch:
            return batch[f"{prefix}ref_logps"]
        if self.reference is not None:  # e.g. the base model on the CPU beside a quantized one on a GPU
            device = next(self.reference.parameters()).device
            moved = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            return completion_logps(self.reference, moved, prefix)[0].to(batch[f"{prefix}input_ids"].device)
        if hasattr(model, "disable_adapter"):  # LoRA: the base is the reference, with no second copy
            with model.disable_adapter():
                return completion_logps(model, batch, prefix)[0]
        return None

    def training_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of the batch and what to log beside it (rewards, accuracies, log-probabilities)."""
        reference = self.reference_logps(model, batch) if self.uses_reference else None
        if self.uses_reference and reference is None:
            raise ToolkitError(
                f"task.loss={self.loss} needs a reference model: use an adapter (adapter=lora), or "
                "task.precompute_reference=true"
            )
        logps, lengths = completion_logps(model, batch)
        return self.loss_and_metrics(model, batch, logps, lengths, reference)

    def loss_and_metrics(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        logps: torch.Tensor,
        lengths: torch.Tensor,
        reference: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.loss == "kto":
            return self.kto(model, batch, logps, reference)
        return self.paired(logps, lengths, reference)

    def paired(
        self,
        logps: torch.Tensor,
        lengths: torch.Tensor,
        reference: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = logps.chunk(2)
        chosen_length, rejected_length = lengths.clamp(min=1).chunk(2)
        logged = {
            "logps_chosen": chosen.detach().mean(),
            "logps_rejected": rejected.detach().mean(),
            "preference_accuracy": (chosen / chosen_length > rejected / rejected_length).float().mean(),
        }
        if self.loss == "orpo":
            nll = -chosen.sum() / chosen_length.sum()  # the chosen answers' token NLL, as the SFT loss
            losses, chosen_rewards, rejected_rewards = orpo_odds_ratio(
                chosen, rejected, chosen_length, rejected_length, self.beta
            )
            loss = nll + losses.mean()
            logged["nll"] = nll.detach()
        else:
            ref_chosen, ref_rejected = reference.chunk(2)
            if self.loss == "dpo":
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing
                )
            else:
                losses, chosen_rewards, rejected_rewards = ipo_loss(
                    chosen, rejected, ref_chosen, ref_rejected, chosen_length, rejected_length, self.beta
                )
            loss = losses.mean()
        logged.update(
            {
                "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
                "reward_margin": (chosen_rewards - rejected_rewards).mean(),
                "rewards_chosen": chosen_rewards.mean(),
                "rewards_rejected": rejected_rewards.mean(),
            }
        )
        return loss, logged

    def kto(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        logps: torch.Tensor,
        reference: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():  # the reference point carries no gradient (as in the paper and TRL)
            policy_kl = completion_logps(model, batch, "kl_")[0]
        kl = kl_estimate(policy_kl, self.reference_logps(model, batch, "kl_"))
        desirable = batch["desirable"]
        losses, good, bad = kto_loss(
            logps, reference, desirable, kl, self.beta, self.desirable_weight, self.undesirable_weight
        )
        rewards = self.beta * (logps - reference).detach()
        correct = torch.where(desirable, rewards > 0, rewards < 0)
        logged = {
            "kl": kl,
            "reward_accuracy": correct.float().mean(),
            "rewards_desirable": good.mean() if len(good) else torch.tensor(float("nan")),
            "rewards_undesirable": bad.mean() if len(bad) else torch.tensor(float("nan")),
        }
        return losses.mean(), logged

    def metrics(self) -> MetricCollection:
        names = (
            KTO_METRICS if self.loss == "kto" else ("preference_accuracy", "logps_chosen", "logps_rejected")
        )
        names = names + (() if self.loss == "kto" else PAIRED_METRICS)
        if self.loss == "orpo":
            names = names + ("nll",)
        return MetricCollection(
            {name: MeanMetric(nan_strategy="ignore") for name in (*names, "preference_loss")}
        )

    def eval_forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> AnswerScores:
        """Held-out batches are scored at answer positions only: the full logits of chosen and rejected rows
        (tokens x vocabulary, fp32) are what would dominate evaluation's memory."""
        return AnswerScores(*completion_logps(model, batch))

    def update(
        self, metrics: MetricCollection, model: torch.nn.Module, batch: dict, outputs: Any, stage: str
    ) -> None:
        """Held-out metrics from the forward the caller ran (`outputs`, from `eval_forward`), weighted by the
        pairs (examples) of the batch; without a reference model (a full fine-tune evaluated alone), the
        reference-free one."""
        logps, lengths = outputs.logps, outputs.lengths
        if self.reference is model and "ref_logps" not in batch:
            reference = logps  # the base model scored against itself: exactly zero rewards, no rounding
        else:
            reference = self.reference_logps(model, batch) if self.uses_reference else None
        if self.uses_reference and reference is None:
            if self.loss == "kto":
                return
            chosen, rejected = logps.chunk(2)
            chosen_length, rejected_length = lengths.clamp(min=1).chunk(2)
            won = (chosen / chosen_length > rejected / rejected_length).float()
            metrics["preference_accuracy"].update(won.mean(), weight=len(won))
            return
        loss, logged = self.loss_and_metrics(model, batch, logps, lengths, reference)
        weight = len(logps) if self.loss == "kto" else len(logps) // 2
        for name, value in {**logged, "preference_loss": loss.detach()}.items():
            metrics[name].update(value, weight=weight)

    def baselines(self, data: Any) -> dict[str, dict[str, float]]:
        return {}
