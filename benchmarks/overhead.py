"""Overhead at identical settings: the toolkit against a plain PyTorch loop and `transformers.Trainer`.

The same model, data, batch, padding (every batch padded to max_length, so batch order cannot change the
work), precision (fp32), optimizer (fused AdamW: the recipe's `fused: null` is fused in fp32, for toolkit and
plain loop; `adamw_torch_fused` is the Trainer's default; cosine schedule with warmup, gradient clipping at
1.0), threads and number of steps, run three ways in one process, in rotated order ABC BCA CAB:
  toolkit  -- `toolkit.run.stages.train_stage`, the path of `toolkit-train` (Lightning, its progress bar, a
              CSV logger every 10 steps, checkpoint at the end);
  plain    -- a hand-written loop over the toolkit's own data loader (same sampler and collate function) and
              optimizer: forward, backward, clip, step, zero_grad, the loss read every 10 steps;
  trainer  -- `transformers.Trainer` with the same hyperparameters, its progress bar, logging every 10 steps,
              no saving.
Step time is the wall time between consecutive step ends (data loading, logging and progress bar included),
median over the timed steps of all repetitions. Each side at its own recommended defaults is the `defaults`
benchmark. Startup (command to first step) is a separate `toolkit-train`.

    python -m benchmarks --only overhead
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, Trainer, TrainerCallback, TrainingArguments, get_scheduler

from benchmarks.harness import TINY_BERT, TINY_LLAMA, Result
from toolkit.config import compose_config
from toolkit.models.adapters import adapter_settings
from toolkit.run.stages import train_stage
from toolkit.tasks.base import model_inputs
from toolkit.training.callbacks import batch_tokens
from toolkit.training.module import build_optimizer

COMMON = [
    "data.padding=max_length",
    "data.group_by_length=false",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=10",
    "trainer.accelerator=cpu",
    "logger=csv",
    "stages=[train]",
]
MODELS = {
    # short sequences and small batches: the 2-core machine this was sized for takes seconds per step
    "minilm": ["recipe=quickstart", "data.max_length=32", "data.batch_size=16"],
    "smollm2_lora": ["recipe=nlp/smollm2_lora_sft", "data.max_length=32", "data.batch_size=4"],
}
TINY_DATA = ["data.max_length=16", "data.batch_size=4", "data.max_train_examples=64"]
TINY = {"minilm": [TINY_BERT, *TINY_DATA], "smollm2_lora": [TINY_LLAMA, *TINY_DATA]}
LOG_EVERY = 10


@dataclass
class Clock:
    """Step end times and each step's tokens, as one variant ran."""

    ends: list[float]
    tokens: list[int]

    def timed(self, warmup: int) -> tuple[list[float], int]:
        """Durations between consecutive step ends after `warmup` steps, and the tokens of those steps."""
        ends = self.ends[warmup:]
        return [b - a for a, b in zip(ends, ends[1:], strict=False)], sum(
            self.tokens[warmup + 1 : len(self.ends)]
        )


class _TrainerClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())


def hf_model(cfg: DictConfig, task: Any, pad_token_id: int) -> torch.nn.Module:
    """The model as a user writes it: transformers Auto class (+ PEFT LoRA with the recipe's numbers)."""
    model = hf_base_model(cfg, task)
    model.config.pad_token_id = model.config.pad_token_id or pad_token_id
    lora = adapter_settings(cfg.adapter)
    if lora:
        model = get_peft_model(model, LoraConfig(task_type=task.peft_task_type, **lora))
    return model


def hf_base_model(cfg: DictConfig, task: Any) -> torch.nn.Module:
    """The recipe's model from its source (pretrained weights, or a config), through the Auto class."""
    kwargs = task.model_kwargs()
    if cfg.model.config is not None:
        values = OmegaConf.to_container(cfg.model.config, resolve=True)
        model = task.auto_class.from_config(
            AutoConfig.for_model(values.pop("model_type"), **values, **kwargs)
        )
    else:
        model = task.auto_class.from_pretrained(cfg.model.name_or_path, dtype=torch.float32, **kwargs)
    return model


def job_config(overrides: list[str]) -> DictConfig:
    """The config `toolkit-train <overrides>` runs with (as Hydra hands it to the job: no `hydra` node)."""
    cfg = compose_config(overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_toolkit(overrides: list[str], steps: int, workdir: Path) -> Clock:
    clock = workdir / "clock.json"
    cfg = job_config(
        [
            *overrides,
            f"trainer.max_steps={steps}",
            f"+callbacks.clock={{_target_:toolkit.training.callbacks.StepClock,path:{clock}}}",
        ]
    )
    train_stage(cfg, workdir / "run")
    timing = json.loads(clock.read_text())
    return Clock(timing["ends"], timing["tokens"])


def run_plain(cfg: DictConfig, data: Any, task: Any, steps: int) -> Clock:
    L.seed_everything(cfg.seed)
    model = hf_model(cfg, task, data.tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    # the recipe's optimizer, built as the toolkit builds it (fused where Lightning allows)
    precision, clip = cfg.trainer.precision, cfg.trainer.gradient_clip_val
    optimizer = build_optimizer(instantiate(cfg.optim), params, precision, clip)
    scheduler = get_scheduler("cosine", optimizer, cfg.scheduler.num_warmup_steps, steps)
    model.train()
    clock, last_loss = Clock([], []), None
    for step, batch in enumerate(data.train_dataloader()):
        if step == steps:
            break
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % LOG_EVERY == 0:
            last_loss = loss.item()
        clock.ends.append(time.perf_counter())
        clock.tokens.append(batch_tokens(batch))
    assert last_loss is not None
    return clock


def run_trainer(cfg: DictConfig, data: Any, task: Any, steps: int, workdir: Path) -> Clock:
    L.seed_everything(cfg.seed)
    args = TrainingArguments(
        output_dir=str(workdir / "hf"),
        per_device_train_batch_size=data.batch_size,
        max_steps=steps,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        lr_scheduler_type="cosine",
        warmup_steps=cfg.scheduler.num_warmup_steps,
        max_grad_norm=cfg.trainer.gradient_clip_val,
        logging_steps=LOG_EVERY,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=data.num_workers,
        remove_unused_columns=False,
        seed=cfg.seed,
    )
    clock, tokens = _TrainerClock(), []

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = model_inputs(data.collate(features))
        tokens.append(batch_tokens(batch))
        return batch

    trainer = Trainer(
        model=hf_model(cfg, task, data.tokenizer.pad_token_id),
        args=args,
        train_dataset=data.splits["train"],  # the Trainer's own shuffled sampler
        data_collator=collate,
        callbacks=[clock],
    )
    trainer.train()
    return Clock(clock.ends, tokens)


def compare(name: str, tiny: bool, steps: int, reps: int) -> dict[str, list[Clock]]:
    overrides = [*MODELS[name], *COMMON, *(TINY[name] if tiny else [])]
    cfg = job_config(overrides)
    data, task = instantiate(cfg.data), instantiate(cfg.task)
    data.setup("fit")
    runs = {
        "toolkit": lambda tmp: run_toolkit(overrides, steps, tmp),
        "plain": lambda tmp: run_plain(cfg, data, task, steps),
        "trainer": lambda tmp: run_trainer(cfg, data, task, steps, tmp),
    }
    names = list(runs)
    clocks: dict[str, list[Clock]] = {name: [] for name in names}
    for rep in range(reps):
        # rotated order (ABC, BCA, CAB, ...): over 3 repetitions each side runs once in each position, so
        # whatever running first or last does to a side (warm caches, allocator state) cancels out
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            with tempfile.TemporaryDirectory() as tmp:
                clocks[name].append(runs[name](Path(tmp)))
    return clocks


def summarize(clocks: list[Clock], warmup: int) -> dict[str, float]:
    """Median step time and tokens/s over every repetition's timed steps."""
    durations, tokens = [], 0
    for clock in clocks:
        timed, timed_tokens = clock.timed(warmup)
        durations += timed
        tokens += timed_tokens
    return {
        "median": statistics.median(durations),
        "tokens/s": tokens / sum(durations),
        "steps": len(durations),
    }


def seconds_to_first_step(tiny: bool) -> float:
    """`toolkit-train recipe=quickstart` (default logger) from launch to the start of its first step."""
    with tempfile.TemporaryDirectory() as tmp:
        clock = Path(tmp) / "clock.json"
        args = [
            "recipe=quickstart",
            "trainer.max_steps=2",
            "stages=[train]",
            f"hydra.run.dir={Path(tmp) / 'run'}",
            f"+callbacks.clock={{_target_:toolkit.training.callbacks.StepClock,path:{clock}}}",
            *([TINY_BERT] if tiny else []),
        ]
        started = time.time()
        done = subprocess.run(
            [str(Path(sys.executable).with_name("toolkit-train")), *args], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"toolkit-train failed:\n{done.stderr[-3000:]}")
        return json.loads(clock.read_text())["first_start"] - started


def main(tiny: bool = False) -> Result:
    steps, reps, warmup = (3, 1, 1) if tiny else (25, 3, 5)  # 57 timed steps per variant and model
    rows, figures = [], {}
    for name in MODELS:
        stats = {v: summarize(runs, warmup) for v, runs in compare(name, tiny, steps, reps).items()}
        plain, trainer = stats["plain"]["median"], stats["trainer"]["median"]
        figures[f"overhead.{name}.toolkit_over_plain"] = stats["toolkit"]["median"] / plain
        figures[f"overhead.{name}.toolkit_over_trainer"] = stats["toolkit"]["median"] / trainer
        for variant, stat in stats.items():
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "median step s": stat["median"],
                    "tokens/s": stat["tokens/s"],
                    "over plain": stat["median"] / plain,
                    "over trainer": stat["median"] / trainer,
                    "steps timed": stat["steps"],
                }
            )
    figures["startup.seconds_to_first_step"] = seconds_to_first_step(tiny)
    rows.append(
        {
            "model": "minilm",
            "variant": "startup: launch to first step s",
            "median step s": figures["startup.seconds_to_first_step"],
            **dict.fromkeys(("tokens/s", "over plain", "over trainer", "steps timed"), ""),
        }
    )
    command = (
        f"per model: {{toolkit-train | plain loop | transformers.Trainer}} with "
        f"{' '.join(COMMON)} trainer.max_steps={steps}; "
        + "; ".join(f"{name}: {' '.join(args)}" for name, args in MODELS.items())
    )
    notes = (
        f"{reps} repetitions in one process, order rotated (toolkit plain trainer, plain trainer toolkit, "
        f"trainer toolkit plain); {steps} steps each, the first "
        f"{warmup} untimed. fp32, {torch.get_num_threads()} torch threads, fused AdamW + cosine warmup, clip "
        "1.0, every batch padded to max_length (tokens/s counts the non-padding tokens). "
        "Startup: `toolkit-train recipe=quickstart trainer.max_steps=2 stages=[train]` (W&B offline logger) "
        "from launch to the first step's start, one run."
    )
    return Result("Overhead: toolkit vs plain loop vs transformers.Trainer", command, rows, figures, notes)
