"""Local SGD: data parallelism that communicates every `averaging_period` steps instead of every step.

For nodes joined by slow links. After `warmup_steps` of plain DDP (gradients all-reduced every step), each
rank steps on its own gradients and the ranks average their parameters every `averaging_period` steps:
PyTorch's post-local SGD (`PostLocalSGDState` comm hook + `PeriodicModelAverager`). Optionally the average
feeds an outer optimizer, as in DiLoCo: the averaged change since the last average is a pseudo-gradient
for SGD with Nesterov momentum (`outer_lr`, `outer_momentum`); outer_lr 1 and momentum 0 is plain averaging.

Ranks hold different weights and optimizer states between averages, so for an exact resume each rank saves
its own beside the checkpoint rank 0 writes (`local_sgd/<checkpoint name>.rank<r>.step<N>`).
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
    PostLocalSGDState,
    post_localSGD_hook,
)
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from toolkit.errors import ToolkitError

RANK_STATES = "local_sgd"  # the folder beside a checkpoint that holds each rank's own states


class CountedPostLocalSGDState(PostLocalSGDState):
    """PostLocalSGDState that also counts the gradient bytes it all-reduces and the steps it does so."""

    def __init__(self, start_localSGD_iter: int) -> None:
        # no gradient all-reduce at all after warm-up (the default all-reduces within each node every step)
        super().__init__(None, None, start_localSGD_iter, post_local_gradient_allreduce=False)
        self.gradient_bytes = 0
        self.steps: set[int] = set()


# annotations evaluated (no `from __future__ import annotations`): DDP checks a hook's signature by them
def counted_post_local_sgd_hook(
    state: CountedPostLocalSGDState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    if state.iter < state.start_localSGD_iter:  # the hook all-reduces this bucket
        state.gradient_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        state.steps.add(state.iter)
    return post_localSGD_hook(state, bucket)


class OuterAverager(PeriodicModelAverager):
    """PeriodicModelAverager plus DiLoCo's outer step on the averaged parameters, and byte counting.

    `anchor`: the parameters all ranks agreed on at the last average; the average minus the anchor is the
    pseudo-gradient (negated) the outer SGD with Nesterov momentum steps on.
    """

    def __init__(self, period: int, warmup_steps: int, outer_lr: float, outer_momentum: float) -> None:
        super().__init__(period=period, warmup_steps=warmup_steps)
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.anchor: list[torch.Tensor] | None = None
        self.momentum: list[torch.Tensor] | None = None
        self.parameter_bytes = 0
        self.steps: set[int] = set()

    @property
    def plain(self) -> bool:
        """Plain averaging: the outer step would return the average itself (up to rounding)."""
        return self.outer_lr == 1.0 and self.outer_momentum == 0.0

    def due(self) -> bool:
        return self.step >= self.warmup_steps and (self.step - self.warmup_steps) % self.period == 0

    def keep_anchor(self, params: list[torch.Tensor]) -> None:
        """Before the first local step the ranks agree (DDP kept them equal): the first anchor."""
        if not self.plain and self.anchor is None and self.step >= self.warmup_steps:
            self.anchor = [p.detach().clone() for p in params]
            self.momentum = [torch.zeros_like(p) for p in params]

    def average_parameters(self, params: list[torch.Tensor]) -> None:  # type: ignore[override]
        averaged = self.due()
        super().average_parameters(iter(params))
        if averaged:
            self.after_average(params, self.step - 1)

    def average_now(self, params: list[torch.Tensor]) -> None:
        """An average off the period (after the last step), so every rank ends with the same model."""
        average_parameters(iter(params), dist.group.WORLD)
        self.after_average(params, self.step - 1)

    @torch.no_grad()
    def after_average(self, params: list[torch.Tensor], step: int) -> None:
        self.parameter_bytes += sum(p.numel() * p.element_size() for p in params)
        self.steps.add(step)
        if self.plain:
            return
        assert self.anchor is not None and self.momentum is not None
        for param, anchor, momentum in zip(params, self.anchor, self.momentum, strict=True):
            delta = anchor - param  # the pseudo-gradient: how far the average moved, negated
            momentum.mul_(self.outer_momentum).add_(delta)
            anchor.sub_(delta.add(momentum, alpha=self.outer_momentum), alpha=self.outer_lr)  # Nesterov
            param.copy_(anchor)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "anchor": self.anchor, "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor, self.momentum = state["anchor"], state["momentum"]


class LocalSGDStrategy(DDPStrategy):
    """Lightning's DDPStrategy with post-local SGD and an optional DiLoCo outer step (see the module doc).

    Every rank writes `communication_rank<r>.json` into the run directory at the end: the bytes it
    all-reduced (gradients during warm-up, parameters at averages) and the steps it communicated at.
    """

    def __init__(
        self,
        averaging_period: int = 16,
        warmup_steps: int = 0,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if averaging_period < 1 or warmup_steps < 0:
            raise ToolkitError(
                f"strategy.averaging_period={averaging_period}, strategy.warmup_steps={warmup_steps}: "
                "the period must be at least 1 and the warm-up at least 0 steps"
            )
        super().__init__(**kwargs)
        self.settings = (averaging_period, warmup_steps, outer_lr, outer_momentum)
        self._own_weights: dict[str, torch.Tensor] | None = None
        self._counters_set = False

    def setup_distributed(self) -> None:
        super().setup_distributed()
        period, warmup, outer_lr, outer_momentum = self.settings  # the averager needs the process group
        self.comm_state = CountedPostLocalSGDState(start_localSGD_iter=warmup)
        self.averager = OuterAverager(period, warmup, outer_lr, outer_momentum)

    def _register_ddp_hooks(self) -> None:
        # Lightning registers comm hooks on CUDA only; DDP runs them on CPU (gloo) ranks as well
        self.model.register_comm_hook(self.comm_state, counted_post_local_sgd_hook)

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if self._own_weights is not None:  # after DDP's construction, which broadcasts rank 0's weights
            params = dict(self.lightning_module.named_parameters())
            with torch.no_grad():
                for name, value in self._own_weights.items():
                    params[name].copy_(value)
            self._own_weights = None

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.lightning_module.parameters() if p.requires_grad]

    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        trainer = self.lightning_module.trainer
        if not self._counters_set:  # a resumed run continues the counts where the checkpoint left them
            self.comm_state.iter = self.averager.step = trainer.global_step
            self._counters_set = True
        params = self.trainable()
        self.averager.keep_anchor(params)
        output = super().optimizer_step(optimizer, closure, model, **kwargs)  # the hook runs in here
        averaged = self.averager.due()
        self.averager.average_parameters(params)
        if last_step(trainer) and not averaged and self.averager.step > self.averager.warmup_steps:
            self.averager.average_now(params)
        return output

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        path, step = Path(filepath), checkpoint["global_step"]
        own = {
            "state_dict": {
                n: p.detach().clone() for n, p in self.lightning_module.named_parameters() if p.requires_grad
            },
            "optimizer_states": checkpoint["optimizer_states"],
        }
        self.checkpoint_io.save_checkpoint(own, rank_file(path, self.global_rank, step))
        self.barrier("local SGD: every rank's states written")
        checkpoint[RANK_STATES] = {"world_size": self.world_size, **self.averager.state_dict()}
        super().save_checkpoint(checkpoint, filepath, storage_options)  # rank 0 writes it
        self.barrier("local SGD: checkpoint written")
        for older in rank_files(path, self.global_rank):  # only once the checkpoint that names them is whole
            if older != rank_file(path, self.global_rank, step):
                older.unlink(missing_ok=True)

    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            for file in rank_files(Path(filepath)):
                file.unlink(missing_ok=True)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        saved = checkpoint.get(RANK_STATES)
        if saved is None:  # a DDP (or other) checkpoint: every rank starts from its weights, as DDP would
            return checkpoint
        if saved["world_size"] != self.world_size:
            raise ToolkitError(
                f"{checkpoint_path} is a local-SGD checkpoint of {saved['world_size']} ranks, each with its "
                f"own weights; resume it on {saved['world_size']} ranks "
                f"(trainer.num_nodes x trainer.devices), not {self.world_size}"
            )
        own = torch.load(
            rank_file(Path(checkpoint_path), self.global_rank, checkpoint["global_step"]),
            map_location="cpu",
            weights_only=True,
        )
        checkpoint["optimizer_states"] = own["optimizer_states"]
        self._own_weights = own["state_dict"]
        self.averager.load_state_dict(saved)
        return checkpoint

    def teardown(self) -> None:
        module, averager = self.lightning_module, getattr(self, "averager", None)  # none if setup failed
        if module is not None and module._trainer is not None and averager is not None and averager.step:
            report = {
                "world_size": self.world_size,
                "averaging_period": self.averager.period,
                "warmup_steps": self.averager.warmup_steps,
                "optimizer_steps": self.averager.step,
                "gradient_bytes": self.comm_state.gradient_bytes,
                "parameter_bytes": self.averager.parameter_bytes,
                "communication_steps": sorted(self.comm_state.steps | self.averager.steps),
            }
            path = Path(module.trainer.default_root_dir) / f"communication_rank{self.global_rank}.json"
            path.write_text(json.dumps(report, indent=1) + "\n")
        super().teardown()


def last_step(trainer: Any) -> bool:
    """Whether the optimizer step now being taken ends the fit (max_steps, or the last batch of the last
    epoch); `global_step` counts the steps before it."""
    if trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return bool(
        trainer.is_last_batch and max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs
    )


def rank_file(checkpoint: Path, rank: int, step: int) -> Path:
    return checkpoint.parent / RANK_STATES / f"{checkpoint.name}.rank{rank}.step{step}"


def rank_files(checkpoint: Path, rank: int | None = None) -> list[Path]:
    pattern = f"{checkpoint.name}.rank{'*' if rank is None else rank}.step*"
    return sorted((checkpoint.parent / RANK_STATES).glob(pattern))
