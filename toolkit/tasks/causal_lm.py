"""Causal LM / SFT: the LM head run only where labels are, perplexity, and generated-label accuracy."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.text import Perplexity
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from toolkit.models.build import load_tokenizer
from toolkit.tasks.base import model_inputs


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (PEFT- or DeepSpeed-wrapped) transformers model computes logits at given positions only."""
    model = getattr(model, "module", model)  # a DeepSpeed engine passes keywords through to its module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forwardtakes_logits_to_keep(type(base))


@functools.cache
def _forwardtakes_logits_to_keep(model_class: type) -> bool:  # once per class, not per training step
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


class CausalLM:
    """Causal LM / SFT: perplexity on the labelled tokens and, for labelled prompts, generated-label accuracy.

    Generated-label accuracy uses one fixed parser: lower-case the generation, take whichever answer choice
    appears first, anything else is wrong. It runs in `test` only (generation is slow), with
    `max_new_tokens` generous enough that a chatty base model gets a fair chance to answer.
    """

    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    primary_metric, mode = "perplexity", "min"

    def __init__(
        self, tokenizer: str, answer_choices: list[str] | None = None, max_new_tokens: int = 20
    ) -> None:
        self.tokenizer_path = tokenizer
        self.answer_choices = [c.lower() for c in answer_choices or []]
        self.max_new_tokens = max_new_tokens

    @functools.cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_path)  # on first use: a task or data module is cheap to build

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def training_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's causal LM loss (mean cross-entropy over labelled tokens), with its LM head run only at
        positions some row of the batch has a label after: an SFT example labels its answer alone, and the
        full logits (tokens x a 49k vocabulary, fp32, kept for backward) dominate a LoRA run's memory."""
        if not takes_logits_to_keep(model):
            return model(**model_inputs(batch)).loss
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        next_labels = batch["labels"][:, 1:]  # position t predicts token t + 1, as HF's loss shifts
        keep = (next_labels != -100).any(dim=0).nonzero().squeeze(1)
        logits = model(**inputs, logits_to_keep=keep).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), next_labels[:, keep].flatten(), ignore_index=-100)

    def metrics(self) -> MetricCollection:
        metrics = {"perplexity": Perplexity(ignore_index=-100)}
        if self.answer_choices:
            metrics["gen_accuracy"] = MeanMetric()
        return MetricCollection(metrics)

    def update(
        self, metrics: MetricCollection, model: PreTrainedModel, batch: dict, outputs: Any, stage: str
    ) -> None:
        # HF shifts inside its loss; the metric needs the same alignment: position t predicts token t+1.
        metrics["perplexity"].update(outputs.logits[:, :-1].float(), batch["labels"][:, 1:])
        if stage == "test" and "gen_accuracy" in metrics:
            metrics["gen_accuracy"].update(self.generated_correct(model, batch))

    def generated_correct(self, model: PreTrainedModel, batch: dict) -> torch.Tensor:
        prompt = batch["prompt_input_ids"]
        generated = model.generate(
            input_ids=prompt,
            attention_mask=batch["prompt_attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or model.config.eos_token_id,
        )
        texts = self.tokenizer.batch_decode(generated[:, prompt.shape[1] :], skip_special_tokens=True)
        predicted = [self.parse(t) for t in texts]
        answers = batch["answer_index"].tolist()
        return torch.tensor([float(p == a) for p, a in zip(predicted, answers, strict=True)])

    def parse(self, text: str) -> int:
        """Index of the first answer choice that appears in the text, -1 if none does."""
        text = text.lower()
        found = [(text.find(c), i) for i, c in enumerate(self.answer_choices) if c in text]
        return min(found)[1] if found else -1

    def majority(self, dataset: Any) -> dict[str, float]:
        answer_index = dataset["answer_index"]
        counts = torch.bincount(torch.tensor([a for a in answer_index if a >= 0]))
        return {"gen_accuracy": float(counts.max() / len(answer_index))} if len(counts) else {}

    def baselines(self, data: Any) -> dict[str, dict[str, float]]:
        """The majority answer's accuracy, for labelled prompts; conversations have no label to count."""
        test = data.splits["test"]
        return {"majority": self.majority(test)} if "answer_index" in test.column_names else {}
