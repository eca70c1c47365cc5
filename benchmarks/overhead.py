"""Overhead at identical settings: the toolkit against a plain PyTorch loop and `transformers.Trainer`.

The same model, data, batch, padding (every batch padded to max_length, so batch order cannot change the
work), precision (fp32), optimizer (AdamW, cosine schedule with warmup, gradient clipping at 1.0), threads and
number of steps, run three ways in one process, in the order ABCABC...:
  toolkit  -- `toolkit.stages.train_stage`, the code path of `toolkit-train` (Lightning, its progress bar, a
              CSV logger every 10 steps, checkpoint at the end);
  plain    -- a hand-written loop: DataLoader(shuffle=True) with the same collate function, forward, backward,
              clip, step, zero_grad, the loss read every 10 steps;
  trainer  -- `transformers.Trainer` with the same hyperparameters, its progress bar, logging every 10 steps,
              no saving.
Step time is the wall time between consecutive step ends (data loading, logging and progress bar included),
median over the timed steps of all repetitions. Startup (command to first step) is a separate `toolkit-train`.

    python -m benchmarks --only overhead
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
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
from toolkit.stages import train_stage
from toolkit.tasks import model_inputs
from toolkit.train import compose_config

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


class _TrainerClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())


def step_times(ends: list[float], warmup: int) -> list[float]:
    """Durations between consecutive step ends, after `warmup` steps."""
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :], strict=False)]


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


def run_toolkit(overrides: list[str], steps: int, workdir: Path) -> list[float]:
    clock = workdir / "clock.json"
    cfg = job_config(
        [
            *overrides,
            f"trainer.max_steps={steps}",
            f"+callbacks.clock={{_target_:toolkit.resources.StepClock,path:{clock}}}",
        ]
    )
    train_stage(cfg, workdir / "run")
    return json.loads(clock.read_text())["ends"]


def run_plain(cfg: DictConfig, data: Any, task: Any, steps: int) -> list[float]:
    L.seed_everything(cfg.seed)
    model = hf_model(cfg, task, data.tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas)
    )
    scheduler = get_scheduler("cosine", optimizer, cfg.scheduler.num_warmup_steps, steps)
    loader = torch.utils.data.DataLoader(
        data.splits["train"],
        batch_size=data.batch_size,
        shuffle=True,
        collate_fn=lambda features: model_inputs(data.collate(features)),
        num_workers=data.num_workers,
    )
    model.train()
    ends, last_loss = [], None
    for step, batch in enumerate(loader):
        if step == steps:
            break
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % LOG_EVERY == 0:
            last_loss = loss.item()
        ends.append(time.perf_counter())
    assert last_loss is not None
    return ends


def run_trainer(cfg: DictConfig, data: Any, task: Any, steps: int, workdir: Path) -> list[float]:
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
    clock = _TrainerClock()
    trainer = Trainer(
        model=hf_model(cfg, task, data.tokenizer.pad_token_id),
        args=args,
        train_dataset=data.splits["train"],
        data_collator=lambda features: model_inputs(data.collate(features)),
        callbacks=[clock],
    )
    trainer.train()
    return clock.ends


def compare(name: str, tiny: bool, steps: int, reps: int, warmup: int) -> dict[str, list[float]]:
    overrides = [*MODELS[name], *COMMON, *(TINY[name] if tiny else [])]
    cfg = job_config(overrides)
    data, task = instantiate(cfg.data), instantiate(cfg.task)
    data.setup("fit")
    times: dict[str, list[float]] = {"toolkit": [], "plain": [], "trainer": []}
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            times["toolkit"] += step_times(run_toolkit(overrides, steps, Path(tmp)), warmup)
            times["plain"] += step_times(run_plain(cfg, data, task, steps), warmup)
            times["trainer"] += step_times(run_trainer(cfg, data, task, steps, Path(tmp)), warmup)
    times["tokens_per_step"] = [data.batch_size * data.max_length]
    return times


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
    steps, reps, warmup = (3, 1, 1) if tiny else (25, 3, 5)  # 60 timed steps per variant and model
    rows, figures = [], {}
    for name in MODELS:
        times = compare(name, tiny, steps, reps, warmup)
        medians = {v: statistics.median(times[v]) for v in ("toolkit", "plain", "trainer")}
        figures[f"overhead.{name}.toolkit_over_plain"] = medians["toolkit"] / medians["plain"]
        figures[f"overhead.{name}.toolkit_over_trainer"] = medians["toolkit"] / medians["trainer"]
        for variant, median in medians.items():
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "median step s": median,
                    "tokens/s": times["tokens_per_step"][0] / median,
                    "over plain": median / medians["plain"],
                    "over trainer": median / medians["trainer"],
                    "steps timed": len(times[variant]),
                }
            )
    figures["startup.seconds_to_first_step"] = seconds_to_first_step(tiny)
    rows.append(
        {
            "model": "minilm",
            "variant": "startup: launch to first step s",
            "median step s": figures["startup.seconds_to_first_step"],
            "tokens/s": "",
            "over plain": "",
            "over trainer": "",
            "steps timed": "",
        }
    )
    command = (
        f"per model: {{toolkit-train | plain loop | transformers.Trainer}} with "
        f"{' '.join(COMMON)} trainer.max_steps={steps}; minilm: {' '.join(MODELS['minilm'])}; "
        f"smollm2_lora: {' '.join(MODELS['smollm2_lora'])}"
    )
    notes = (
        f"Order toolkit, plain, trainer repeated {reps}x in one process; {steps} steps each, the first "
        f"{warmup} untimed. fp32, {torch.get_num_threads()} torch threads, AdamW + cosine warmup, clip 1.0, "
        "every batch padded to max_length (tokens/s counts padded slots). Startup: `toolkit-train "
        "recipe=quickstart trainer.max_steps=2 stages=[train]` (W&B offline logger) from launch to the first "
        "step's start, one run."
    )
    return Result("Overhead: toolkit vs plain loop vs transformers.Trainer", command, rows, figures, notes)
