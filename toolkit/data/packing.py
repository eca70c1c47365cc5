"""Sequence packing for causal LM training: several tokenized examples per row, none attending to another.

A packed row concatenates whole examples; its `position_ids` restart at 0 for each example, and the batch
carries no `attention_mask`. From such position ids transformers builds a block-diagonal causal mask (sdpa and
eager: `masking_utils.find_packed_sequence_indices`; flash attention: varlen by position ids), so an example
never sees the one before it. The first label of every example is masked, so no token is trained to predict
across a boundary. The row's trailing padding is one more "example" of its own (positions restart there too).

Rows are filled best-fit-decreasing, a pure function of the example lengths: the packing is identical on every
rank and every rerun, and the samplers shuffle and resume packed rows exactly like unpacked ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset

from toolkit.errors import ToolkitError

IGNORE = -100  # the label value HF losses skip


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the examples in each row, by best fit decreasing: longest example first, each into the
    fullest row it still fits in (ties: the row opened first). Rows keep their examples in placement order."""
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ToolkitError(f"data.pack_length={capacity} is shorter than an example ({max(too_long)} tokens)")
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> rows with that room (FIFO)
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        fit = next((r for r in range(need, capacity + 1) if by_room[r]), None)
        if fit is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        else:
            row = by_room[fit].pop(0)
        rows[row].append(index)
        room[row] -= need
        by_room[room[row]].append(row)
    return rows


def pack_dataset(dataset: Dataset, capacity: int) -> Dataset:
    """Rows of `input_ids`, `labels` and `position_ids`, each holding whole examples of `dataset` (which has
    `input_ids` and `labels`) up to `capacity` tokens."""
    input_ids, labels = dataset["input_ids"], dataset["labels"]
    packed: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in pack_rows([len(ids) for ids in input_ids], capacity):
        ids, labs, positions = [], [], []
        for i in row:
            ids += input_ids[i]
            labs += [IGNORE] + list(labels[i][1:])  # the first token is never a target across a boundary
            positions += range(len(input_ids[i]))
        packed["input_ids"].append(ids)
        packed["labels"].append(labs)
        packed["position_ids"].append(positions)
    return Dataset.from_dict(packed)


def collate_packed(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad packed rows to the longest in the batch; padding is its own segment, masked from the loss."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids, labels, positions = [], [], []
    for f in features:
        pad = width - len(f["input_ids"])
        input_ids.append(list(f["input_ids"]) + [pad_id] * pad)
        labels.append(list(f["labels"]) + [IGNORE] * pad)
        positions.append(list(f["position_ids"]) + list(range(pad)))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }
