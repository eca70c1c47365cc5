"""Peak memory of LoRA against full fine-tuning on SmolLM2-135M-Instruct, one `toolkit-train` process each.

Both run the SFT recipe for a few steps (batch 4 of at most 64 tokens, fp32 AdamW) with
`toolkit.training.callbacks.ResourceReport` attached: peak RSS of the process and the census of tensors
held just before an optimizer step.

    python -m benchmarks --only memory
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.harness import TINY_LLAMA, Result, train_with_resources

ARMS = {"lora": "adapter=lora", "full": "adapter=none"}
GIB = 1024**3


def overrides(adapter: str, steps: int, tiny: bool) -> list[str]:
    return [
        "recipe=nlp/smollm2_lora_sft",
        adapter,
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "trainer.accelerator=cpu",
        "data.batch_size=4",  # of at most 64 tokens: a loaded 2-core machine takes about a minute per step
        "data.max_length=64",
        "logger=none",
        "progress_bar=false",
        "stages=[train]",
        *([TINY_LLAMA, "data.max_train_examples=64"] if tiny else []),
    ]


def run(adapter: str, steps: int, tiny: bool, workdir: Path) -> dict:
    return train_with_resources(overrides(adapter, steps, tiny), workdir / adapter.split("=")[1])[0]


def main(tiny: bool = False) -> Result:
    steps = 3  # ResourceReport's census runs before the 3rd optimizer step
    with tempfile.TemporaryDirectory() as tmp:
        reports = {arm: run(adapter, steps, tiny, Path(tmp)) for arm, adapter in ARMS.items()}
    full = reports["full"]
    rows = [
        {
            "arm": arm,
            "peak RSS GiB": r["peak_rss_bytes"] / GIB,
            "RSS / full": r["peak_rss_bytes"] / full["peak_rss_bytes"],
            "tensors held GiB": r["tensor_bytes"] / GIB,
            "tensors / full": r["tensor_bytes"] / full["tensor_bytes"],
            "median step s": r["median_step_seconds"],
        }
        for arm, r in reports.items()
    ]
    figures = {
        "memory.lora_over_full": reports["lora"]["peak_rss_bytes"] / full["peak_rss_bytes"],
        "memory.lora_tensors_over_full": reports["lora"]["tensor_bytes"] / full["tensor_bytes"],
    }
    command = "toolkit-train " + " ".join(overrides("adapter={lora|none}", steps, tiny))
    notes = (
        "Separate processes; peak RSS covers the whole process (Python, libraries, data, model, activations)."
    )
    return Result("Memory: LoRA vs full fine-tuning, SmolLM2-135M", command, rows, figures, notes)
