"""Length-grouped sampling: a seeded permutation, batches of similar lengths in shuffled order, resumable
mid-epoch."""

from __future__ import annotations

import random

from toolkit.data.samplers import LengthGroupedSampler, ResumableSampler

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(1, 64) for _ in range(100)]  # (one generator: a fresh one per item gave all 50s)


def sampler(epoch: int = 0, rank: int = 0, world: int = 1) -> LengthGroupedSampler:
    s = LengthGroupedSampler(
        list(range(100)), LENGTHS, batch_size=5, batches_per_window=4, num_replicas=world, rank=rank, seed=3
    )
    s.set_epoch(epoch)
    return s


def test_each_epoch_is_a_seeded_permutation_of_length_sorted_batches_in_shuffled_order():
    order = list(sampler())
    assert sorted(order) == list(range(100))
    assert order == list(sampler()), "same seed and epoch, same order"
    assert order != list(sampler(epoch=1))
    monotone_windows = 0
    for start in range(0, 100, 20):
        window = [LENGTHS[i] for i in order[start : start + 20]]
        batches = [window[b : b + 5] for b in range(0, 20, 5)]
        # each batch is a slice of the window sorted by length: similar lengths, little padding
        by_length = sorted(batches, key=lambda batch: -batch[0])
        assert [n for batch in by_length for n in batch] == sorted(window, reverse=True)
        monotone_windows += batches == by_length
    assert monotone_windows < 5, "batches run longest to shortest in every window: not shuffled"
    first_window = [LENGTHS[i] for i in order[:20]]
    assert LENGTHS[order[0]] == max(first_window), "the longest batch comes first (out-of-memory at once)"


def test_a_short_last_batch_stays_last():
    s = LengthGroupedSampler(
        list(range(23)), LENGTHS[:23], batch_size=5, batches_per_window=4, num_replicas=1, rank=0, seed=3
    )
    for epoch in range(5):
        s.set_epoch(epoch)
        order = list(s)
        assert sorted(order) == list(range(23))
        window = [LENGTHS[i] for i in order[:20]]
        batches = [window[b : b + 5] for b in range(0, 20, 5)]
        assert [n for batch in sorted(batches, key=lambda b: -b[0]) for n in batch] == sorted(
            window, reverse=True
        )


def test_ranks_split_the_data_without_overlap():
    parts = [list(sampler(rank=r, world=2)) for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) == len(parts[1]) == 50


def test_resume_continues_where_the_epoch_stopped():
    first = sampler()
    iterator = iter(first)
    seen = [next(iterator) for _ in range(37)]
    resumed = sampler()
    resumed.load_state_dict(first.state_dict())
    assert seen + list(resumed) == list(sampler())


def test_an_epoch_saved_fully_consumed_restarts_fresh():
    """Lightning resumes a checkpoint taken on an epoch's last batch at the next epoch: that epoch must be
    whole, not the empty remainder of the saved one."""
    first = sampler()
    assert len(list(first)) == 100
    resumed = sampler(epoch=1)
    resumed.load_state_dict(first.state_dict())
    assert list(resumed) == list(sampler(epoch=1))


def plain(rank: int, world: int) -> ResumableSampler:
    return ResumableSampler(list(range(100)), num_replicas=world, rank=rank, shuffle=True, seed=3)


def consume(samplers: list[ResumableSampler], steps: int) -> list[int]:
    iterators = [iter(s) for s in samplers]
    return [next(it) for _ in range(steps) for it in iterators]


def test_resume_on_another_world_size_continues_with_the_unseen_examples():
    """2 ranks stop after 12 examples each; 1 rank resumes: together they see the epoch exactly once.
    And the reverse: 1 rank stops after 24, 2 ranks resume with the remaining 76."""
    two = [plain(r, 2) for r in range(2)]
    before = consume(two, 12)
    one = plain(0, 1)
    one.load_state_dict(two[0].state_dict())
    assert sorted(before + list(one)) == list(range(100))

    single = plain(0, 1)
    before = consume([single], 24)
    after = []
    for rank in range(2):
        resumed = plain(rank, 2)
        resumed.load_state_dict(single.state_dict())
        after += list(resumed)
    assert sorted(before + after) == list(range(100))
