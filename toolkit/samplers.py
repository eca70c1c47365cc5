"""Length-grouped shuffling that stays exactly resumable (torchdata's StatefulDistributedSampler)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler


class _LengthGroupedOrder(DistributedSampler):
    """This rank's shuffled indices, sorted by length (longest first) within windows of `window` examples.

    Batches cut from a sorted window hold similar lengths, so dynamic padding pads little; the windows keep
    the order random from epoch to epoch, and the longest batch comes first so an out-of-memory shows at once.
    """

    def __init__(self, dataset: Dataset, lengths: Sequence[int], window: int, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.lengths, self.window = lengths, window

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        for start in range(0, len(indices), self.window):
            yield from sorted(indices[start : start + self.window], key=lambda i: -self.lengths[i])


class LengthGroupedSampler(StatefulDistributedSampler, _LengthGroupedOrder):
    """StatefulDistributedSampler (skips what a resumed epoch already yielded) over the length-grouped
    order: its `super().__iter__()` resolves to `_LengthGroupedOrder.__iter__` by the method resolution
    order, so the skipping logic stays torchdata's own."""

    def __init__(
        self, dataset: Dataset, lengths: Sequence[int], window: int, num_replicas: int, rank: int, seed: int
    ) -> None:
        _LengthGroupedOrder.__init__(
            self, dataset, lengths, window, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )
        self.yielded, self.next_yielded = 0, None
