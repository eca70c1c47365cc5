"""TaskModule: the one LightningModule every recipe trains through.

It holds the HF model (built in `configure_model`, so sharded strategies can build it sharded), takes its loss
from the model's output, logs the task's torchmetrics, and gets its optimizer and scheduler as Hydra partials.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from toolkit.console import console
from toolkit.errors import ToolkitError
from toolkit.models.adapters import apply_adapter, is_adapter, trainable_summary
from toolkit.models.build import build_model
from toolkit.models.qlora import four_bit_config, prepare_four_bit
from toolkit.tasks.base import Task, compute_metrics, eval_forward, model_inputs
from toolkit.training.reference import (
    attach_reference_logps,
    disable_dropout,
    freeze,
    frozen_copy,
    held_parameters,
)


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer], params: list[torch.nn.Parameter], precision: Any, clip: Any
) -> torch.optim.Optimizer:
    """The recipe's optimizer; `fused: null` in its config means fused kernels wherever Lightning takes them.

    A fused AdamW is one kernel per step instead of torch's per-tensor loop (on CPU ~3x cheaper). Lightning's
    mixed-precision plugins refuse gradient clipping with an optimizer that unscales its own gradients, which
    fused AdamW declares, even under bf16 where nothing is scaled: there the non-fused default is used.
    """
    if getattr(factory, "keywords", {}).get("fused", False) is None:
        factory = functools.partial(factory, fused=not ("mixed" in str(precision) and bool(clip)))
    return factory(params)


def check_checkpointing(model: PreTrainedModel) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ToolkitError(
            f"model.activation_checkpointing=true: {type(model).__name__} does not support activation "
            "checkpointing (its blocks cannot be recomputed); set model.activation_checkpointing=false"
        )


class TaskModule(L.LightningModule):
    def __init__(
        self,
        task: Task,
        model: dict[str, Any] | None = None,
        adapter: dict[str, Any] | None = None,
        quantization: dict[str, Any] | None = None,
        activation_checkpointing: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        total_steps: int = 0,
        prebuilt: torch.nn.Module | None = None,
        on_nonfinite_loss: str = "stop",
    ) -> None:
        """`model`: kwargs of `build_model`; `adapter`: LoraConfig kwargs or None; `quantization`:
        BitsAndBytesConfig kwargs of a 4-bit base (QLoRA) or None; `activation_checkpointing`: recompute each
        block's activations in backward; `prebuilt`: a model to wrap as is (evaluation of an exported model);
        `on_nonfinite_loss`: stop | skip (the batch)."""
        super().__init__()
        self.on_nonfinite_loss, self.skipped_batches = on_nonfinite_loss, 0
        self.task, self.model_kwargs, self.adapter = task, model or {}, adapter
        self.quantization, self.activation_checkpointing = quantization, activation_checkpointing
        self.optimizer_factory, self.scheduler_factory, self.total_steps = optimizer, scheduler, total_steps
        self.model: torch.nn.Module | None = prebuilt
        self._block_names: list[str] = []  # the transformer blocks: what sharded strategies shard
        self._hf_deepspeed_config: HfDeepSpeedConfig | None = None
        self.val_metrics = task.metrics()
        self.test_metrics = task.metrics()
        # Adapter checkpoints keep only trainable weights when the frozen base can be rebuilt from its source
        # (pretrained weights); a base built from config is a random init, so it is saved whole.
        self.adapter_only_checkpoints = bool(adapter) and self.model_kwargs.get("config") is None
        self.strict_loading = not self.adapter_only_checkpoints

    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        zero3 = getattr(strategy, "zero3_config", None)
        # Under ZeRO-3 transformers must see the DeepSpeed config while it builds or loads the model: it then
        # initialises and loads the partitioned weights itself (without it, zero.Init leaves garbage weights).
        self._hf_deepspeed_config = HfDeepSpeedConfig(zero3) if zero3 else None
        build = functools.partial(
            build_model, self.task.auto_class, **self.model_kwargs, **self.task.model_kwargs()
        )
        if self.keeps_frozen_reference and zero3:
            # zero.Init partitions the weights as they are built, and partitions cannot be deep-copied: the
            # reference is built again, from the random state the policy then starts from (same weights)
            device = strategy.root_device
            with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
                self.task.reference = freeze(build())
        base = self._build_base(build, strategy)
        if getattr(self.task, "uses_reference", False):
            disable_dropout(base)  # the reference never trains: the two must agree before any step
        if self.keeps_frozen_reference and self.task.reference is None:
            self.task.reference = frozen_copy(base)
        self._block_names = list(base._no_split_modules or [])
        self.model = apply_adapter(base, self.adapter, self.task.peft_task_type)
        # from_pretrained returns eval mode (dropout off) and Lightning keeps the mode it finds
        self.model.train()
        trainable, total = trainable_summary(self.model)  # before sharding: whole-model counts
        if self.activation_checkpointing:
            check_checkpointing(base)
        if hasattr(strategy, "shard"):  # FSDP2 checkpoints each block itself, inside its sharding unit
            strategy.shard(self.model, self._block_names, checkpoint_blocks=self.activation_checkpointing)
        elif self.activation_checkpointing:
            base.activation_checkpointing_enable({"use_reentrant": False})
        if self._trainer is not None and self._trainer.is_global_zero:  # once, when training
            console.print(
                f"[bold]trainable parameters[/]: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
            )

    def _build_base(self, build: Callable[..., PreTrainedModel], strategy: Any) -> PreTrainedModel:
        """The HF model; QLoRA's is quantized as it loads (on this rank's device), then prepared."""
        if not self.quantization:
            return build()
        precision = self._trainer.precision if self._trainer is not None else "32-true"
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        config = four_bit_config(self.quantization, precision, (self.adapter or {}).get("modules_to_save"))
        return prepare_four_bit(build(quantization_config=config, device_map={"": str(device)}))

    @property
    def keeps_frozen_reference(self) -> bool:
        """Preference tuning's full fine-tune without precomputed reference log-probabilities keeps a frozen
        copy of the initial model (LoRA disables its adapter instead: no copy)."""
        task = self.task
        return getattr(task, "uses_reference", False) and not self.adapter and not task.precompute_reference

    def on_fit_start(self) -> None:
        reference = getattr(self.task, "reference", None)
        if reference is not None:  # not a submodule (it must stay out of checkpoints): placed here
            # in the policy's dtype as the strategy left it (bf16-true, DeepSpeed's bf16): both compute alike
            dtype = next(self.model.parameters()).dtype
            place = getattr(self.trainer.strategy, "place_frozen", None)
            if place is not None:
                self.task.reference = place(reference, self._block_names, dtype)
            else:
                self.task.reference = reference.to(self.device, dtype=dtype)
            held, total = held_parameters(self.task.reference)
            if self.trainer.is_global_zero:
                console.print(
                    f"[bold]reference model[/]: a frozen copy; this rank holds {held:,} of {total:,}"
                )
        if getattr(self.task, "precompute_reference", False):
            attach_reference_logps(self, resumed=self.trainer.ckpt_path is not None)

    def teardown(self, stage: str) -> None:
        if self._hf_deepspeed_config is not None:  # later stages build plain, unsharded models
            unset_hf_deepspeed_config()
            self._hf_deepspeed_config = None

    @property
    def hf_model(self) -> PreTrainedModel:
        """The underlying transformers model (inside the PEFT wrapper when there is one)."""
        return self.model.get_base_model() if is_adapter(self.model) else self.model

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**model_inputs(batch))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        training_loss = getattr(self.task, "training_loss", None)  # a task may compute it more cheaply
        loss = training_loss(self.model, batch) if training_loss else self(batch).loss
        if isinstance(loss, tuple):  # a task's loss with what to log beside it (e.g. preference rewards)
            loss, logged = loss
            self.log_dict(
                {f"train/{k}": v.float() for k, v in logged.items()}, batch_size=len(batch["labels"])
            )
        # averaged over ranks: the loss of the global batch, comparable across strategies and world sizes;
        # a NaN or inf on any rank makes the mean non-finite, so every rank takes the same decision below
        global_loss = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        if not torch.isfinite(global_loss):
            where = f"at step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
            if self.on_nonfinite_loss == "stop":
                raise ToolkitError(
                    f"non-finite training loss ({global_loss.item()}) {where}; lower optim.lr, check the "
                    "data, or set on_nonfinite_loss=skip to skip such batches"
                )
            console.print(f"[yellow]skipped a batch with a non-finite loss ({global_loss.item()}) {where}")
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches), batch_size=1)
            return None  # Lightning then skips backward and the optimizer step, on every rank alike
        self.log("train/loss", global_loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: Any, stage: str) -> None:
        outputs = eval_forward(self.task, self.model, batch)
        self.log(f"{stage}/loss", outputs.loss, sync_dist=True, batch_size=batch["labels"].shape[0])
        self.task.update(metrics, self.model, batch, outputs, stage)

    def on_validation_start(self) -> None:
        self._metrics_to_device(self.val_metrics)

    def on_test_start(self) -> None:
        self._metrics_to_device(self.test_metrics)

    def _metrics_to_device(self, metrics: Any) -> None:
        # DeepSpeed moves a module to its device only when zero.Init partitioned none of it: under ZeRO-3
        # the metric states would stay on the CPU while the logits come out on the GPU
        metrics.to(self.trainer.strategy.root_device)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def _log_metrics(self, metrics: Any, stage: str) -> None:
        self.log_dict(
            {f"{stage}/{k}": v for k, v in compute_metrics(metrics).items()}, prog_bar=stage == "val"
        )
        metrics.reset()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.trainer.gradient_clip_val
        optimizer = build_optimizer(self.optimizer_factory, params, self.trainer.precision, clip)
        if self.scheduler_factory is None:
            return optimizer
        # total_steps comes from the data length: asking the trainer (estimated_stepping_batches) would set up
        # the dataloader before a resumed loader state is restored, silently breaking exact resume.
        wants_total = "num_training_steps" in inspect.signature(self.scheduler_factory).parameters
        scheduler = self.scheduler_factory(
            optimizer, **({"num_training_steps": self.total_steps} if wants_total else {})
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # sharded checkpoints (DeepSpeed, DCP) must mirror the module's full state: only files are trimmed
        if self.adapter_only_checkpoints and not getattr(self.trainer.strategy, "sharded_checkpoints", False):
            trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
