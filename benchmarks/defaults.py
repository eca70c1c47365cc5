"""Each side at its recommended defaults: `toolkit-train recipe=quickstart` against `transformers.Trainer`.

Same data (the quickstart's tokenized Rotten Tomatoes split), model (MiniLM + LoRA r16 on query/key/value/
dense), hyperparameters (batch 32, AdamW lr 1e-3, cosine with 20 warmup steps, clip 1.0) and epochs (1).
What differs is what each recommends for batching: the toolkit pads each batch to its longest example and
groups similar lengths (`data.group_by_length=true`); the Trainer's documented choice for tokenized text is
`DataCollatorWithPadding` (padding to the longest per batch) over randomly shuffled examples. Training time is
the first step's start to the last step's end; accuracy is on the same test split with the same metric.
Seed-to-seed spread of one LoRA epoch is about a point, so each side runs with several seeds (alternating
sides) and the figures compare their means. For a seed both sides use the same split and start from the same
weights (checked: all 76 trainable tensors equal), so per-seed deltas are paired.

    python -m benchmarks --only defaults
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed

from benchmarks.harness import TINY_BERT, Result
from benchmarks.overhead import hf_model, job_config
from toolkit.run.evaluate import evaluate_model
from toolkit.run.pipeline import run_pipeline

QUICKSTART = ["recipe=quickstart", "logger=csv", "trainer.accelerator=cpu", "stages=[train,export,evaluate]"]
# The design's figure is for the full epoch (None); a slow machine may time a prefix, the same for both.
MAX_TRAIN_EXAMPLES: int | None = None
SEEDS = (42, 43, 44, 45, 46)
TINY = [TINY_BERT, "data.max_train_examples=128", "data.max_eval_examples=64", "data.max_length=16"]


class _Span(TrainerCallback):
    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.first = self.first or time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last = time.perf_counter()


def run_toolkit(overrides: list[str], workdir: Path) -> tuple[float, float]:
    """(training seconds, test accuracy) of the quickstart as `toolkit-train` runs it."""
    clock = workdir / "clock.json"
    cfg = job_config(
        [*overrides, f"+callbacks.clock={{_target_:toolkit.training.callbacks.StepClock,path:{clock}}}"]
    )
    run_pipeline(cfg, workdir / "run")
    timing = json.loads(clock.read_text())
    seconds = timing["ends"][-1] - timing["first_start_perf"]
    metrics = json.loads((workdir / "run" / "evaluate" / "metrics.json").read_text())
    return seconds, metrics["fine_tuned"]["accuracy"]


def run_trainer(overrides: list[str], workdir: Path) -> tuple[float, float]:
    cfg = job_config(overrides)
    data, task = instantiate(cfg.data), instantiate(cfg.task)
    data.setup("fit")
    span = _Span()
    args = TrainingArguments(
        output_dir=str(workdir / "hf"),
        per_device_train_batch_size=data.batch_size,
        num_train_epochs=cfg.trainer.max_epochs,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.scheduler.num_warmup_steps,
        max_grad_norm=cfg.trainer.gradient_clip_val,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=cfg.seed,
    )
    # seeded before the model is built, as transformers' examples do: the Trainer seeds only at its own init,
    # after the LoRA and classifier weights exist; this way both sides start from identical weights
    set_seed(cfg.seed)
    model = hf_model(cfg, task, data.tokenizer.pad_token_id)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.splits["train"],
        data_collator=DataCollatorWithPadding(data.tokenizer),
        callbacks=[span],
    )
    trainer.train()
    accuracy = evaluate_model(model, task, data.test_dataloader())["accuracy"]
    return span.last - span.first, accuracy


def main(tiny: bool = False) -> Result:
    limit = [f"data.max_train_examples={MAX_TRAIN_EXAMPLES}"] if MAX_TRAIN_EXAMPLES and not tiny else []
    overrides = [*QUICKSTART, *limit, *(TINY if tiny else [])]
    runs: dict[str, list[tuple[float, float]]] = {"toolkit": [], "trainer": []}
    for seed in SEEDS[:1] if tiny else SEEDS:
        seeded = [*overrides, f"seed={seed}"]
        with tempfile.TemporaryDirectory() as tmp:
            runs["toolkit"].append(run_toolkit(seeded, Path(tmp) / "toolkit"))
            runs["trainer"].append(run_trainer(seeded, Path(tmp) / "trainer"))
    means = {side: [statistics.fmean(values) for values in zip(*r, strict=True)] for side, r in runs.items()}
    figures = {
        "overhead.minilm.defaults_time_over_trainer": means["toolkit"][0] / means["trainer"][0],
        "overhead.minilm.defaults_accuracy_delta": means["toolkit"][1] - means["trainer"][1],
    }
    rows = [
        {
            "side": side,
            "seed": seed,
            "train s": seconds,
            "test accuracy": accuracy,
            "time / trainer": seconds / means["trainer"][0],
        }
        for side in runs
        for seed, (seconds, accuracy) in [*zip(SEEDS, runs[side], strict=False), ("mean", means[side])]
    ]
    command = (
        f"toolkit-train {' '.join(overrides)} seed=S | transformers.Trainer(DataCollatorWithPadding), same"
    )
    notes = (
        f"One epoch per run, seeds {', '.join(map(str, SEEDS[: len(runs['toolkit'])]))} for each side, sides "
        "alternating; figures compare the means. Accuracy delta = toolkit - Trainer (a point is 0.01)."
    )
    return Result(
        "Defaults: toolkit-train recipe=quickstart vs transformers.Trainer", command, rows, figures, notes
    )
