"""Text data: the stateful, rank-aware loaders every tokenized data module shares, and text classification.

`path` is what `load_dataset` takes first: a hub id, a local directory, or a local csv/json/jsonl/parquet/txt
file (toolkit.data.sources). A dataset without ready-made validation/test splits is split once with a fixed
seed; its fingerprint is recorded in the run directory, so later stages can refuse a different test set.
"""

from __future__ import annotations

from functools import cached_property, partial
from typing import Any

import lightning as L
import torch
from datasets import Dataset, DatasetDict
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from toolkit.data.samplers import LengthGroupedSampler, ResumableSampler
from toolkit.data.sources import (
    SPLITS,
    check_columns,
    encode_labels,
    fingerprint,
    load_splits,
)
from toolkit.errors import ToolkitError
from toolkit.models.build import load_tokenizer

PADDINGS = ("longest", "max_length")


LENGTH_GROUP_BATCHES = (
    50  # group_by_length sorts windows of this many batches (as transformers' sampler does)
)


class TokenizedData(L.LightningDataModule):
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

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_path)  # on first use: a task or data module is cheap to build

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def processor(self) -> PreTrainedTokenizerBase:
        """What export saves beside the model."""
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            splits = self.load()
            self.splits = DatasetDict({s: self.prepare_split(s, splits[s]) for s in SPLITS})

    def load(self) -> DatasetDict:
        """The raw train/validation/test splits of data.path."""
        return load_splits(self.path, self.name, self.val_size, self.test_size, self.seed)

    def prepare_split(self, split: str, dataset: Dataset) -> Dataset:
        """The split encoded, then cut to its example limit."""
        return self._limit(split, self.prepare(dataset))

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


class TextClassificationData(TokenizedData):
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
