"""Post-training quantization on CPU: size on disk, latency and task metric of each config against fp32.

Models: the quickstart classifier (MiniLM + LoRA, Rotten Tomatoes; metric accuracy) and SmolLM2-135M-Instruct
after a short LoRA SFT (metric: generated-label accuracy; perplexity beside it). Each is trained once through
`toolkit-train ... stages=[train,export]`, then every CPU quantize config is applied to its export exactly as
the quantize stage does, and evaluated on the same test slice. Latency: median of 10 forward passes after a
warm-up, on the first test batch and on its first example alone (evaluate.latency_ms); `+compile` rows run
the same model under `torch.compile` (warmed up per shape first, compile time excluded).

  python -m benchmarks --only quantize [--tiny]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate

from benchmarks import harness
from benchmarks.harness import TINY_BERT, TINY_LLAMA
from toolkit.compress.quantize import quantize_model, save_quantized, weights_size_bytes
from toolkit.config import compose_config
from toolkit.models.build import build_model
from toolkit.run.build import build_data_and_task, model_kwargs
from toolkit.run.evaluate import evaluate_model, latency_ms

CONFIGS = ("int8_weight_only", "int8_dynamic")
MODELS = {
    # name: (overrides for the real run, extra overrides for --tiny, metric the drop is measured on)
    "minilm": (["recipe=quickstart"], [TINY_BERT], "accuracy"),
    "smollm2": (
        ["recipe=nlp/smollm2_lora_sft", "trainer.max_steps=12", "trainer.val_check_interval=12"],
        [TINY_LLAMA, "task.max_new_tokens=3", "data.max_length=48"],
        "gen_accuracy",
    ),
}
# 300 generated answers: one example is 0.33 point, so the 0.5-point goal is within resolution
EVAL = {"minilm": ["data.max_eval_examples=500"], "smollm2": ["data.max_eval_examples=300"]}
TINY_DATA = ["data.max_train_examples=16", "data.max_eval_examples=4"]


def tiny_export(cfg, work: Path) -> Path:
    """--tiny: the tiny model saved untrained, as an export would be (checks the harness, not accuracy)."""
    data, task = build_data_and_task(cfg)
    model = build_model(
        task.auto_class, **model_kwargs(cfg, data.tokenizer.pad_token_id), **task.model_kwargs()
    )
    model.save_pretrained(work / "export")
    data.tokenizer.save_pretrained(work / "export")
    return work / "export"


def train_and_export(overrides: list[str], work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    args = [
        *overrides,
        "stages=[train,export]",
        "logger=none",
        "progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run([sys.executable, "-m", "toolkit", *args], check=True, cwd=work)
    return run_dir / "export" / "model"


def measure(model, task, loader, batch, compile_model: bool, repeats: int, metrics=None) -> dict[str, float]:
    """Task metrics (or the given ones: a compiled row's are its eager model's) and latency."""
    timed = torch.compile(model) if compile_model else model
    metrics = metrics if metrics is not None else evaluate_model(model, task, loader)
    return {**metrics, **latency_ms(timed, batch, repeats=repeats)}


def bench_model(
    name: str, tiny: bool, work: Path, export: Path | None = None, compiled_rows: bool = True
) -> list[dict]:
    """Rows for one model: fp32 and each config; `export` reuses a saved model instead of training one."""
    overrides, tiny_overrides, metric = MODELS[name]
    overrides = [*overrides, *(tiny_overrides + TINY_DATA if tiny else EVAL[name])]
    cfg = compose_config(overrides)
    if export is None:
        export = tiny_export(cfg, work / name) if tiny else train_and_export(overrides, work / name)
    data, task = build_data_and_task(cfg)
    data.setup("test")
    loader = data.test_dataloader()
    batch = next(iter(loader))
    fp32 = task.auto_class.from_pretrained(export).eval()
    repeats = 2 if tiny else 10
    rows = [
        {
            "model": name,
            "config": "fp32",
            "size_bytes": weights_size_bytes(export),
            **measure(fp32, task, loader, batch, False, repeats),
        }
    ]
    variants = [(c, True, False) for c in CONFIGS] + [("int8_dynamic", False, False)]
    if compiled_rows and not tiny:
        variants.append(("int8_dynamic", True, True))
    eager_metrics = {}  # (config, embeddings) -> task metrics: compiling changes the speed, not the weights
    for config, embeddings, compiled in variants:
        q = compose_config([*overrides, f"quantize={config}"]).quantize
        model = quantize_model(
            export, task.auto_class, instantiate(q.quantization_config), embeddings, dtype=q.dtype
        )
        out = work / name / f"{config}-{embeddings}"
        save_quantized(model, out)
        label = config + ("" if embeddings else " (linear only)") + (" +compile" if compiled else "")
        known = eager_metrics.get((config, embeddings))
        row = measure(model, task, loader, batch, compiled, repeats, known)
        eager_metrics[(config, embeddings)] = {k: v for k, v in row.items() if not k.startswith("latency")}
        rows.append({"model": name, "config": label, "size_bytes": weights_size_bytes(out), **row})
    if compiled_rows and not tiny:
        fp32_metrics = {k: v for k, v in rows[0].items() if not k.startswith(("latency", "size"))}
        compiled = measure(fp32, task, loader, batch, True, repeats, fp32_metrics)
        rows.append({**rows[0], **compiled, "config": "fp32 +compile"})
    return [_relative(row, rows[0], metric) for row in rows]


def _relative(row: dict, fp32: dict, metric: str) -> dict:
    row = dict(row)
    row["size_over_fp32"] = row["size_bytes"] / fp32["size_bytes"]
    row["latency_over_fp32"] = row["latency_ms"] / fp32["latency_ms"]
    row["single_over_fp32"] = row["latency_ms_single"] / fp32["latency_ms_single"]
    row["metric"] = metric
    row["metric_drop"] = 100 * (fp32[metric] - row[metric])  # points
    return row


def main(tiny: bool = False) -> harness.Result:
    os.environ.setdefault("WANDB_MODE", "offline")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        for name in MODELS:
            rows += bench_model(name, tiny, Path(tmp))
    return result(rows, tiny)


def result(rows: list[dict], tiny: bool, extra_notes: str = "") -> harness.Result:
    """The harness result for benchmark rows: the table and the quantize.<model>.<config>.* figures."""
    columns = ["model", "config", "size_bytes", "size_over_fp32", "latency_ms", "latency_over_fp32"]
    columns += ["latency_ms_single", "single_over_fp32", "metric", "metric_drop", "accuracy", "gen_accuracy"]
    columns += ["perplexity"]
    table = [{c: row.get(c, "-") for c in columns} for row in rows]
    figures = {}
    for row in rows:
        if row["config"].startswith("fp32"):
            continue
        config = row["config"].replace(" (linear only)", "_linear_only").replace(" +compile", "_compiled")
        key = f"quantize.{row['model']}.{config}"
        figures[f"{key}.size_over_fp32"] = row["size_over_fp32"]
        figures[f"{key}.latency_over_fp32"] = row["latency_over_fp32"]
        figures[f"{key}.metric_drop"] = row["metric_drop"]
    notes = (
        "Goals (int8): size <= 0.30x fp32 with embeddings, batch latency <= 0.6x fp32, metric drop <= 0.5 "
        "point. metric_drop is in points of `metric` (accuracy for MiniLM, generated-label accuracy for "
        f"SmolLM2). Threads: {torch.get_num_threads()}. The machine is shared: latencies are noisy. "
        + extra_notes
    )
    return harness.Result(
        title="Post-training quantization on CPU (torchao)" + (" [tiny]" if tiny else ""),
        command="python -m benchmarks --only quantize" + (" --tiny" if tiny else ""),
        table=table,
        figures=figures,
        notes=notes,
    )


if __name__ == "__main__":
    print(harness.markdown_table(main(tiny="--tiny" in sys.argv).table))
