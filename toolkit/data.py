"""LightningDataModules over Hugging Face `datasets`: text classification and chat-template SFT.

`path` is what `load_dataset` takes first: a hub id, a local directory, or a local csv/json/jsonl/parquet/txt
file. A dataset without ready-made validation/test splits is split once with a fixed seed; the split's
fingerprint is recorded in the run directory so later stages can refuse a different test set.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import Dataset, DatasetDict, load_dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from toolkit.errors import ToolkitError
from toolkit.models import load_tokenizer
from toolkit.packing import collate_packed, pack_dataset
from toolkit.samplers import LengthGroupedSampler, ResumableSampler

FILE_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
COMPRESSION = (".bz2", ".gz", ".xz", ".zst")
SPLITS = ("train", "validation", "test")
PADDINGS = ("longest", "max_length")
LENGTH_GROUP_BATCHES = (
    50  # group_by_length sorts windows of this many batches (as transformers' sampler does)
)


def load_splits(path: str, name: str | None, val_size: float, test_size: float, seed: int) -> DatasetDict:
    """Load `path` (hub id, directory or file) and return train/validation/test splits."""
    raw = _load_raw(path, name)
    if all(s in raw for s in SPLITS):
        return DatasetDict({s: raw[s] for s in SPLITS})
    base = raw["train"] if "train" in raw else raw[next(iter(raw))]
    # Held-out splits come from one seeded shuffle, so every rank and every rerun sees the same test set.
    first = base.train_test_split(test_size=test_size, seed=seed)
    rest = first["train"].train_test_split(test_size=val_size / (1 - test_size), seed=seed)
    return DatasetDict(train=rest["train"], validation=rest["test"], test=first["test"])


def _load_raw(path: str, name: str | None) -> DatasetDict:
    local = Path(path)
    try:
        if local.is_file():
            suffixes = [s for s in local.suffixes if s not in COMPRESSION]
            suffix = suffixes[-1] if suffixes else ""
            if suffix not in FILE_FORMATS:
                raise ToolkitError(
                    f"data.path '{path}' has an unknown format; valid: {', '.join(FILE_FORMATS)} "
                    f"(optionally {'/'.join(COMPRESSION)} compressed)"
                )
            fmt = FILE_FORMATS[suffix]
            kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
            return load_dataset(fmt, data_files=str(local), **kwargs)
        if not local.exists() and (path.startswith((".", "/", "~")) or local.suffix in FILE_FORMATS):
            raise ToolkitError(f"data.path '{path}' does not exist")
        return load_dataset(path, name)  # a local dataset directory or a hub id
    except ToolkitError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the path and the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ToolkitError(f"cannot read data.path '{path}': {first}") from err


def fingerprint(dataset: Dataset, columns: list[str]) -> str:
    """A content hash of the given columns, to recognise the same split later."""
    digest = hashlib.sha256()
    for column in columns:
        digest.update(repr(dataset[column]).encode())
    return digest.hexdigest()[:16]


def check_columns(dataset: Dataset, wanted: dict[str, str | None]) -> None:
    present = dataset.column_names
    for key, column in wanted.items():
        if column is not None and column not in present:
            raise ToolkitError(
                f"data.{key}='{column}' is not a column of the dataset; columns: {', '.join(present)}"
            )


def encode_labels(labels: list, label_names: list[str] | None, ignore_labels: list[str]) -> list[int]:
    """Map raw labels to ids (positions in label_names); -1 marks rows to drop (ignore_labels)."""
    if label_names is None:
        return [int(x) for x in labels]
    index = {str(name): i for i, name in enumerate(label_names)}
    ignored = {str(x) for x in ignore_labels}
    out = []
    for raw in labels:
        key = str(raw)
        if key not in index and key not in ignored:
            raise ToolkitError(
                f"label '{raw}' is not in data.label_names {list(label_names)} "
                f"nor in data.ignore_labels {list(ignore_labels)}"
            )
        out.append(index.get(key, -1))
    return out


class _HFData(L.LightningDataModule):
    """Loaders shared by the data modules: stateful (exactly resumable mid-epoch) and rank-aware."""

    def __init__(
        self,
        path: str,
        tokenizer: str,
        name: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_size: float = 0.1,
        test_size: float = 0.1,
        seed: int = 42,
        max_length: int = 128,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        num_workers: int = 0,
        group_by_length: bool = False,
        padding: str = "longest",
    ) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ToolkitError(f"data.padding '{padding}' is not supported; valid: {', '.join(PADDINGS)}")
        self.padding = padding
        self.path, self.name, self.tokenizer_path = path, name, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_size, self.test_size, self.seed = val_size, test_size, seed
        self.max_length, self.num_workers = max_length, num_workers
        self.group_by_length = group_by_length
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.splits: DatasetDict | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def processor(self) -> PreTrainedTokenizerBase:
        """What export saves beside the model."""
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            splits = load_splits(self.path, self.name, self.val_size, self.test_size, self.seed)
            self.splits = DatasetDict({s: self._limit(s, self.prepare(splits[s])) for s in SPLITS})

    def _limit(self, split: str, dataset: Dataset) -> Dataset:
        limit = self.max_train_examples if split == "train" else self.max_eval_examples
        return dataset.select(range(min(limit, len(dataset)))) if limit else dataset

    def prepare(self, dataset: Dataset) -> Dataset:  # tokenise one split; cached by datasets
        raise NotImplementedError

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def split_fingerprints(self) -> dict[str, Any]:
        self.setup()
        return {
            s: {"rows": len(self.splits[s]), "sha256": fingerprint(self.splits[s], ["input_ids"])}
            for s in SPLITS
        }

    def train_dataloader(self) -> StatefulDataLoader:
        dataset = self.splits["train"]
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        )
        # The shuffle order is a function of (seed, epoch) alone, not of the global RNG, and the sampler's
        # position is saved in checkpoints: a resumed run sees exactly the batches it would have seen.
        # (torch's DistributedSampler replays the wrong epoch's order on resume.)
        if self.group_by_length:
            lengths = [len(ids) for ids in dataset["input_ids"]]
            sampler = LengthGroupedSampler(
                dataset,
                lengths,
                self.batch_size,
                LENGTH_GROUP_BATCHES,
                num_replicas=world,
                rank=rank,
                seed=self.seed,
            )
        else:
            sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return self._loader(dataset, self.batch_size, sampler=sampler)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.splits["validation"], self.eval_batch_size)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.splits["test"], self.eval_batch_size)

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> StatefulDataLoader:
        return StatefulDataLoader(
            dataset, batch_size=batch_size, collate_fn=self.collate, num_workers=self.num_workers, **kwargs
        )


class TextClassificationData(_HFData):
    """Texts with a label column -> input_ids, attention_mask, labels (padded per batch)."""

    def __init__(
        self,
        text_column: str = "text",
        label_column: str = "label",
        label_names: list[str] | None = None,
        ignore_labels: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.text_column, self.label_column = text_column, label_column
        self.label_names = list(label_names) if label_names is not None else None
        self.ignore_labels = list(ignore_labels or [])

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names is not None else None

    def prepare(self, dataset: Dataset) -> Dataset:
        check_columns(dataset, {"text_column": self.text_column, "label_column": self.label_column})
        ids = encode_labels(dataset[self.label_column], self.label_names, self.ignore_labels)
        dataset = dataset.add_column("label_id", ids).filter(lambda row: row["label_id"] >= 0)
        tokenize = partial(
            _tokenize_texts, tokenizer=self.tokenizer, column=self.text_column, max_length=self.max_length
        )
        return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([f["labels"] for f in features])
        batch = self.tokenizer.pad(
            [{"input_ids": f["input_ids"]} for f in features],
            padding=self.padding,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def _tokenize_texts(rows: dict, tokenizer: PreTrainedTokenizerBase, column: str, max_length: int) -> dict:
    encoded = tokenizer([str(t) for t in rows[column]], truncation=True, max_length=max_length)
    return {"input_ids": encoded["input_ids"], "labels": rows["label_id"]}


class ChatSFTData(_HFData):
    """Instruction pairs rendered with the tokenizer's chat template; the loss covers the answer only.

    The user turn is `prompt_template` filled with the row (`{text}` etc.); the answer is the row's
    `response_column`, or `answers[label]` when the data is a labelled classification set. Batches also carry
    the left-padded prompt alone (`prompt_input_ids`) and the answer text index, for generation metrics.
    `packing` packs the training split into rows of `pack_length` tokens (default `max_length`) with no
    attention across examples (toolkit.packing); evaluation splits stay one example per row.
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
