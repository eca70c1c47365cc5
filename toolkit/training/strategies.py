"""Lightning's strategies as YAML builds them, plus the one shim DeepSpeed needs to run on CPU ranks.

`conf/strategy/*.yaml` name these classes with their arguments; nothing here re-implements a strategy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import shutil
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from toolkit.errors import ToolkitError
from toolkit.models.qlora import four_bit_params
from toolkit.training.checkpoints import save_directory_atomically


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, also on CPU ranks (gloo).

    Lightning refuses DeepSpeed on any accelerator but CUDA by an accelerator check alone; DeepSpeed itself
    runs ZeRO 1/2/3 on CPU (it picks its CPU accelerator and gloo). On CUDA every method is Lightning's own.
    """

    sharded_checkpoints = True

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skips only the CUDA-accelerator check

    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            return super().setup_distributed()
        reset_seed()  # as Lightning's, minus the CUDA device-index validation
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> Any:
        cast_unpartitioned_to_zero3_dtype(model, self.config)
        if self.root_device.type == "cuda":
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=self._device_rank_args(),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    def _device_rank_args(self) -> argparse.Namespace:
        # as Lightning's on CUDA; a CPU device has no index: DeepSpeed takes the local rank instead
        index = self.root_device.index if self.root_device.type == "cuda" else self.local_rank
        return argparse.Namespace(device_rank=index)

    def place_frozen(self, module: nn.Module, block_names: list[str], dtype: torch.dtype) -> nn.Module:
        """A frozen model beside the policy (preference tuning's reference). Under ZeRO-3 (`module` built
        inside zero.Init, so already partitioned) it gets an engine without optimizer, as TRL gives its
        reference: each forward gathers the layers' shards from every rank (it was built in the engine's
        dtype). ZeRO-1/2 shard only optimizer states and gradients, which a frozen model has none of: it is
        a plain copy on the device, in the policy's `dtype`."""
        if not self.zero_stage_3:
            return module.to(self.root_device, dtype=dtype)
        import deepspeed

        config = {k: copy.deepcopy(v) for k, v in self.config.items() if k not in ("optimizer", "scheduler")}
        engine, *_ = deepspeed.initialize(
            args=self._device_rank_args(), config=config, model=module, dist_init_required=False
        )
        engine.eval()  # DeepSpeed's eval() returns None, not the module
        return engine

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        parent = super()
        save_directory_atomically(
            self, lambda path: parent.save_checkpoint(checkpoint, path, storage_options), filepath
        )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        saved_world_size = zero_world_size(path)
        if saved_world_size in (None, self.world_size):
            return super().load_checkpoint(checkpoint_path, weights_only)
        # ZeRO partitions depend on the world size: go through DeepSpeed's universal checkpoint format
        universal = path.with_name(f".{path.name}.universal")
        if self.is_global_zero:
            convert_to_universal(path, universal)
        self.barrier("universal checkpoint written")
        config = self.deepspeed_engine._config
        config.load_universal_checkpoint = True
        try:
            return super().load_checkpoint(universal, weights_only)
        finally:
            config.load_universal_checkpoint = False
            self.barrier("universal checkpoint loaded")
            if self.is_global_zero:
                shutil.rmtree(universal, ignore_errors=True)

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # Not Lightning's zero.Init around configure_model: transformers, seeing the HfDeepSpeedConfig that
        # TaskModule keeps alive, opens its own zero.Init and loads the pretrained weights into the shards.
        # Inside Lightning's context the loaded weights came out wrong (first loss off by 2e-3).
        self._init_config_if_needed()
        yield

    @property
    def zero3_config(self) -> dict | None:
        """The DeepSpeed config when it shards parameters (ZeRO-3), for building the HF model inside it."""
        self._init_config_if_needed()
        return self.config if self.zero_stage_3 else None


def cast_unpartitioned_to_zero3_dtype(model: nn.Module, config: dict) -> None:
    """Under ZeRO-3 in bf16/fp16, transformers builds the base model inside zero.Init in that dtype, but PEFT
    adds its adapter afterwards, upcast to fp32 on purpose. DeepSpeed casts a model itself only when none of
    it is partitioned yet, and its ZeRO-3 optimizer takes one dtype per parameter group (it keeps its own
    fp32 master weights), so the parameters built outside zero.Init follow the partitioned ones."""
    if config.get("zero_optimization", {}).get("stage") != 3:
        return
    if config.get("bf16", {}).get("enabled"):
        dtype = torch.bfloat16
    elif config.get("fp16", {}).get("enabled"):
        dtype = torch.float16
    else:
        return
    for param in model.parameters():
        if not hasattr(param, "ds_id"):  # ds_id: partitioned by zero.Init
            param.data = param.data.to(dtype)


def zero_world_size(checkpoint: Path) -> int | None:
    """The data-parallel world size a DeepSpeed checkpoint directory was saved with (one optimizer
    partition file per rank), or None for anything else."""
    latest = checkpoint / "latest"
    if not latest.is_file():
        return None
    partitions = list((checkpoint / latest.read_text().strip()).glob("*zero_pp_rank_*_optim_states.pt"))
    return len(partitions) or None


def convert_to_universal(checkpoint: Path, universal: Path) -> None:
    """DeepSpeed's `ds_to_universal` on a Lightning DeepSpeed checkpoint: `universal` then loads on any
    world size with `load_universal_checkpoint`."""
    from deepspeed.checkpoint import ds_to_universal

    tag = (checkpoint / "latest").read_text().strip()
    shutil.rmtree(universal, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(checkpoint / tag),
        output_folder=str(universal / tag),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # Lightning saves no universal_checkpoint_info
    )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter it converts
        ds_to_universal.main(args)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism: Lightning's ModelParallelStrategy with every rank in the data-parallel mesh
    dimension, plus how the module should shard (`shard`, called from TaskModule.configure_model).

    Each transformer block (the model's `_no_split_modules`) becomes one FSDP unit, then the root.
    """

    sharded_checkpoints = True

    def __init__(self, cpu_offload: bool = False, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.cpu_offload, self.reshard_after_forward = cpu_offload, reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # pure FSDP: all ranks shard
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        parent = super()
        if not self._save_distributed_checkpoint:  # a single file: Lightning writes it atomically already
            return parent.save_checkpoint(checkpoint, filepath, storage_options)
        save_directory_atomically(
            self, lambda path: parent.save_checkpoint(checkpoint, path, storage_options), filepath
        )

    def place_frozen(self, module: nn.Module, block_names: list[str], dtype: torch.dtype) -> nn.Module:
        """A frozen model beside the policy (preference tuning's reference), sharded like it: each forward
        gathers a block's shards from every rank and frees them after, whatever `reshard_after_forward`
        says: that option keeps gathered blocks until backward, and a frozen model has no backward."""
        self.shard(module.to(dtype), block_names, reshard_after_forward=True)
        return module

    def shard(
        self,
        model: nn.Module,
        block_names: list[str],
        reshard_after_forward: bool | None = None,
        checkpoint_blocks: bool = False,
    ) -> None:
        """`fully_shard` each block, then the root. `checkpoint_blocks`: activation checkpointing per block,
        hook-based (torch's composable `checkpoint`), so parameter names stay as PEFT and DCP know them; FSDP2
        gathers a block's shards again for its recompute.

        QLoRA's 4-bit weights stay whole on every rank (`ignored_params`): their quantization state lives
        beside the tensor, so a shard of one could not be dequantized. Everything else is sharded: LoRA
        weights, their gradients and optimizer states, and the unquantized embeddings, norms and head.
        """
        from torch.distributed._composable import checkpoint
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        reshard = self.reshard_after_forward if reshard_after_forward is None else reshard_after_forward
        kwargs: dict[str, Any] = {"mesh": self.device_mesh["data_parallel"], "reshard_after_forward": reshard}
        if self.cpu_offload:
            # pinned host memory speeds copies to an accelerator; on CPU ranks there is nothing to pin for
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.root_device.type != "cpu")
        four_bit = set(four_bit_params(model))
        if four_bit:
            kwargs["ignored_params"] = four_bit
        blocks = [m for m in model.modules() if type(m).__name__ in set(block_names)]
        if not blocks:
            raise ToolkitError(
                f"FSDP2 found no transformer blocks ({block_names}) to shard in {type(model).__name__}"
            )
        for block in blocks:
            if checkpoint_blocks and isinstance(block, GradientCheckpointingLayer):
                checkpoint(block)  # not ViT's embeddings, also listed among its blocks
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)


STRATEGY_KINDS = ("single", "ddp", "deepspeed", "fsdp2")


def strategy_kind(strategy: Any) -> str:
    """single | ddp | deepspeed | fsdp2 for a `strategy` config (a `_target_` class, or Lightning's name).

    Answered from the class itself, so a user's subclass of one of these is recognised as its family.
    """
    target = strategy.get("_target_") if strategy else None
    if not target:
        name = (strategy or {}).get("name", "auto")
        return {"ddp": "ddp", "deepspeed": "deepspeed", "fsdp": "fsdp2"}.get(
            str(name).split("_")[0], "single"
        )
    cls = get_class(target)
    for kind, family in (("deepspeed", LightningDeepSpeedStrategy), ("fsdp2", ModelParallelStrategy)):
        if issubclass(cls, family):
            return kind
    return "ddp" if issubclass(cls, DDPStrategy) else "single"
