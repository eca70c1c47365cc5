"""Preference data: a prompt with a chosen and a rejected answer (DPO, IPO, ORPO), or one answer marked
desirable or not (KTO), rendered with the tokenizer's chat template exactly as chat SFT data is.

`data.format` picks the shape:
- `pairs` (TRL's): `prompt` (a string, or a `messages` history with system prompt), `chosen`, `rejected` (a
  string, or a list holding the assistant message);
- `sharegpt_pairs` (LLaMA-Factory's `dpo`): `conversations` (ShareGPT turns), `chosen` and `rejected`
  ({from, value}), an optional `system` column;
- `unpaired` (KTO's): `messages` whose last turn is the answer, and a boolean `label` (true: desirable); or
  TRL's `prompt`, `completion`, `label`;
- `label_pairs`: a labelled classification set asked as the SFT prompt (`prompt_template`), chosen = the true
  label's answer (`answers`), rejected = each other answer: a real preference set as large as the data;
- `feedback_pairs` / `feedback_ratings` (`data=feedback`): what users said about a served model's answers
  (`<run>/feedback/feedback.jsonl`, written by toolkit-serve): its comparisons as DPO pairs, its ratings as
  KTO examples (1: desirable, -1: undesirable).

A pair becomes prompt tokens and the tokens of each answer, split where the two renderings stop agreeing
(the template's assistant header belongs to the prompt). Truncation keeps both answers whole and drops the
prompt's first tokens, the same for chosen and rejected. A pair whose answers are equal teaches nothing: it
is counted and dropped, and data where every pair is so is refused.
"""

from __future__ import annotations

import inspect
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from datasets import Dataset, DatasetDict
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from toolkit.data.conversations import IGNORE, SHAREGPT_ROLES, parse_messages
from toolkit.data.sources import SPLITS, check_columns, encode_labels, fingerprint, load_splits
from toolkit.data.text import TokenizedData
from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

FORMATS = ("pairs", "sharegpt_pairs", "unpaired", "label_pairs", "feedback_pairs", "feedback_ratings")
FEEDBACK_KINDS = {"feedback_pairs": "comparison", "feedback_ratings": "rating"}
CONSTRUCTIONS = {  # how each format's preferences were made, for the run report
    "pairs": "pairs as given: prompt, chosen and rejected answers",
    "sharegpt_pairs": "pairs as given: a ShareGPT conversation, chosen and rejected answers",
    "unpaired": "single answers rated desirable or undesirable (KTO)",
    "label_pairs": "pairs built from labels: the prompt template filled from each row, chosen = the answer "
    "of its true label, rejected = each other answer",
    "feedback_pairs": "users' comparisons of two served answers to the same messages (toolkit-serve "
    "feedback)",
    "feedback_ratings": "users' ratings of served answers, 1 desirable and -1 undesirable (toolkit-serve "
    "feedback)",
}
PAIRED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "desirable", "kl_completion_ids")


def is_kind(row: dict, kind: str) -> bool:
    return row.get("kind") == kind


class PreferenceData(TokenizedData):
    """Preference pairs (or KTO's unpaired examples) -> batches whose chosen and rejected rows go through the
    model in one forward pass: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected (as TRL batches
    them); `labels` mark the answer tokens. KTO batches hold each example once, plus `kl_*` rows pairing each
    prompt with another example's answer (the reference point of the KTO loss)."""

    def __init__(
        self,
        format: str = "pairs",
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        messages_column: str | None = None,
        completion_column: str = "completion",
        label_column: str = "label",
        system_column: str = "system",
        roles: dict[str, str] | None = None,
        system_prompt: str | None = None,
        prompt_template: str | None = None,
        answers: dict[str, str] | None = None,
        ignore_labels: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if format not in FORMATS:
            raise ToolkitError(
                f"data.format='{format}' is not a preference format; valid: {', '.join(FORMATS)}"
            )
        if format == "label_pairs" and (not prompt_template or len(answers or {}) < 2):
            raise ToolkitError(
                "data.format=label_pairs needs data.prompt_template and two or more data.answers"
            )
        self.format, self.system_prompt, self.prompt_template = format, system_prompt, prompt_template
        self.columns = {
            "prompt_column": prompt_column,
            "chosen_column": chosen_column,
            "rejected_column": rejected_column,
            "completion_column": completion_column,
            "label_column": label_column,
            "system_column": system_column,
        }
        default_messages = "conversations" if format == "sharegpt_pairs" else "messages"
        self.messages_column = messages_column or default_messages
        self.roles = dict(roles) if roles else dict(SHAREGPT_ROLES)
        self.answers, self.ignore_labels = dict(answers or {}), list(ignore_labels or [])
        self.group_by_length = False  # pairs carry two answers; grouping by one of them would mislead

    @property
    def paired(self) -> bool:
        return self.format not in ("unpaired", "feedback_ratings")

    def prepare(self, dataset: Dataset) -> Dataset:
        examples = self.read(dataset)
        encode = partial(
            encode_preference, tokenizer=self.tokenizer, max_length=self.max_length, paired=self.paired
        )
        encoded = examples.map(
            encode,
            remove_columns=examples.column_names,
            desc="chat template",
            **self.cache_options(dataset, encode),
        )
        equal = sum(encoded["_equal"]) if self.paired else 0
        if equal and equal == len(encoded):
            raise ToolkitError(
                f"every one of the {equal} pairs of '{self.path}' has chosen equal to rejected; "
                f"check data.chosen_column / data.rejected_column"
            )
        if equal:
            log.warning("dropped %d of %d pairs whose chosen equals rejected", equal, len(encoded))
        too_long = sum(1 for ok in encoded["_fits"] if not ok)
        if too_long:
            log.warning(
                "dropped %d of %d examples whose answers alone exceed data.max_length=%d",
                too_long,
                len(encoded),
                self.max_length,
            )
        kept = encoded.filter(lambda r: r["_fits"] and not r["_equal"]).remove_columns(["_fits", "_equal"])
        return kept if self.paired else with_kl_completions(kept)

    def cache_options(self, source: Dataset, encode: partial) -> dict[str, str]:
        """The rows are read into an in-memory table, which datasets never caches, and rendering them is the
        slow part (~13 ms a template rendering, three per pair): the encoded table is cached beside the
        source's files, keyed by the source's fingerprint, how it is read, and the encoding (its code, the
        tokenizer with its chat template, the options)."""
        if not source.cache_files:
            return {}
        reading = [self.format, self.columns, self.messages_column, self.roles, self.system_prompt,
                   self.prompt_template, self.answers, self.ignore_labels]  # fmt: skip
        # datasets hashes module functions by name, not code: the encoding's source and the template
        # renderer's version join the key, so a changed encoding never reads stale rows
        key = Hasher.hash([source._fingerprint, reading, encode, ENCODING_SOURCE, transformers.__version__])
        directory = Path(source.cache_files[0]["filename"]).parent
        return {"cache_file_name": str(directory / f"preference-{key}.arrow"), "new_fingerprint": key}

    def read(self, dataset: Dataset) -> Dataset:
        """The rows as `prompt` (messages), `chosen`/`rejected` (answer strings) or `completion` + `label`."""
        reader = {
            "pairs": self.read_pairs,
            "sharegpt_pairs": self.read_sharegpt_pairs,
            "unpaired": self.read_unpaired,
            "label_pairs": self.read_label_pairs,
            "feedback_pairs": self.read_feedback,
            "feedback_ratings": self.read_feedback,
        }[self.format]
        rows = reader(dataset)
        if not rows:
            raise ToolkitError(f"'{self.path}' holds no {self.format} rows")
        return Dataset.from_list(rows)

    def read_pairs(self, dataset: Dataset) -> list[dict]:
        c = self.columns
        self.check(dataset, ("prompt_column", "chosen_column", "rejected_column"))
        return [
            {
                "prompt": self.prompt_messages(row[c["prompt_column"]], row["_row"]),
                "chosen": answer_text(row[c["chosen_column"]], row["_row"]),
                "rejected": answer_text(row[c["rejected_column"]], row["_row"]),
            }
            for row in dataset
        ]

    def read_sharegpt_pairs(self, dataset: Dataset) -> list[dict]:
        c = self.columns
        self.check(dataset, ("chosen_column", "rejected_column"), messages=True)
        rows = []
        for row in dataset:
            history, why = parse_messages(row[self.messages_column], "from", "value", self.roles)
            if why:
                raise ToolkitError(f"data row {row['_row']} of '{self.path}': {why}")
            system = row.get(c["system_column"]) or self.system_prompt
            prompt = ([{"role": "system", "content": system}] if system else []) + history
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": answer_text(row[c["chosen_column"]], row["_row"]),
                    "rejected": answer_text(row[c["rejected_column"]], row["_row"]),
                }
            )
        return rows

    def read_unpaired(self, dataset: Dataset) -> list[dict]:
        c = self.columns
        with_prompt = (
            c["prompt_column"] in dataset.column_names and self.messages_column not in dataset.column_names
        )
        if with_prompt:
            self.check(dataset, ("prompt_column", "completion_column", "label_column"))
        else:
            self.check(dataset, ("label_column",), messages=True)
        rows = []
        for row in dataset:
            if with_prompt:
                prompt = self.prompt_messages(row[c["prompt_column"]], row["_row"])
                completion = answer_text(row[c["completion_column"]], row["_row"])
            else:
                messages, why = parse_messages(row[self.messages_column], roles=self.roles)
                if why or messages[-1]["role"] != "assistant":
                    why = why or "the last turn is not the assistant's answer"
                    raise ToolkitError(f"data row {row['_row']} of '{self.path}': {why}")
                prompt, completion = self.with_system(messages[:-1]), messages[-1]["content"]
            rows.append(
                {"prompt": prompt, "completion": completion, "label": desirable(row, c["label_column"])}
            )
        return rows

    def prepare_split(self, split: str, dataset: Dataset) -> Dataset:
        """KTO's training split needs both kinds of example (a few held-out ones may all be of one)."""
        prepared = super().prepare_split(split, dataset)
        if split == "train" and not self.paired and len(set(prepared["desirable"])) < 2:
            only = "desirable" if prepared[0]["desirable"] else "undesirable"
            raise ToolkitError(
                f"KTO data '{self.path}' has only {only} training examples (data.label_column="
                f"'{self.columns['label_column']}'); it needs both true (desirable) and false (undesirable) "
                "labels"
            )
        return prepared

    def load(self) -> DatasetDict:
        """Feedback: the lines of this format's kind (comparisons or ratings), split among themselves."""
        if self.format not in FEEDBACK_KINDS:
            return super().load()
        kind = FEEDBACK_KINDS[self.format]
        other = next(f for f in FEEDBACK_KINDS if f != self.format)
        what = f"{kind} feedback (toolkit-serve's feedback.jsonl; data.format={other} reads the other kind)"
        return load_splits(self.path, self.name, self.val_size, self.test_size, self.seed,
                           keep=(partial(is_kind, kind=kind), what))  # fmt: skip

    def read_feedback(self, dataset: Dataset) -> list[dict]:
        """Feedback lines carry the `pairs` (prompt, chosen, rejected) or KTO (prompt, completion, label)
        columns."""
        return self.read_pairs(dataset) if self.paired else self.read_unpaired(dataset)

    def read_label_pairs(self, dataset: Dataset) -> list[dict]:
        label_column = self.columns["label_column"]
        self.check(dataset, ("label_column",))
        names = list(self.answers)
        ids = encode_labels(dataset[label_column], names, self.ignore_labels)
        rows = []
        for row, label in zip(dataset, ids, strict=True):
            if label < 0:
                continue
            prompt = self.with_system([{"role": "user", "content": self.prompt_template.format(**row)}])
            chosen = self.answers[names[label]]
            for other in names:  # one pair per wrong answer
                if self.answers[other] != chosen:
                    rows.append({"prompt": prompt, "chosen": chosen, "rejected": self.answers[other]})
        return rows

    def prompt_messages(self, prompt: Any, row: int) -> list[dict]:
        """A prompt string (one user turn) or a messages history."""
        if isinstance(prompt, str):
            return self.with_system([{"role": "user", "content": prompt}])
        messages, why = parse_messages(prompt, roles=self.roles)
        if why:
            raise ToolkitError(f"data row {row} of '{self.path}': prompt {why}")
        return self.with_system(messages)

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def check(self, dataset: Dataset, keys: tuple[str, ...], messages: bool = False) -> None:
        wanted = {key: self.columns[key] for key in keys}
        if messages:
            wanted["messages_column"] = self.messages_column
        check_columns(dataset, wanted)

    def split_fingerprints(self) -> dict[str, Any]:
        self.setup()
        columns = list(PAIRED_COLUMNS if self.paired else UNPAIRED_COLUMNS[:3])
        record: dict[str, Any] = {
            s: {"rows": len(self.splits[s]), "sha256": fingerprint(self.splits[s], columns)} for s in SPLITS
        }
        if self.format in FEEDBACK_KINDS:  # the served run whose users' feedback this run learns from
            record["feedback"] = {"path": str(Path(self.path).resolve()), "format": self.format}
        return record

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if self.paired:
            answers = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
            batch = answer_rows([f["prompt_ids"] for f in features] * 2, answers, pad_id)
            if "ref_chosen_logps" in features[0]:  # precomputed reference log-probabilities
                ref = [f["ref_chosen_logps"] for f in features] + [f["ref_rejected_logps"] for f in features]
                batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
            return batch
        prompts = [f["prompt_ids"] for f in features]
        batch = answer_rows(prompts, [f["completion_ids"] for f in features], pad_id)
        kl = answer_rows(prompts, [f["kl_completion_ids"] for f in features], pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([f["desirable"] for f in features], dtype=torch.bool)
        if "ref_logps" in features[0]:
            batch["ref_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float32)
            batch["kl_ref_logps"] = torch.tensor([f["kl_ref_logps"] for f in features], dtype=torch.float32)
        return batch


def answer_text(answer: Any, row: int) -> str:
    """An answer as a string, a {from, value} / {role, content} turn, or a list ending with that turn."""
    if isinstance(answer, list) and answer:
        answer = answer[-1]
    if isinstance(answer, dict):
        answer = answer.get("content", answer.get("value"))
    if not isinstance(answer, str):
        raise ToolkitError(
            f"data row {row}: an answer must be a string or an assistant turn, not {answer!r:.60}"
        )
    return answer


def desirable(row: dict, column: str) -> bool:
    value = row[column]
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ToolkitError(f"data row {row['_row']}: {column}={value!r} must be true (desirable) or false")


def render(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], answer: str | None) -> list[int]:
    messages = prompt if answer is None else [*prompt, {"role": "assistant", "content": answer}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens


def common_prefix(*sequences: list[int]) -> int:
    length = 0
    for tokens in zip(*sequences, strict=False):
        if any(t != tokens[0] for t in tokens):
            break
        length += 1
    return length


def encode_preference(row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, paired: bool) -> dict:
    """Prompt and answer token ids; the prompt loses its first tokens when prompt + longest answer is over
    max_length. `_fits` is false when the answers alone are; `_equal` marks a pair with identical answers."""
    answers = [row["chosen"], row["rejected"]] if paired else [row["completion"]]
    rendered = [render(tokenizer, row["prompt"], answer) for answer in answers]
    split = common_prefix(render(tokenizer, row["prompt"], None), *rendered)
    prompt, completions = rendered[0][:split], [ids[split:] for ids in rendered]
    room = max_length - max(len(ids) for ids in completions)
    fits = room >= 1 and all(completions)
    prompt = prompt[len(prompt) - room :] if fits and len(prompt) > room else prompt
    if paired:
        equal = row["chosen"].strip() == row["rejected"].strip()
        return {"prompt_ids": prompt, "chosen_ids": completions[0], "rejected_ids": completions[1],
                "_fits": fits, "_equal": equal}  # fmt: skip
    return {"prompt_ids": prompt, "completion_ids": completions[0], "desirable": row["label"],
            "_fits": fits, "_equal": False}  # fmt: skip


ENCODING_SOURCE = "".join(inspect.getsource(f) for f in (render, common_prefix, encode_preference))


def with_kl_completions(dataset: Dataset) -> Dataset:
    """KTO's reference point pairs each prompt with another example's answer: example i with the answer of
    example i - 1, fixed in the dataset (so reference log-probabilities of the pairs can be precomputed)."""
    completions = dataset["completion_ids"]
    return dataset.add_column("kl_completion_ids", completions[-1:] + completions[:-1])


def answer_rows(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """prompt + answer rows, right-padded; labels are the answer tokens (IGNORE on prompt and padding)."""
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(prompt) : len(row)] = torch.tensor(row[len(prompt) :])
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
