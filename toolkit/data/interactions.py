"""Sequential recommendation: interaction logs -> per-user item sequences -> next-item prediction.

Any table of (user, item, timestamp) works: MovieLens from the packaged asset, a local csv/parquet/json file,
or a hub dataset id (`data.path`, read like every other data module). Each user's interactions are sorted by
time (ties keep file order); the last item is the test target, the one before it the validation target, and
training sees only what came before the validation item (leave-last-out). Items are re-indexed 1..N in order
of their raw ids; 0 pads, N+1 is [MASK] for the masked objective.

Metrics rank the whole catalogue (no sampled negatives); items the user has already interacted with are
excluded from the ranking, for the model and for the popularity baseline alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import toolkit.models.recommenders  # noqa: F401  (registers its model types)
from toolkit.data.samplers import SplitLoaders
from toolkit.data.sources import load_raw
from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)


PAD = 0


OBJECTIVES = ("causal", "masked")


VOCAB_FILE = "item_vocab.json"


def load_interactions(path: str, name: str | None, columns: list[str]) -> pd.DataFrame:
    """The (user, item, time) columns of `path` as a DataFrame, in file order."""
    raw = load_raw(path, name)
    table = raw["train"] if "train" in raw else raw[next(iter(raw))]
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ToolkitError(
            f"interactions '{path}' lack column(s) {missing} (data.user_column, data.item_column, "
            f"data.time_column); columns present: {', '.join(table.column_names)}"
        )
    return table.select_columns(columns).to_pandas()


def user_sequences(frame: pd.DataFrame, user: str, item: str, time: str) -> dict[Any, list]:
    """user -> raw item ids in time order (a stable sort: equal timestamps keep file order)."""
    ordered = frame.sort_values([user, time], kind="stable")
    return {u: list(group[item]) for u, group in ordered.groupby(user, sort=True)}


def keep_active_users(sequences: dict[Any, list], min_interactions: int) -> dict[Any, list]:
    """Users with at least `min_interactions`; the others are dropped with a warning that counts them."""
    if min_interactions < 3:
        raise ToolkitError(
            f"data.min_interactions={min_interactions}: leave-last-out needs at least 3 interactions per "
            "user (training, validation and test items)"
        )
    kept = {u: s for u, s in sequences.items() if len(s) >= min_interactions}
    dropped = len(sequences) - len(kept)
    if not kept:
        raise ToolkitError(
            f"no user has data.min_interactions={min_interactions} interactions "
            f"(all {len(sequences)} users have fewer)"
        )
    if dropped:
        log.warning(
            "dropped %d of %d users with fewer than %d interactions (data.min_interactions)",
            dropped,
            len(sequences),
            min_interactions,
        )
    return kept


class ItemVocabulary:
    """Raw item ids <-> model ids (1..N; 0 pads; N+1 is [MASK] when `masked`). Saved beside the model."""

    def __init__(self, items: list, masked: bool) -> None:
        self.items, self.masked = list(items), masked
        self.index = {item: i + 1 for i, item in enumerate(self.items)}

    @property
    def mask_id(self) -> int | None:
        return len(self.items) + 1 if self.masked else None

    @property
    def size(self) -> int:
        """Embedding rows: padding, the items, and [MASK] if used."""
        return len(self.items) + 1 + int(self.masked)

    def encode(self, raw: list) -> list[int]:
        return [self.index[x] for x in raw]

    def save_pretrained(self, directory: str | Path) -> None:
        items = [x.item() if hasattr(x, "item") else x for x in self.items]  # numpy scalars -> json
        payload = {"pad_id": PAD, "mask_id": self.mask_id, "items": items}
        (Path(directory) / VOCAB_FILE).write_text(json.dumps(payload))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ItemVocabulary:
        payload = json.loads((Path(directory) / VOCAB_FILE).read_text())
        return cls(payload["items"], masked=payload["mask_id"] is not None)


def left_pad(ids: list[int], length: int, value: int) -> list[int]:
    return [value] * (length - len(ids)) + ids[-length:] if ids else [value] * length


def training_windows(history: list[int], length: int, objective: str) -> list[list[int]]:
    """Non-overlapping windows over a user's training history, cut from the most recent item backwards.

    Causal windows hold length+1 items (inputs and shifted labels); masked windows hold `length` items.
    """
    span = length + 1 if objective == "causal" else length
    windows, end = [], len(history)
    while end >= 2:
        windows.append(history[max(0, end - span) : end])
        end -= length
    return windows


class SequentialRecData(SplitLoaders):
    """Leave-last-out next-item data; batches are fixed-length, left-padded item sequences."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        user_column: str = "userId",
        item_column: str = "movieId",
        time_column: str = "timestamp",
        min_interactions: int = 5,
        max_length: int = 50,
        objective: str = "causal",
        mask_prob: float = 0.2,
        mask_last_prob: float = 0.1,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        max_users: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ToolkitError(f"data.objective '{objective}' unknown; valid: {', '.join(OBJECTIVES)}")
        if max_length < 2:
            raise ToolkitError(f"data.max_length={max_length}: a sequence needs at least 2 positions")
        self.path, self.name = path, name
        self.columns = [user_column, item_column, time_column]
        self.min_interactions, self.max_length = min_interactions, max_length
        self.objective, self.mask_prob, self.mask_last_prob = objective, mask_prob, mask_last_prob
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_users, self.seed, self.num_workers = max_users, seed, num_workers
        self.splits: dict[str, list[dict]] | None = None
        self.vocab: ItemVocabulary | None = None
        self.sequences: list[list[int]] = []

    pad_token_id = PAD

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        frame = load_interactions(self.path, self.name, self.columns)
        sequences = keep_active_users(user_sequences(frame, *self.columns), self.min_interactions)
        if self.max_users:  # tiny runs: the first users by id
            sequences = dict(list(sequences.items())[: self.max_users])
        items = sorted({x for seq in sequences.values() for x in seq})
        self.vocab = ItemVocabulary(items, masked=self.objective == "masked")
        self.sequences = [self.vocab.encode(seq) for seq in sequences.values()]
        self.splits = {
            "train": [w for seq in self.sequences for w in self._train_examples(seq[:-2])],
            "validation": [self._eval_example(seq[:-2], seq[-2]) for seq in self.sequences],
            "test": [self._eval_example(seq[:-1], seq[-1]) for seq in self.sequences],
        }

    def _train_examples(self, history: list[int]) -> list[dict]:
        out = []
        for window in training_windows(history, self.max_length, self.objective):
            if self.objective == "causal":
                inputs, labels = window[:-1], window[1:]
            else:
                inputs, labels = window, window  # masked positions are chosen per batch
            out.append({"input_ids": inputs, "labels": labels})
        return out

    def _eval_example(self, history: list[int], target: int) -> dict:
        """Predict `target` after `history`: at the last position (causal) or at an appended [MASK]."""
        if self.objective == "causal":
            inputs = history[-self.max_length :]
        else:
            inputs = history[-(self.max_length - 1) :] + [self.vocab.mask_id]
        return {"input_ids": inputs, "target": target, "seen": history}

    @property
    def processor(self) -> ItemVocabulary:
        """What export saves beside the model: the item vocabulary (model id -> raw item id)."""
        self.setup()
        return self.vocab

    def model_config(self) -> dict[str, int]:
        """Config keys the model takes from the data: the vocabulary and its special ids."""
        self.setup()
        # GPTBigCodeConfig's bos/eos default to 50256, outside an item vocabulary; the models never emit them.
        return {"vocab_size": self.vocab.size, "bos_token_id": PAD, "eos_token_id": PAD}

    def popularity(self) -> torch.Tensor:
        """Interaction counts per item id over everything visible at test time (all but the test items)."""
        self.setup()
        counts = torch.zeros(self.vocab.size)
        for seq in self.sequences:
            counts += torch.bincount(torch.tensor(seq[:-1]), minlength=self.vocab.size)
        return counts

    def collate_train(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = self.max_length
        inputs = torch.tensor([left_pad(r["input_ids"], n, PAD) for r in rows])
        labels = torch.tensor([left_pad(r["labels"], n, -100) for r in rows])
        if self.objective == "masked":
            inputs, labels = self._mask(inputs, labels)
        return {"input_ids": inputs, "attention_mask": (inputs != PAD).long(), "labels": labels}

    def _mask(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask `mask_prob` of the real items (at least one per row, the last if the draw picked none).

        A `mask_last_prob` share of the rows masks only its last item instead: the test-time query
        (history + [MASK]), which random masking alone rarely shows the model (BERT4Rec does the same).
        """
        real = inputs != PAD
        chosen = (torch.rand(inputs.shape) < self.mask_prob) & real
        last_only = torch.rand(inputs.shape[0]) < self.mask_last_prob
        chosen[last_only] = False
        chosen[~chosen.any(1), -1] = True
        masked = inputs.masked_fill(chosen, self.vocab.mask_id)
        return masked, labels.masked_fill(~chosen, -100)

    def collate_eval(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = self.max_length
        inputs = torch.tensor([left_pad(r["input_ids"], n, PAD) for r in rows])
        targets = torch.tensor([r["target"] for r in rows])
        labels = torch.full_like(inputs, -100)
        labels[:, -1] = targets
        width = max(len(r["seen"]) for r in rows)
        seen = torch.tensor([r["seen"] + [PAD] * (width - len(r["seen"])) for r in rows])
        return {
            "input_ids": inputs,
            "attention_mask": (inputs != PAD).long(),
            "labels": labels,
            "seen": seen,
        }

    def split_fingerprints(self) -> dict[str, Any]:
        self.setup()
        return {
            s: {"rows": len(rows), "sha256": hashlib.sha256(repr(rows).encode()).hexdigest()[:16]}
            for s, rows in self.splits.items()
        }
