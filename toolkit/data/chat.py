"""Chat SFT data: conversations in any common shape, rendered with the tokenizer's chat template.

`data.format` picks the shape: `prompt_response` (one user turn from `prompt_template`, the answer from a
column or a label), `messages`, `sharegpt`, `alpaca` (toolkit.data.conversations), or `text` (continued
pretraining: every token is trained on). Rows that cannot be read are counted; more than
`data.max_bad_fraction` of them fails the run, naming the first bad row.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets, interleave_datasets
from transformers import PreTrainedTokenizerBase

from toolkit.data.conversations import (
    SHAREGPT_ROLES,
    TRAIN_ON,
    alpaca_messages,
    check_trainable,
    fit_by_turns,
    parse_messages,
)
from toolkit.data.packing import collate_packed, pack_dataset
from toolkit.data.sources import (
    SPLITS,
    check_columns,
    encode_labels,
)
from toolkit.data.text import TokenizedData
from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)


def check_data_source(source: dict[str, Any], index: int) -> dict[str, Any]:
    """A data.sources entry: a path, and a positive weight (default 1)."""
    if not source.get("path"):
        raise ToolkitError(f"data.sources[{index}] has no path; each source needs path (and format, weight)")
    weight = source.setdefault("weight", 1.0)
    if not isinstance(weight, int | float) or weight <= 0:
        raise ToolkitError(f"data.sources[{index}].weight={weight} must be a positive number")
    return source


def check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ToolkitError(f"{key}='{value}' is not supported; valid: {', '.join(valid)}")


FORMATS = ("prompt_response", "messages", "sharegpt", "alpaca", "text")
MIX_STOPPING = ("first_exhausted", "all_exhausted")  # stop the mixture when one source / every source ran out
TOO_LONG = "too long"


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
        prompt_template: str | None = None,
        format: str = "prompt_response",
        messages_column: str | None = None,
        text_column: str = "text",
        role_key: str | None = None,
        content_key: str | None = None,
        roles: dict[str, str] | None = None,
        input_template: str = "{instruction}\n\n{input}",
        train_on: str = "assistant",
        max_bad_fraction: float = 0.0,
        response_column: str | None = None,
        label_column: str | None = None,
        answers: dict[str, str] | None = None,
        ignore_labels: list[str] | None = None,
        system_prompt: str | None = None,
        packing: bool = False,
        pack_length: int | None = None,
        sources: list[dict[str, Any]] | None = None,
        mix_stopping: str = "first_exhausted",
        **kwargs: Any,
    ) -> None:
        # every argument, for the data module of each source of a mixture (which overrides some of them)
        arguments = dict(locals())
        self.options = {k: v for k, v in arguments.items() if k not in ("self", "kwargs", "__class__")}
        self.options.update(kwargs)
        super().__init__(**kwargs)
        self.sources = [check_data_source(dict(source), i) for i, source in enumerate(sources or [])]
        check_choice("data.mix_stopping", mix_stopping, MIX_STOPPING)
        self.mix_stopping, self.parts = mix_stopping, []
        self.packing, self.pack_length = packing, pack_length or self.max_length
        if packing and self.pack_length < self.max_length:
            raise ToolkitError(
                f"data.pack_length={pack_length} is shorter than data.max_length={self.max_length}; "
                "a packed row must hold the longest example"
            )
        self.group_by_length = self.group_by_length and not packing  # packed rows are all about full
        check_choice("data.format", format, FORMATS)
        check_choice("data.train_on", train_on, TRAIN_ON)
        single_turn = format == "prompt_response" and not self.sources
        if single_turn and (response_column is None) == (label_column is None):
            raise ToolkitError(
                "set exactly one of data.response_column and data.label_column (with data.answers)"
            )
        self.format, self.train_on, self.max_bad_fraction = format, train_on, max_bad_fraction
        messages_column = messages_column or ("conversations" if format == "sharegpt" else "messages")
        self.messages_column, self.text_column, self.input_template = (
            messages_column,
            text_column,
            input_template,
        )
        sharegpt = format == "sharegpt"
        self.role_key = role_key or ("from" if sharegpt else "role")
        self.content_key = content_key or ("value" if sharegpt else "content")
        self.roles = dict(roles) if roles else (dict(SHAREGPT_ROLES) if sharegpt else None)
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.response_column, self.label_column = response_column, label_column
        self.answers = dict(answers or {})
        self.ignore_labels = list(ignore_labels or [])

    @property
    def answer_choices(self) -> list[str]:
        """The distinct answers, when answers are labels (used by the generated-label accuracy)."""
        if self.format != "prompt_response":  # conversations carry no label to generate
            return []
        return list(dict.fromkeys(self.answers.values()))

    def prepare(self, dataset: Dataset) -> Dataset:
        if self.format == "text":
            return self.prepare_text(dataset)
        if self.format != "prompt_response":
            return self.prepare_conversations(dataset)
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

    def prepare_split(self, split: str, dataset: Dataset) -> Dataset:
        """Conversations with an example limit are encoded in growing windows of rows until the limit is
        met: a tiny run on ShareGPT reads a few hundred chats, not eleven thousand. Rows are encoded in order,
        so the examples are the same as encoding every row and cutting after."""
        limit = self.max_train_examples if split == "train" else self.max_eval_examples
        if not limit or self.format in ("prompt_response", "text"):
            return super().prepare_split(split, dataset)
        rows = 2 * limit
        while True:
            encoded = self.prepare(dataset.select(range(min(rows, len(dataset)))))
            if len(encoded) >= limit or rows >= len(dataset):
                return self._limit(split, encoded)
            rows *= 4

    def prepare_text(self, dataset: Dataset) -> Dataset:
        """Raw text: every token is a target (the model's loss shifts by one itself)."""
        check_columns(dataset, {"text_column": self.text_column})

        def tokenize(rows: dict) -> dict:
            ids = self.tokenizer(
                [str(t) for t in rows[self.text_column]], truncation=True, max_length=self.max_length
            )
            return {"input_ids": ids["input_ids"], "labels": ids["input_ids"]}

        return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")

    def prepare_conversations(self, dataset: Dataset) -> Dataset:
        column = None if self.format == "alpaca" else self.messages_column
        check_columns(dataset, {"messages_column": column})
        # only the options the encoding reads: datasets' cache key hashes the function and its arguments, so
        # a bound method (the whole module: batch size, packing, ...) would re-tokenize on every such change
        encode = partial(
            encode_row,
            tokenizer=self.tokenizer,
            format=self.format,
            messages_keys=(self.messages_column, self.role_key, self.content_key),
            roles=self.roles,
            input_template=self.input_template,
            system_prompt=self.system_prompt,
            train_on=self.train_on,
            max_length=self.max_length,
        )
        encoded = dataset.map(encode, remove_columns=dataset.column_names, desc="chat template")
        problems = [(row, why) for row, why in zip(encoded["_row"], encoded["_problem"], strict=True) if why]
        bad = [(row, why) for row, why in problems if why != TOO_LONG]
        if bad and len(bad) > self.max_bad_fraction * len(dataset):
            row, why = bad[0]
            raise ToolkitError(
                f"data row {row} of '{self.path}': {why}; {len(bad)} of {len(dataset)} rows are bad, more "
                f"than data.max_bad_fraction={self.max_bad_fraction} allows"
            )
        if bad:
            log.warning(
                "skipped %d of %d rows that cannot be read (first: row %d, %s)",
                len(bad),
                len(dataset),
                *bad[0],
            )
        too_long = len(problems) - len(bad)
        if too_long:
            log.warning(
                "skipped %d of %d conversations longer than data.max_length=%d without earlier turns",
                too_long,
                len(dataset),
                self.max_length,
            )
        return encoded.filter(lambda r: not r["_problem"]).remove_columns(["_row", "_problem"])

    def setup(self, stage: str | None = None) -> None:
        fresh = self.splits is None
        if fresh and self.sources:
            self.splits = self.mixed_splits()
        else:
            super().setup(stage)
        if fresh and self.packing:
            self.splits["train"] = pack_dataset(self.splits["train"], self.pack_length)

    def mixed_splits(self) -> DatasetDict:
        """data.sources: each source read, split and encoded on its own; the training splits interleaved by
        weight (a fixed, seeded order, so the sampler resumes a mixture exactly as any dataset), the
        held-out splits concatenated. `_source` says which source a row came from."""
        self.parts = [self.source_module(source) for source in self.sources]
        for part in self.parts:
            part.setup()
        splits = {}
        for split in SPLITS:
            tables = []
            for i, part in enumerate(self.parts):
                table = part.splits[split]
                tables.append(table.add_column("_source", [i] * len(table)))
            common = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
            splits[split] = [t.select_columns(common) for t in tables]
        weights = [source["weight"] for source in self.sources]
        train = interleave_datasets(
            splits["train"],
            probabilities=[w / sum(weights) for w in weights],
            seed=self.seed,
            stopping_strategy=self.mix_stopping,
        )
        held_out = {s: concatenate_datasets(splits[s]) for s in ("validation", "test")}
        return DatasetDict(train=train, **held_out)

    def source_module(self, source: dict[str, Any]) -> ChatSFTData:
        """The data module of one source: this module's settings with the source's own on top."""
        own = {k: v for k, v in source.items() if k not in ("weight", "max_examples")}
        limit = source.get("max_examples") or self.max_train_examples
        options = {**self.options, **own, "sources": None, "packing": False, "max_train_examples": limit}
        return ChatSFTData(**options)

    def split_fingerprints(self) -> dict[str, Any]:
        record = super().split_fingerprints()
        if self.parts:  # a mixture records every source, so a rerun can tell where its data came from
            record["sources"] = [
                {
                    "path": str(part.path),
                    "format": part.format,
                    "weight": source["weight"],
                    **part.split_fingerprints(),
                }
                for part, source in zip(self.parts, self.sources, strict=True)
            ]
        return record

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if "position_ids" in features[0]:
            return collate_packed(features, pad_id)
        width = self.max_length if self.padding == "max_length" else None
        batch = {
            "input_ids": _pad([f["input_ids"] for f in features], pad_id, left=False, width=width),
            "labels": _pad([f["labels"] for f in features], -100, left=False, width=width),
            "attention_mask": _pad([[1] * len(f["input_ids"]) for f in features], 0, left=False, width=width),
        }
        if "prompt_input_ids" in features[0]:  # single-turn prompts: generation metrics need the prompt alone
            prompts = [f["prompt_input_ids"] for f in features]
            batch["prompt_input_ids"] = _pad(prompts, pad_id, left=True)
            batch["prompt_attention_mask"] = _pad([[1] * len(p) for p in prompts], 0, left=True)
            batch["answer_index"] = torch.tensor([f["answer_index"] for f in features])
        return batch


def encode_row(
    row: dict,
    tokenizer: PreTrainedTokenizerBase,
    format: str,
    messages_keys: tuple[str, str, str],
    roles: dict[str, str] | None,
    input_template: str,
    system_prompt: str | None,
    train_on: str,
    max_length: int,
) -> dict:
    """One conversation row -> input_ids, labels (and `_problem`: why it is skipped, empty when it is not)."""
    if format == "alpaca":
        messages, why = alpaca_messages(row, input_template, system_prompt)
    else:
        column, role_key, content_key = messages_keys
        messages, why = parse_messages(row[column], role_key, content_key, roles)
        if messages and system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
    why = why or check_trainable(messages, train_on)
    encoded = None
    if not why:
        encoded, _ = fit_by_turns(tokenizer, messages, max_length, train_on)
        why = "" if encoded else TOO_LONG
    encoded = encoded or {"input_ids": [], "labels": []}
    return {**encoded, "_row": row["_row"], "_problem": why or ""}


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
