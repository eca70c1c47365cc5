"""Length-grouped shuffling that stays exactly resumable (torchdata's StatefulDistributedSampler), and the
loaders of data modules that hold their splits in memory."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler


class ResumableSampler(StatefulDistributedSampler):
    """torchdata's StatefulDistributedSampler (order = f(seed, epoch); a resumed epoch skips what it had
    already yielded), except that an epoch saved fully consumed restarts fresh.

    Lightning resumes a checkpoint taken on an epoch's last batch at the next epoch; replaying the saved
    position there would skip that whole next epoch (seen: 196 of 200 steps, max|dw| 0.14).
    """

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_replicas": self.num_replicas}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        saved_replicas = state_dict.get("num_replicas", self.num_replicas)
        if self.next_yielded is not None and saved_replicas != self.num_replicas:
            # Resumed on another world size: skip the same number of examples across all ranks. Rank r
            # draws permutation[r::num_replicas], so with plain shuffling the examples skipped are exactly
            # the ones consumed before (length-grouped windows are per rank: there, the same count).
            self.next_yielded = self.next_yielded * saved_replicas // self.num_replicas
        if self.next_yielded is not None and self.next_yielded >= self.num_samples:
            self.next_yielded = None


class _LengthGroupedOrder(DistributedSampler):
    """This rank's shuffled indices, sorted by length within windows of `batches_per_window` batches, cut into
    batches of `batch_size` whose order is then shuffled within the window.

    Batches cut from a sorted window hold similar lengths, so dynamic padding pads little. Without the batch
    shuffle each window would run from its longest batch to its shortest, a sawtooth over the epoch
    (quickstart test accuracy, mean of 3 seeds: 0.8255 sorted, 0.8286 shuffled). The first window's longest
    batch still comes first, so an out-of-memory shows at once.
    """

    def __init__(
        self, dataset: Dataset, lengths: Sequence[int], batch_size: int, batches_per_window: int, **kwargs
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.lengths, self.batch_size = lengths, batch_size
        self.window = batch_size * batches_per_window  # whole batches: only the epoch's last one can be short

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        rng = random.Random(self.seed * 1_000_003 + self.epoch)  # order = f(seed, epoch): resumable
        for start in range(0, len(indices), self.window):
            ordered = sorted(indices[start : start + self.window], key=lambda i: -self.lengths[i])
            batches = [ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
            # a short last batch stays last: moved up, it would shift every later batch's boundaries
            full, tail = (batches[:-1], batches[-1:]) if len(batches[-1]) < self.batch_size else (batches, [])
            head, rest = (full[:1], full[1:]) if start == 0 else ([], full)
            rng.shuffle(rest)
            for batch in head + rest + tail:
                yield from batch


class LengthGroupedSampler(ResumableSampler, _LengthGroupedOrder):
    """ResumableSampler over the length-grouped order: StatefulDistributedSampler's `super().__iter__()`
    resolves to `_LengthGroupedOrder.__iter__` by the method resolution order, so the skipping logic stays
    torchdata's own."""

    def __init__(
        self,
        dataset: Dataset,
        lengths: Sequence[int],
        batch_size: int,
        batches_per_window: int,
        num_replicas: int,
        rank: int,
        seed: int,
    ) -> None:
        _LengthGroupedOrder.__init__(
            self,
            dataset,
            lengths,
            batch_size,
            batches_per_window,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
        )
        self.yielded, self.next_yielded = 0, None


class SplitLoaders(L.LightningDataModule):
    """Loaders over ready-made splits (`self.splits`: train/validation/test sequences), for data modules that
    collate themselves (`collate_train`, `collate_eval`): shuffled, rank-aware and exactly resumable."""

    splits: dict[str, Sequence]
    batch_size: int
    eval_batch_size: int
    num_workers: int
    seed: int

    def train_dataloader(self) -> StatefulDataLoader:
        data = self.splits["train"]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return self._loader(data, self.batch_size, self.collate_train, sampler=sampler)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.splits["validation"], self.eval_batch_size, self.collate_eval)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.splits["test"], self.eval_batch_size, self.collate_eval)

    def _loader(self, data: Sequence, batch_size: int, collate: Any, **kwargs: Any) -> StatefulDataLoader:
        return StatefulDataLoader(
            data, batch_size=batch_size, collate_fn=collate, num_workers=self.num_workers, **kwargs
        )
