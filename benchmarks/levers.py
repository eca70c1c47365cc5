"""The memory levers on SmolLM2-135M-Instruct (the real checkpoint), side by side in one run.

- Activation checkpointing: the peak bytes of tensors alive during one forward + backward of 512 tokens
  (every allocation and free of the CPU allocator, read from torch.profiler), with and without; and the
  time of that step.
- QLoRA vs LoRA: the weight bytes a training process holds (4-bit weights with their scales), the peak RSS
  of one `toolkit-train` process each, and the first losses on the same batches (the SFT loss of one-word
  answers, which a 4-bit base moves most).
- The estimator against the tensors held: parameters + gradients + optimizer states, each arm.

    python -m benchmarks --only levers
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import Result, save_tiny_llama, train_with_resources
from toolkit.config import compose_config
from toolkit.run.build import build_data_and_task, build_module
from toolkit.training.memory import estimate, held_states

ARMS = {
    "lora": ["adapter=lora"],
    "lora + checkpointing": ["adapter=lora", "model.activation_checkpointing=true"],
    "qlora": ["adapter=qlora"],
    "qlora + checkpointing": ["adapter=qlora", "model.activation_checkpointing=true"],
}
STEPS = 5
MIB = 1024**2
# tiny: a saved Llama whose widths bitsandbytes packs (multiples of 64), for a smoke test of the harness
TINY_BASE = (
    "model.config={model_type:llama,hidden_size:64,num_hidden_layers:2,num_attention_heads:4,num_key_value_heads:2,"
    "intermediate_size:128,vocab_size:49152,max_position_embeddings:512,tie_word_embeddings:true}"
)


def overrides(levers: list[str], base: Path | None) -> list[str]:
    return [
        "recipe=nlp/smollm2_lora_sft",
        *levers,
        "trainer.accelerator=cpu",
        f"trainer.max_steps={STEPS}",
        "trainer.limit_val_batches=0",
        "data.batch_size=4",
        "data.max_length=64",
        "logger=none",
        "progress_bar=false",
        "stages=[train]",
        *([f"model.name_or_path={base}", "data.max_train_examples=64"] if base else []),
    ]


class Probe(L.Callback):
    """Each step's loss, and the tensors held at the second optimizer step (gradients and the first
    step's optimizer states alive)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.held = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step == 1:
            self.held = held_states(module.model, optimizer)


def peak_tensor_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Peak bytes allocated above the starting point during one forward + backward: the activations (and
    the transient buffers of the kernels); gradients exist already, so they are not allocated again."""
    model.zero_grad(set_to_none=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def step_seconds(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(levers: list[str], base: Path | None, tokens: int) -> dict:
    cfg = compose_config(overrides(levers, base))
    L.seed_everything(cfg.seed)  # the same batches, in the same order, for every arm
    data, task = build_data_and_task(cfg)
    data.setup("fit")
    module = build_module(cfg, task, data.pad_token_id)
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    vocab = module.model.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    held = probe.held
    estimated = estimate(cfg, describe=False)["single"]
    return {
        "losses": probe.losses,
        "peak_activation_bytes": peak_tensor_bytes(module.model, ids),
        "step_seconds": step_seconds(module.model, ids, repeats=3),
        "weights": held.parameters,
        "held_states": held.parameters + held.gradients + held.optimizer,
        "estimated_states": estimated["parameters"] + estimated["gradients"] + estimated["optimizer"],
        "estimated_activations": estimated["activations"],
    }


def main(tiny: bool = False) -> Result:
    tokens = 64 if tiny else 512
    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny_llama(Path(tmp) / "base", TINY_BASE) if tiny else None
        arms = {name: measure(levers, base, tokens) for name, levers in ARMS.items()}
        rss = {
            name: train_with_resources(overrides(ARMS[name], base), Path(tmp) / name.replace(" ", "_"))[0]
            for name in ("lora", "qlora")
        }
    lora, qlora = arms["lora"], arms["qlora"]
    rows = [
        {
            "arm": name,
            f"peak activations MiB ({tokens} tokens)": a["peak_activation_bytes"] / MIB,
            "fwd+bwd s": a["step_seconds"],
            "weights held MiB": a["weights"] / MIB,
            "states held MiB": a["held_states"] / MIB,
            "states estimated MiB": a["estimated_states"] / MIB,
            "estimate / held": a["estimated_states"] / a["held_states"],
            "first losses": " ".join(f"{x:.4f}" for x in a["losses"]),
        }
        for name, a in arms.items()
    ]
    checkpointed = arms["lora + checkpointing"]
    figures = {
        "memory.activation_checkpointing_over_none": checkpointed["peak_activation_bytes"]
        / lora["peak_activation_bytes"],
        "memory.activation_checkpointing_step_time_over_none": checkpointed["step_seconds"]
        / lora["step_seconds"],
        "memory.estimated_activation_checkpointing_over_none": checkpointed["estimated_activations"]
        / lora["estimated_activations"],
        "memory.qlora_over_lora": qlora["weights"] / lora["weights"],
        "memory.qlora_rss_over_lora": rss["qlora"]["peak_rss_bytes"] / rss["lora"]["peak_rss_bytes"],
        "memory.qlora_first_losses_max_relative_difference": max(
            abs(q - x) / abs(x) for q, x in zip(qlora["losses"], lora["losses"], strict=True)
        ),
    }
    for name, a in arms.items():
        key = name.replace(" + ", "_").replace(" ", "_")
        figures[f"memory.estimate_over_held.{key}"] = a["estimated_states"] / a["held_states"]
    command = "toolkit-train " + " ".join(
        overrides(["adapter={lora|qlora}", "[model.activation_checkpointing=true]"], None)
    )
    notes = (
        "One process for the in-process arms (same seed, same batches); peak RSS from one toolkit-train "
        f"process per arm. Activations: one forward + backward of {tokens} random tokens, batch 1, fp32 LoRA "
        "weights. The estimator's activation term is Korthikanti et al.'s 16-bit formula, with dropout masks "
        "and attention scores that sdpa does not keep: it overstates both arms."
    )
    return Result(
        "Memory levers: activation checkpointing and QLoRA, SmolLM2-135M", command, rows, figures, notes
    )
