"""Chat SFT on real conversations: packing on the ShareGPT + alpaca mixture, packed vs padded.

Both arms run `recipe=nlp/smollm2_chat_sft` (SmolLM2-135M-Instruct + LoRA; ShareGPT 0.7 and LLaMA-Factory's
alpaca demo 0.3, conversations up to 1,024 tokens) through toolkit.run.stages.train_stage:
  packed -- the recipe as written: whole conversations packed into rows of 2,048 tokens, 2 rows per batch;
  padded -- `data.packing=false data.batch_size=4`: the same conversations padded to the longest of each
            batch of 4 (about as many real tokens per step as a packed batch).
The non-pad fraction is counted over the whole training epoch of the mixture in the loader's own order.
Throughput is real tokens per second over the timed steps (see benchmarks.packing). Tokenizing the whole
mixture (11,205 ShareGPT chats + 999 alpaca rows) is timed by `data_cache`.

    python -m benchmarks --only chat
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.harness import TINY_LLAMA, Result
from benchmarks.overhead import run_toolkit
from benchmarks.packing import arm_row, epoch_tokens, nonpad_fraction

RECIPE = [
    "recipe=nlp/smollm2_chat_sft",
    "trainer.limit_val_batches=0",
    "trainer.accelerator=cpu",
    "logger=none",
    "progress_bar=false",
    "stages=[train]",
]
ARMS = {"packed": [], "padded": ["data.packing=false", "data.batch_size=4"]}
TINY = [TINY_LLAMA, "data.max_train_examples=48", "data.max_length=256", "data.pack_length=512"]


def main(tiny: bool = False) -> Result:
    steps, warmup = (3, 1) if tiny else (5, 1)  # durations run between step ends after the warm-up
    overrides = {arm: [*RECIPE, *extra, *(TINY if tiny else [])] for arm, extra in ARMS.items()}
    tokens, rows, rate = {}, {}, {}
    for arm, arm_overrides in overrides.items():
        tokens[arm], rows[arm] = epoch_tokens(arm_overrides)
        with tempfile.TemporaryDirectory() as tmp:
            durations, _ = run_toolkit(arm_overrides, steps, Path(tmp)).timed(warmup)
        timed = tokens[arm][warmup + 1 : warmup + 1 + len(durations)]
        rate[arm] = sum(real for real, _ in timed) / sum(durations)
    fractions = {arm: nonpad_fraction(t) for arm, t in tokens.items()}
    figures = {
        "chat.packed_nonpad_fraction": fractions["packed"],
        "chat.padded_nonpad_fraction": fractions["padded"],
        "chat.packed_tokens_per_s_over_padded": rate["packed"] / rate["padded"],
    }
    table = [arm_row(arm, rows[arm], tokens[arm], rate[arm], rate["padded"]) for arm in ARMS]
    command = " | ".join(f"toolkit-train {' '.join(o)} trainer.max_steps={steps}" for o in overrides.values())
    notes = (
        f"{steps} steps per arm, the first {warmup} untimed; real tokens/s = the timed steps' real tokens "
        "over their wall time (data loading included)."
    )
    return Result("Chat SFT: ShareGPT + alpaca mixture, packed vs padded", command, table, figures, notes)
