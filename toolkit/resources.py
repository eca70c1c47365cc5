"""What a training rank costs: median step time, peak RSS, and the bytes of tensors it actually holds.

    toolkit-train ... +callbacks.resources._target_=toolkit.resources.ResourceReport \\
        +callbacks.resources.path=resources

writes `<path>/rank<N>.json` for every rank when training ends. The tensor census walks every live tensor
(parameters, gradients, optimizer states, DeepSpeed's flat partitions and buckets, FSDP2's local shards)
and counts each storage once, so it measures what a strategy really keeps, whatever its bookkeeping.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor


def held_tensor_bytes(model: torch.nn.Module | None = None) -> int:
    """Bytes of every distinct tensor storage alive in this process (CPU and accelerator, not meta).

    Tensors only C++ holds have no Python object for the garbage collector to find: gradients get one
    when read, so the model's are read here; DDP's C++ gradient buckets stay uncounted."""
    grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
    seen: dict[tuple[str, int], int] = {}
    for obj in [*grads, *gc.get_objects()]:
        if not isinstance(obj, torch.Tensor):
            continue
        tensor = obj._local_tensor if isinstance(obj, DTensor) else obj
        if tensor.device.type == "meta" or type(tensor).__name__ == "FakeTensor":
            continue
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage of their own
            continue
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def peak_rss_bytes() -> int:
    """This process's peak resident set size: Linux's VmHWM, else ru_maxrss (KiB on Linux).

    ru_maxrss survives exec: a process started by a large parent (subprocess uses vfork) reports the
    parent's peak (measured: LoRA and full fine-tuning both "4.865 GiB" when launched from a 4.9 GiB parent).
    VmHWM belongs to the process's own address space."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ResourceReport(L.Callback):
    """Times every training step and, once, counts the tensors held just before an optimizer step (when
    parameters, gradients and the optimizer states of the previous step are all alive)."""

    def __init__(self, path: str, warmup_steps: int = 2, census_step: int = 3) -> None:
        self.path, self.warmup_steps, self.census_step = Path(path), warmup_steps, census_step
        self.step_seconds: list[float] = []
        self.tensor_bytes: int | None = None
        self._started = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.step_seconds.append(time.perf_counter() - self._started)

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.census_step - 1 and self.tensor_bytes is None:
            self.tensor_bytes = held_tensor_bytes(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        timed = self.step_seconds[self.warmup_steps :] or self.step_seconds
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "steps": len(self.step_seconds),
            "median_step_seconds": statistics.median(timed) if timed else None,
            "peak_rss_bytes": peak_rss_bytes(),
            "tensor_bytes": self.tensor_bytes,
        }
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=2) + "\n")


def batch_tokens(batch: Any) -> int:
    """Tokens a batch holds: its attention mask's ones, else its input ids (0 for batches without either)."""
    if isinstance(batch, dict) and "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch["input_ids"].numel()
    return 0


class StepClock(L.Callback):
    """Records when each training step ends and when the first one starts (perf_counter; and Unix time, to
    compare with a launch time in another process), and each step's tokens (non-padding ones where the batch
    has an attention mask)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.first_start: float | None = None
        self.first_start_perf: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.first_start is None:
            self.first_start, self.first_start_perf = time.time(), time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self.ends.append(time.perf_counter())
        self.tokens.append(batch_tokens(batch))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        timing = {
            "first_start": self.first_start,
            "first_start_perf": self.first_start_perf,
            "ends": self.ends,
            "tokens": self.tokens,
        }
        self.path.write_text(json.dumps(timing))
