"""Sequence packing on the SFT recipe: share of real (non-pad) tokens and throughput, packed vs padded.

Both arms run `recipe=nlp/smollm2_lora_sft` (SmolLM2-135M-Instruct + LoRA) through
toolkit.run.stages.train_stage:
  padded -- the recipe's defaults: 8 examples per batch, padded to the longest, length-grouped batches
            (the same without length grouping is counted too, not trained);
  packed -- `data.packing=true data.pack_length=512 data.batch_size=2`: whole examples packed into rows of at
            most 512 tokens (about 13 examples per batch), no attention across examples.
The non-pad fraction is counted over the whole training epoch in the loader's own order (real tokens over
token slots after padding). Throughput is real tokens per second over the timed steps, run ABAB... in one
process; the tokens of each step are known because the loader's order is a function of the seed.

    python -m benchmarks --only packing
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from benchmarks.harness import TINY_LLAMA, Result
from benchmarks.overhead import job_config, run_toolkit

RECIPE = [
    "recipe=nlp/smollm2_lora_sft",
    "trainer.limit_val_batches=0",
    "trainer.accelerator=cpu",
    "logger=none",
    "progress_bar=false",
    "stages=[train]",
]
ARMS = {
    "padded": [],
    "packed": ["data.packing=true", "data.pack_length=512", "data.batch_size=2"],
}
# counted, not trained: padding without the recipe's length grouping (what a default DataLoader would do)
UNGROUPED = ["data.group_by_length=false"]
TINY = [TINY_LLAMA, "data.max_train_examples=64"]


def batch_tokens(data: Any) -> list[tuple[int, int]]:
    """(real tokens, token slots) of every training batch of the first epoch, in the loader's order."""
    lengths = [len(ids) for ids in data.splits["train"]["input_ids"]]
    order = list(iter(data.train_dataloader().sampler))
    batches = [order[i : i + data.batch_size] for i in range(0, len(order), data.batch_size)]
    return [(sum(lengths[i] for i in b), max(lengths[i] for i in b) * len(b)) for b in batches]


def nonpad_fraction(tokens: list[tuple[int, int]]) -> float:
    return sum(real for real, _ in tokens) / sum(slots for _, slots in tokens)


def epoch_tokens(overrides: list[str]) -> tuple[list[tuple[int, int]], int]:
    """Every training batch's (real tokens, slots) and the number of training rows, under `overrides`."""
    data = instantiate(job_config(overrides).data)
    data.setup("fit")
    return batch_tokens(data), len(data.splits["train"])


def arm_row(arm: str, examples: int, tokens: list[tuple[int, int]], rate: float, padded_rate: float) -> dict:
    """One arm's table row: its epoch's rows, batches and padding, and its throughput over padded."""
    return {
        "arm": arm,
        "rows in epoch": examples,
        "batches in epoch": len(tokens),
        "real tokens / batch": sum(r for r, _ in tokens) / len(tokens),
        "non-pad fraction": nonpad_fraction(tokens),
        "real tokens/s": rate,
        "over padded": rate / padded_rate,
    }


def main(tiny: bool = False) -> Result:
    steps, reps, warmup = (3, 1, 1) if tiny else (3, 2, 1)
    overrides = {arm: [*RECIPE, *extra, *(TINY if tiny else [])] for arm, extra in ARMS.items()}
    tokens, examples = {}, {}
    for arm, arm_overrides in overrides.items():
        tokens[arm], examples[arm] = epoch_tokens(arm_overrides)
    ungrouped, _ = epoch_tokens([*overrides["padded"], *UNGROUPED])
    seconds: dict[str, float] = {arm: 0.0 for arm in ARMS}
    real: dict[str, int] = {arm: 0 for arm in ARMS}
    for _ in range(reps):
        for arm, arm_overrides in overrides.items():
            with tempfile.TemporaryDirectory() as tmp:
                durations, _ = run_toolkit(arm_overrides, steps, Path(tmp)).timed(warmup)
            seconds[arm] += sum(durations)
            real[arm] += sum(r for r, _ in tokens[arm][warmup + 1 : warmup + 1 + len(durations)])
    fractions = {arm: nonpad_fraction(t) for arm, t in tokens.items()}
    rate = {arm: real[arm] / seconds[arm] for arm in ARMS}
    figures = {
        "packing.nonpad_fraction": fractions["packed"],
        "packing.padded_nonpad_fraction": fractions["padded"],
        "packing.padded_ungrouped_nonpad_fraction": nonpad_fraction(ungrouped),
        "packing.tokens_per_s_over_padded": rate["packed"] / rate["padded"],
    }
    rows = [arm_row(arm, examples[arm], tokens[arm], rate[arm], rate["padded"]) for arm in ARMS]
    rows.append(
        {
            "arm": "padded, not length-grouped (counted only)",
            "rows in epoch": examples["padded"],
            "batches in epoch": len(ungrouped),
            "real tokens / batch": sum(r for r, _ in ungrouped) / len(ungrouped),
            "non-pad fraction": nonpad_fraction(ungrouped),
            "real tokens/s": "",
            "over padded": "",
        }
    )
    command = " | ".join(f"toolkit-train {' '.join(o)} trainer.max_steps={steps}" for o in overrides.values())
    notes = (
        f"Throughput: {reps}x ABAB in one process, {steps} steps per run, the first {warmup} untimed; "
        "real tokens/s = the timed steps' real tokens over their wall time (data loading included)."
    )
    return Result("Sequence packing: SmolLM2 LoRA SFT, packed vs padded", command, rows, figures, notes)
