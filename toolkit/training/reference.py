"""The reference model of preference tuning, for the cases where no adapter can be switched off.

Full fine-tuning keeps a frozen copy of the initial model (`frozen_copy`), or, with
`task.precompute_reference`, runs the initial model once over the training and validation splits before the
first step and keeps only its log-probabilities (`attach_reference_logps`): the copy then never exists.
The log-probabilities are cached in the run directory, keyed by the splits' fingerprints, so a resumed run
reads the initial model's values instead of recomputing them with the weights it restored.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from toolkit.errors import ToolkitError
from toolkit.files import atomic_write_text
from toolkit.tasks.preference import completion_logps

REFERENCE_CACHE = "reference_logps.json"
PRECOMPUTED_SPLITS = ("train", "validation")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The initial model, in eval mode with no gradients: the reference of a full fine-tune."""
    return freeze(deepcopy(model))


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode with no gradients (a reference built for the purpose: nothing to copy)."""
    model.eval()
    model.requires_grad_(False)
    return model


def held_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this rank holds, parameters of the whole model): a ZeRO-3 partition (`ds_tensor`), an
    FSDP2 shard (a DTensor's local part), or everything."""
    held = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):  # small "persistent" parameters stay whole on every rank
            mine = param.ds_numel if getattr(param, "ds_persist", False) else param.ds_tensor.numel()
            held, total = held + mine, total + param.ds_numel
        else:
            local = param.to_local() if hasattr(param, "to_local") else param
            held, total = held + local.numel(), total + param.numel()
    return held, total


def disable_dropout(model: torch.nn.Module) -> None:
    """Preference losses compare the policy with its reference on the same tokens: dropout in one and not the
    other would make them differ before any step (TRL disables it the same way)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@torch.no_grad()
def split_reference_logps(
    task: Any, model: torch.nn.Module, data: Any, dataset: Dataset, device: torch.device
) -> dict[str, list[float]]:
    """Reference log-probabilities of every row of `dataset`, in order (pairs: chosen and rejected)."""
    paired = getattr(data, "paired", True)
    columns = ("ref_chosen_logps", "ref_rejected_logps") if paired else ("ref_logps", "kl_ref_logps")
    out: dict[str, list[float]] = {c: [] for c in columns}
    size = data.eval_batch_size
    for start in range(0, len(dataset), size):
        rows = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
        batch = {k: v.to(device) for k, v in data.collate(rows).items()}
        if paired:
            chosen, rejected = initial_logps(task, model, batch).chunk(2)
        else:
            chosen, rejected = initial_logps(task, model, batch), initial_logps(task, model, batch, "kl_")
        out[columns[0]] += chosen.float().cpu().tolist()
        out[columns[1]] += rejected.float().cpu().tolist()
    return out


def initial_logps(task: Any, model: torch.nn.Module, batch: dict, prefix: str = "") -> torch.Tensor:
    """The adapter-disabled base's log-probabilities, or the model's own (it is the initial model here)."""
    logps = task.reference_logps(model, batch, prefix)
    return logps if logps is not None else completion_logps(model, batch, prefix)[0]


def attach_reference_logps(module: Any, resumed: bool) -> None:
    """Add the reference columns to the data module's training and validation splits (every rank computes
    them: under ZeRO-3 and FSDP2 each forward needs all ranks; rank 0 writes the cache)."""
    trainer, task = module.trainer, module.task
    data = trainer.datamodule
    cache = Path(trainer.default_root_dir) / REFERENCE_CACHE
    keys = {s: data.split_fingerprints()[s] for s in PRECOMPUTED_SPLITS}
    saved = json.loads(cache.read_text()) if cache.exists() else None
    if saved is not None and saved["splits"] != keys:
        saved = None  # other data: the cached values belong to another dataset
    if saved is None and resumed and module.adapter is None:
        raise ToolkitError(
            f"resuming a full fine-tune with task.precompute_reference=true needs {cache}, written when the "
            "run started; it is missing, and the restored weights are no longer the reference"
        )
    if saved is None:
        was_training = module.model.training
        module.model.eval()
        values = {
            s: split_reference_logps(task, module.model, data, data.splits[s], module.device)
            for s in PRECOMPUTED_SPLITS
        }
        module.model.train(was_training)
        saved = {"splits": keys, "values": values}
        if trainer.is_global_zero:
            atomic_write_text(cache, json.dumps(saved))  # floats round-trip exactly through JSON
    for split in PRECOMPUTED_SPLITS:
        table = data.splits[split]
        for column, values in saved["values"][split].items():
            table = table.remove_columns([column]) if column in table.column_names else table
            table = table.add_column(column, values)
        data.splits[split] = table
