"""Strategies side by side on 2 CPU ranks: median step time, peak RSS and tensor bytes held per rank.

Full fine-tuning of SmolLM2-135M-Instruct (134.5M parameters, all trainable, AdamW, bf16-mixed) on SFT data,
one `toolkit-train` per strategy with `toolkit.training.callbacks.ResourceReport`
attached. "State bytes" is the
census of every tensor a rank holds just before an optimizer step (parameters, gradients, optimizer
states and the strategy's own buffers); the estimate column is `toolkit-estimate`'s parameters +
gradients + optimizer for the same rank.

    python -m benchmarks --only strategies
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.harness import TINY_LLAMA, Result, train_with_resources
from toolkit.config import compose_config
from toolkit.training.memory import SHARDING, estimate

STRATEGIES = [name for name in SHARDING if name != "single"]  # every multi-rank strategy
GIB = 1024**3


def overrides(strategy: str, steps: int, tiny: bool) -> list[str]:
    optim = "deepspeed_cpu_adam" if strategy.startswith("deepspeed") and "offload" in strategy else "adamw"
    return [
        "recipe=nlp/smollm2_lora_sft",
        "adapter=none",  # full fine-tuning: every parameter has gradients and optimizer states
        f"strategy={strategy}",
        f"optim={optim}",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        # the precision these strategies run in on GPUs; in fp32 DeepSpeed keeps an fp32 master copy
        # beside fp32 weights, so ZeRO-3 holds 5 partitions where DDP holds 4 whole states
        "trainer.precision=bf16-mixed",
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "data.batch_size=4",
        "data.max_length=64",
        "data.max_train_examples=256",
        "data.group_by_length=false",
        "stages=[train]",
        "logger=none",
        "progress_bar=false",
        *([TINY_LLAMA] if tiny else []),
    ]


def estimated_state_bytes(strategy: str, tiny: bool) -> float:
    row = estimate(compose_config(overrides(strategy, 1, tiny)))[strategy]
    return row["parameters"] + row["gradients"] + row["optimizer"]


def main(tiny: bool = False) -> Result:
    strategies = ["ddp", "fsdp2"] if tiny else STRATEGIES
    steps = 4 if tiny else 8
    with tempfile.TemporaryDirectory() as tmp:
        measured = {s: train_with_resources(overrides(s, steps, tiny), Path(tmp) / s) for s in strategies}
    worst = {
        s: {
            key: max(rank[key] for rank in ranks)
            for key in ("median_step_seconds", "peak_rss_bytes", "tensor_bytes")
        }
        for s, ranks in measured.items()
    }
    ddp = worst["ddp"]
    rows, figures = [], {}
    for s, w in worst.items():
        ratios = {
            "state_bytes_over_ddp": w["tensor_bytes"] / ddp["tensor_bytes"],
            "peak_rss_over_ddp": w["peak_rss_bytes"] / ddp["peak_rss_bytes"],
            "step_time_over_ddp": w["median_step_seconds"] / ddp["median_step_seconds"],
        }
        figures.update({f"strategies.{s}.{name}": value for name, value in ratios.items()})
        rows.append(
            {
                "strategy": s,
                "median step s": w["median_step_seconds"],
                "step / ddp": ratios["step_time_over_ddp"],
                "peak RSS GiB": w["peak_rss_bytes"] / GIB,
                "RSS / ddp": ratios["peak_rss_over_ddp"],
                "state GiB": w["tensor_bytes"] / GIB,
                "state / ddp": ratios["state_bytes_over_ddp"],
                "estimate GiB": estimated_state_bytes(s, tiny) / GIB,
            }
        )
    command = "toolkit-train " + " ".join(overrides("<strategy>", steps, tiny))
    notes = (
        "Per rank, the larger of the 2 ranks; step time is the median after 2 warm-up steps. "
        "On CPU, offload moves nothing off the device (the device is the CPU): its rows show its cost only."
    )
    return Result("Strategies: 2 CPU ranks, full fine-tuning", command, rows, figures, notes)
