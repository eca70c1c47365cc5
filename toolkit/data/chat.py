"""Chat SFT data: rows rendered with the tokenizer's chat template, the loss on the answer only."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from toolkit.data.packing import collate_packed, pack_dataset
from toolkit.data.sources import (
    check_columns,
    encode_labels,
)
from toolkit.data.text import TokenizedData
from toolkit.errors import ToolkitError


class ChatSFTData(TokenizedData):
    """Instruction pairs rendered with the tokenizer's chat template; the loss covers the answer only.

    The user turn is `prompt_template` filled with the row (`{text}` etc.); the answer is the row's
    `response_column`, or `answers[label]` when the data is a labelled classification set. Batches also carry
    the left-padded prompt alone (`prompt_input_ids`) and the answer text index, for generation metrics.
    `packing` packs the training split into rows of `pack_length` tokens (default `max_length`) with no
    attention across examples (toolkit.data.packing); evaluation splits stay one example per row.
    """

    def __init__(
        self,
        prompt_template: str,
        response_column: str | None = None,
        label_column: str | None = None,
        answers: dict[str, str] | None = None,
        ignore_labels: list[str] | None = None,
        system_prompt: str | None = None,
        packing: bool = False,
        pack_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.packing, self.pack_length = packing, pack_length or self.max_length
        if packing and self.pack_length < self.max_length:
            raise ToolkitError(
                f"data.pack_length={pack_length} is shorter than data.max_length={self.max_length}; "
                "a packed row must hold the longest example"
            )
        self.group_by_length = self.group_by_length and not packing  # packed rows are all about full
        if (response_column is None) == (label_column is None):
            raise ToolkitError(
                "set exactly one of data.response_column and data.label_column (with data.answers)"
            )
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.response_column, self.label_column = response_column, label_column
        self.answers = dict(answers or {})
        self.ignore_labels = list(ignore_labels or [])

    @property
    def answer_choices(self) -> list[str]:
        """The distinct answers, when answers are labels (used by the generated-label accuracy)."""
        return list(dict.fromkeys(self.answers.values()))

    def prepare(self, dataset: Dataset) -> Dataset:
        check_columns(dataset, {"response_column": self.response_column, "label_column": self.label_column})
        if self.label_column is not None:
            names = list(self.answers)
            ids = encode_labels(dataset[self.label_column], names, self.ignore_labels)
            answers = [self.answers[names[i]] if i >= 0 else "" for i in ids]
            dataset = dataset.add_column("_answer", answers).filter(lambda row: row["_answer"] != "")
        else:
            dataset = dataset.add_column("_answer", [str(x) for x in dataset[self.response_column]])
        encode = partial(
            _encode_chat,
            tokenizer=self.tokenizer,
            template=self.prompt_template,
            system=self.system_prompt,
            max_length=self.max_length,
            choices=self.answer_choices,
        )
        return dataset.map(encode, remove_columns=dataset.column_names, desc="chat template")

    def setup(self, stage: str | None = None) -> None:
        fresh = self.splits is None
        super().setup(stage)
        if fresh and self.packing:
            self.splits["train"] = pack_dataset(self.splits["train"], self.pack_length)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if "position_ids" in features[0]:
            return collate_packed(features, pad_id)
        width = self.max_length if self.padding == "max_length" else None
        batch = {
            "input_ids": _pad([f["input_ids"] for f in features], pad_id, left=False, width=width),
            "labels": _pad([f["labels"] for f in features], -100, left=False, width=width),
            "prompt_input_ids": _pad([f["prompt_input_ids"] for f in features], pad_id, left=True),
            "answer_index": torch.tensor([f["answer_index"] for f in features]),
        }
        batch["attention_mask"] = _pad(
            [[1] * len(f["input_ids"]) for f in features], 0, left=False, width=width
        )
        batch["prompt_attention_mask"] = _pad(
            [[1] * len(f["prompt_input_ids"]) for f in features], 0, left=True
        )
        return batch


def _encode_chat(
    row: dict,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    system: str | None,
    max_length: int,
    choices: list[str],
) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": template.format(**row)})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": row["_answer"]}], tokenize=False
    )
    # The template already writes the special tokens; tokenizing must not add another BOS.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    answer_ids = full_ids[len(prompt_ids) :]
    keep = max(max_length - len(answer_ids), 1)  # truncate the prompt's middle, never the answer
    if len(prompt_ids) > keep:
        prompt_ids = prompt_ids[: keep // 2] + prompt_ids[len(prompt_ids) - (keep - keep // 2) :]
    answer = row["_answer"]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [-100] * len(prompt_ids) + answer_ids,
        "prompt_input_ids": prompt_ids,
        "answer_index": choices.index(answer) if answer in choices else -1,
    }


def _pad(rows: list[list[int]], value: int, left: bool, width: int | None = None) -> torch.Tensor:
    width = width or max(len(r) for r in rows)
    padded = [
        ([value] * (width - len(r)) + list(r)) if left else (list(r) + [value] * (width - len(r)))
        for r in rows
    ]
    return torch.tensor(padded, dtype=torch.long)
