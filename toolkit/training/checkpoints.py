"""Checkpoints: atomic .ckpt writes and directory swaps, finding, checking and reading a run's checkpoint
(a file, a DeepSpeed ZeRO directory or a torch DCP directory), and the resume choice.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from toolkit.console import console
from toolkit.errors import ToolkitError, cause_of
from toolkit.layout import CHECKPOINTS


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each .ckpt file beside its target, fsyncs it and renames it into place: a kill or a full disk
    mid-write leaves the previous checkpoint whole.

    Lightning's own fsspec transaction stages the file in the system temp directory and, when the run
    directory is on another filesystem (the usual case on a cluster), copies it into place non-atomically.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as f:  # streamed: a copy in memory would double the state's RAM at saves
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            # torch.save reports a full disk as a RuntimeError whose context is the file's OSError (ENOSPC)
            cause = cause_of(err, OSError)
            if cause is not None and cause is not err:
                raise cause from err
            raise


def find_checkpoint(run_dir: Path) -> Path:
    """The run's best checkpoint, else its last one."""
    for name in ("best.ckpt", "last.ckpt"):
        path = existing_checkpoint(run_dir / CHECKPOINTS / name)
        if path is not None:
            return path
    raise ToolkitError(f"no checkpoint in {run_dir / CHECKPOINTS}; run the train stage first")


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The module weights of a checkpoint, consolidated: a Lightning .ckpt file, a DeepSpeed ZeRO checkpoint
    directory (fp32 weights rebuilt from the shards) or a torch DCP directory (FSDP2)."""
    check_checkpoint(checkpoint)
    if checkpoint.is_file():
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    if (checkpoint / "latest").exists():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            convert_zero_checkpoint_to_fp32_state_dict(checkpoint, Path(tmp) / "model.pt")
            return torch.load(Path(tmp) / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    if (checkpoint / ".metadata").exists():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(checkpoint)["state_dict"]
    raise ToolkitError(f"{checkpoint} is not a checkpoint: no .ckpt file, DeepSpeed 'latest' or DCP metadata")


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse a truncated checkpoint with one line naming the file, before anything loads it: every torch
    file (a zip) must have its central directory, every DCP shard the extent its metadata records."""
    files = [checkpoint] if checkpoint.is_file() else sorted(checkpoint.rglob("*.pt"))
    for path in files:
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as err:
            raise ToolkitError(f"checkpoint file {path} is truncated or corrupted ({err})") from err
    if checkpoint.is_dir() and (checkpoint / ".metadata").exists():
        from torch.distributed.checkpoint import FileSystemReader

        for info in FileSystemReader(str(checkpoint)).read_metadata().storage_data.values():
            path = checkpoint / info.relative_path
            size = path.stat().st_size if path.exists() else 0
            if size < info.offset + info.length:
                raise ToolkitError(
                    f"checkpoint file {path} is truncated or missing ({size} bytes, its metadata "
                    f"records data up to byte {info.offset + info.length})"
                )


def load_weights(module: L.LightningModule, checkpoint: Path) -> None:
    """Load a checkpoint into a built module (adapter checkpoints may hold only the adapters)."""
    state = read_state_dict(checkpoint)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    if getattr(module, "adapter_only_checkpoints", False):
        # the base comes from its source; a sharded checkpoint mirrors the whole training module, whose base
        # may have been 4-bit (QLoRA) while this one is built in full precision to be merged into
        state = {k: v for k, v in state.items() if k in trainable}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or (set(missing) & trainable):
        raise ToolkitError(
            f"checkpoint {checkpoint} does not match the model "
            f"(unexpected: {unexpected[:3]}, missing: {sorted(set(missing) & trainable)[:3]})"
        )


def save_directory_atomically(strategy: Any, save: Any, filepath: Any) -> None:
    """Run `save(staging_dir)` on every rank, then swap the staging directory into `filepath`.

    Sharded checkpoints (DeepSpeed, DCP) are directories that every rank writes into; written in place, a
    kill halfway leaves a directory that looks like a checkpoint but is not. The swap leaves either the
    new directory or the previous one (renamed `<name>.prev` for an instant, which `resume=last` accepts).
    """
    target = Path(strategy.broadcast(str(filepath)))
    staging = target.with_name(f"{target.name}.tmp")
    if strategy.is_global_zero and staging.exists():
        shutil.rmtree(staging)
    strategy.barrier()
    save(staging)
    strategy.barrier()
    if strategy.is_global_zero:
        previous = target.with_name(f"{target.name}.prev")
        if target.exists():
            os.replace(target, previous)
        os.replace(staging, target)
        shutil.rmtree(previous, ignore_errors=True)
    strategy.barrier()


def existing_checkpoint(path: Path) -> Path | None:
    """`path`, or the previous checkpoint when a kill fell between the two renames of an atomic swap."""
    for candidate in (path, path.with_name(f"{path.name}.prev")):
        if candidate.exists():
            return candidate
    return None


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    if resume in (None, False, ""):
        return None
    if resume == "last":
        last = existing_checkpoint(run_dir / CHECKPOINTS / "last.ckpt")
        if last is None:
            console.print(
                f"resume=last: no checkpoint in {run_dir / CHECKPOINTS} yet, starting from the beginning"
            )
            return None
        check_checkpoint(last)
        return str(last)
    if not Path(resume).exists():  # a file, or a directory for sharded (DeepSpeed, FSDP2) checkpoints
        raise ToolkitError(f"resume='{resume}' is not a checkpoint; use 'last' or the path of a .ckpt")
    check_checkpoint(Path(resume))
    return str(resume)


def state_dict_mismatch(err: RuntimeError) -> str | None:
    """The first line of torch's (or DCP's) state-dict mismatch report, e.g. `size mismatch for
    model.x.weight: copying a param with shape [64, 32] from checkpoint, the shape in current model is
    [48, 32]`; None for any other error."""
    for line in str(err).splitlines():
        line = line.strip().rstrip(".")
        if line.startswith(("size mismatch for", "Missing key(s)", "Unexpected key(s)")):
            return line.replace("torch.Size(", "").replace("])", "]")
        if "Size mismatch between saved" in line:  # distributed checkpoint (FSDP2)
            return line
    return None
