"""Preference tuning: DPO step time against TRL's DPOTrainer, and what the reference model costs in memory.

Speed (one process, rotated order toolkit/TRL, TRL/toolkit): `recipe=nlp/smollm2_dpo` (SmolLM2-135M-Instruct,
LoRA r=16 on the attention projections, the adapter-disabled base as reference, beta 0.1) against
`trl.DPOTrainer` given the same model, LoRA config, pairs (the recipe's training split, read by the
toolkit's reader and handed to TRL in its conversational format, so both render them with the same chat
template), batch of 2 pairs, max_length, fp32, fused AdamW, cosine schedule with the recipe's warmup,
clipping at 1.0, and steps. TRL runs with `bf16=False, gradient_checkpointing=False` (its defaults would
differ) and `peft_config=` (its reference is then also the adapter-disabled model). The figure compares
real tokens per second (the two samplers order the pairs differently); median step times beside it.

Memory (a `toolkit-train` process per arm, peak RSS and the tensors held before an optimizer step):
  lora                 -- the recipe: no second model;
  full_frozen_copy     -- adapter=none: the policy, its gradients and AdamW states, and a frozen copy;
  full_precomputed     -- adapter=none task.precompute_reference=true: the same without the copy.

    python -m benchmarks --only preference
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from hydra.utils import instantiate
from peft import LoraConfig

from benchmarks.harness import TINY_LLAMA, Result, train_with_resources
from benchmarks.overhead import Clock, _TrainerClock, hf_base_model, job_config, run_toolkit
from toolkit.data.sources import load_splits
from toolkit.models.adapters import adapter_settings
from toolkit.training.callbacks import batch_tokens

RECIPE = [
    "recipe=nlp/smollm2_dpo",
    "data.max_length=512",
    "trainer.limit_val_batches=0",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=10",
    "logger=csv",
    "progress_bar=false",
    "stages=[train]",
]
TINY = [TINY_LLAMA, "data.max_train_examples=16", "data.max_length=256"]
MEMORY_ARMS = {
    "lora": [],
    "full_frozen_copy": ["adapter=none"],
    "full_precomputed": ["adapter=none", "task.precompute_reference=true"],
}


def conversational_pairs(cfg: Any) -> Dataset:
    """The recipe's training pairs in TRL's conversational shape (prompt messages, one-turn answers)."""
    data = instantiate(cfg.data)
    raw = load_splits(data.path, data.name, data.val_size, data.test_size, data.seed)["train"]
    rows = data.read(raw).to_list()
    return Dataset.from_list(
        [
            {
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
            for row in rows
        ]
    )


def run_trl(cfg: Any, pairs: Dataset, steps: int, workdir: Path) -> Clock:
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=cfg.data.batch_size,
        max_steps=steps,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.scheduler.num_warmup_steps,
        max_grad_norm=cfg.trainer.gradient_clip_val,
        beta=cfg.task.beta,
        max_length=cfg.data.max_length,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        logging_steps=10,
        save_strategy="no",
        seed=cfg.seed,
    )
    model = hf_base_model(cfg, instantiate(cfg.task))
    tokenizer = instantiate(cfg.data).tokenizer
    lora = LoraConfig(task_type="CAUSAL_LM", **adapter_settings(cfg.adapter))
    clock = _TrainerClock()
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=lora, callbacks=[clock])  # fmt: skip
    tokens: list[int] = []
    collate = trainer.data_collator

    def counted(features: list[dict]) -> dict:
        batch = collate(features)
        tokens.append(batch_tokens(batch))
        return batch

    trainer.data_collator = counted
    trainer.train()
    return Clock(clock.ends, tokens)


def speed(tiny: bool, steps: int, warmup: int, reps: int) -> dict[str, dict[str, float]]:
    overrides = [*RECIPE, *(TINY if tiny else [])]
    cfg = job_config(overrides)
    pairs = conversational_pairs(cfg)
    runs = {
        "toolkit": lambda tmp: run_toolkit(overrides, steps, tmp),
        "trl": lambda tmp: run_trl(cfg, pairs, steps, tmp),
    }
    clocks: dict[str, list[Clock]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        for name in names[rep % 2 :] + names[: rep % 2]:
            with tempfile.TemporaryDirectory() as tmp:
                clocks[name].append(runs[name](Path(tmp)))
    stats = {}
    for name, name_clocks in clocks.items():
        durations, tokens = [], 0
        for clock in name_clocks:
            timed, timed_tokens = clock.timed(warmup)
            durations, tokens = durations + timed, tokens + timed_tokens
        stats[name] = {"median": statistics.median(durations), "tokens/s": tokens / sum(durations),
                       "steps": len(durations)}  # fmt: skip
    return stats


def memory(tiny: bool, steps: int) -> dict[str, dict]:
    reports = {}
    for arm, extra in MEMORY_ARMS.items():
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [*RECIPE, *extra, *(TINY if tiny else []), f"trainer.max_steps={steps}"]
            reports[arm] = train_with_resources(overrides, Path(tmp))[0]
    return reports


def main(tiny: bool = False) -> Result:
    steps, warmup, reps = (3, 1, 1) if tiny else (10, 2, 2)
    stats = speed(tiny, steps, warmup, reps)
    reports = memory(tiny, 4)
    figures = {
        "preference.dpo_tokens_per_s_trl_over_toolkit": stats["trl"]["tokens/s"]
        / stats["toolkit"]["tokens/s"],
        "preference.dpo_median_step_toolkit_over_trl": stats["toolkit"]["median"] / stats["trl"]["median"],
        "preference.peak_rss_lora_over_full_frozen_copy": reports["lora"]["peak_rss_bytes"]
        / reports["full_frozen_copy"]["peak_rss_bytes"],
        "preference.peak_rss_precomputed_over_frozen_copy": reports["full_precomputed"]["peak_rss_bytes"]
        / reports["full_frozen_copy"]["peak_rss_bytes"],
    }
    table = [
        {
            "arm": f"speed: {name}",
            "median step s": s["median"],
            "tokens/s": s["tokens/s"],
            "steps timed": s["steps"],
            "peak RSS GiB": "",
            "tensors held GiB": "",
        }  # fmt: skip
        for name, s in stats.items()
    ]
    for arm, r in reports.items():
        table.append({"arm": f"memory: {arm}", "median step s": r["median_step_seconds"], "tokens/s": "",
                      "steps timed": "", "peak RSS GiB": r["peak_rss_bytes"] / 2**30,
                      "tensors held GiB": (r["tensor_bytes"] or 0) / 2**30})  # fmt: skip
    command = (
        f"toolkit-train {' '.join(RECIPE)} trainer.max_steps={steps} | trl.DPOTrainer at the same settings; "
        + "; ".join(f"memory {arm}: {' '.join(extra) or '(recipe)'}" for arm, extra in MEMORY_ARMS.items())
    )
    notes = (
        f"{reps} repetitions, order rotated, {steps} steps each, the first {warmup} untimed; "
        f"{torch.get_num_threads()} torch threads. Tensors held: every live tensor just before an "
        "optimizer step (the frozen copy included: full_frozen_copy - full_precomputed is its size)."
    )
    title = "Preference tuning: DPO vs TRL DPOTrainer, and the reference model's memory"
    return Result(title, command, table, figures, notes)
