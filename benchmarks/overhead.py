"""Overhead: the toolkit against a plain PyTorch loop and `transformers.Trainer`, in two settings.

Both settings: the same model, data, batch size, precision (fp32), optimizer (AdamW, cosine schedule with
warmup, gradient clipping at 1.0), threads and number of steps, run three ways in one process, in the order
ABCABC...:
  toolkit  -- `toolkit.stages.train_stage`, the code path of `toolkit-train` (Lightning, its progress bar, a
              CSV logger every 10 steps, checkpoint at the end);
  plain    -- a hand-written loop over the toolkit's own data loader (same sampler and collate function):
              forward, backward, clip, step, zero_grad, the loss read every 10 steps;
  trainer  -- `transformers.Trainer` with the same hyperparameters, its progress bar, logging every 10 steps,
              no saving.
Settings:
  defaults   -- the headline figures: each side batches as it recommends. The toolkit (and the plain loop,
                which shares its loader) pads each batch to its longest example and groups similar lengths
                (`data.group_by_length=true`); the Trainer pads to the longest example over randomly shuffled
                examples (its default sampler; `DataCollatorWithPadding` behaviour). Batches differ in work,
                so the ratios are of mean step time (time per example), and tokens/s counts real tokens.
  equal_work -- every batch padded to max_length 32 in random order for all three, so the work per step is
                identical and the ratios (of median step time) isolate each side's own overhead
                (`overhead.<model>.equal_work.*`).
Step time is the wall time between consecutive step ends (data loading, logging and progress bar included).
Startup (command to first step) is a separate `toolkit-train`.

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
from toolkit.adapters import adapter_settings
from toolkit.resources import batch_tokens
from toolkit.stages import train_stage
from toolkit.tasks import model_inputs
from toolkit.train import compose_config

COMMON = [
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=10",
    "trainer.accelerator=cpu",
    "logger=csv",
    "stages=[train]",
]
SETTINGS = {
    "defaults": [],  # the recipe's own batching: padding=longest, group_by_length=true, its max_length
    "equal_work": ["data.padding=max_length", "data.group_by_length=false", "data.max_length=32"],
}
MODELS = {
    # small batches: the 2-core machine this was sized for takes seconds per step
    "minilm": ["recipe=quickstart", "data.batch_size=16"],
    "smollm2_lora": ["recipe=nlp/smollm2_lora_sft", "data.batch_size=4"],
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
    kwargs = task.model_kwargs()
    if cfg.model.config is not None:
        values = OmegaConf.to_container(cfg.model.config, resolve=True)
        model = task.auto_class.from_config(
            AutoConfig.for_model(values.pop("model_type"), **values, **kwargs)
        )
    else:
        model = task.auto_class.from_pretrained(cfg.model.name_or_path, dtype=torch.float32, **kwargs)
    model.config.pad_token_id = model.config.pad_token_id or pad_token_id
    lora = adapter_settings(cfg.adapter)
    if lora:
        model = get_peft_model(model, LoraConfig(task_type=task.peft_task_type, **lora))
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
            f"+callbacks.clock={{_target_:toolkit.resources.StepClock,path:{clock}}}",
        ]
    )
    train_stage(cfg, workdir / "run")
    timing = json.loads(clock.read_text())
    return Clock(timing["ends"], timing["tokens"])


def run_plain(cfg: DictConfig, data: Any, task: Any, steps: int) -> Clock:
    L.seed_everything(cfg.seed)
    model = hf_model(cfg, task, data.tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas)
    )
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


def compare(name: str, setting: str, tiny: bool, steps: int, reps: int) -> dict[str, list[Clock]]:
    overrides = [*MODELS[name], *COMMON, *SETTINGS[setting], *(TINY[name] if tiny else [])]
    cfg = job_config(overrides)
    data, task = instantiate(cfg.data), instantiate(cfg.task)
    data.setup("fit")
    clocks: dict[str, list[Clock]] = {"toolkit": [], "plain": [], "trainer": []}
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            clocks["toolkit"].append(run_toolkit(overrides, steps, Path(tmp)))
            clocks["plain"].append(run_plain(cfg, data, task, steps))
            clocks["trainer"].append(run_trainer(cfg, data, task, steps, Path(tmp)))
    return clocks


def summarize(clocks: list[Clock], warmup: int) -> dict[str, float]:
    """Median and mean step time and tokens/s over every repetition's timed steps."""
    durations, tokens = [], 0
    for clock in clocks:
        timed, timed_tokens = clock.timed(warmup)
        durations += timed
        tokens += timed_tokens
    return {
        "median": statistics.median(durations),
        "mean": statistics.fmean(durations),
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
            f"+callbacks.clock={{_target_:toolkit.resources.StepClock,path:{clock}}}",
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
    steps, reps, warmup = (3, 1, 1) if tiny else (25, 3, 5)  # 57 timed steps per variant, model and setting
    rows, figures = [], {}
    for setting in SETTINGS:
        statistic = "mean" if setting == "defaults" else "median"
        prefix = "" if setting == "defaults" else f"{setting}."
        for name in MODELS:
            clocks = compare(name, setting, tiny, steps, reps)
            stats = {variant: summarize(runs, warmup) for variant, runs in clocks.items()}
            plain, trainer = stats["plain"][statistic], stats["trainer"][statistic]
            figures[f"overhead.{name}.{prefix}toolkit_over_plain"] = stats["toolkit"][statistic] / plain
            figures[f"overhead.{name}.{prefix}toolkit_over_trainer"] = stats["toolkit"][statistic] / trainer
            for variant, stat in stats.items():
                rows.append(
                    {
                        "model": name,
                        "setting": setting,
                        "variant": variant,
                        "median step s": stat["median"],
                        "mean step s": stat["mean"],
                        "tokens/s": stat["tokens/s"],
                        "over plain": stat[statistic] / plain,
                        "over trainer": stat[statistic] / trainer,
                        "steps timed": stat["steps"],
                    }
                )
    figures["startup.seconds_to_first_step"] = seconds_to_first_step(tiny)
    rows.append(
        {
            "model": "minilm",
            "setting": "defaults",
            "variant": "startup: launch to first step s",
            "median step s": figures["startup.seconds_to_first_step"],
            **dict.fromkeys(("mean step s", "tokens/s", "over plain", "over trainer", "steps timed"), ""),
        }
    )
    command = (
        "per model and setting: {toolkit-train | plain loop | transformers.Trainer} with "
        f"{' '.join(COMMON)} trainer.max_steps={steps}; "
        + "; ".join(f"{name}: {' '.join(args)}" for name, args in MODELS.items())
        + "; "
        + "; ".join(
            f"{setting}: {' '.join(args) or '(recipe data settings)'}" for setting, args in SETTINGS.items()
        )
    )
    notes = (
        f"Order toolkit, plain, trainer repeated {reps}x in one process per model and setting; {steps} steps "
        f"each, the first {warmup} untimed. fp32, {torch.get_num_threads()} torch threads, AdamW + cosine "
        "warmup, clip 1.0. Ratios: mean step time in the `defaults` setting (the toolkit's length-grouped "
        "batches against the Trainer's shuffled ones: different work per step, same examples per step), "
        "median step time in `equal_work` (every batch padded to 32 tokens). tokens/s counts non-padding "
        "tokens. Startup: `toolkit-train recipe=quickstart trainer.max_steps=2 stages=[train]` (W&B offline "
        "logger) from launch to the first step's start, one run."
    )
    return Result("Overhead: toolkit vs plain loop vs transformers.Trainer", command, rows, figures, notes)
