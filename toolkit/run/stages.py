"""The stages: train -> export -> [prune] -> [distill] -> quantize -> evaluate -> report; each stage reads
the previous one's artifact from the run dir.

Stages always run in this order; a stage that `stages` does not list is skipped, so any stage can be rerun
alone on an earlier run (`stages=[evaluate] from_run=<dir>`).
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from toolkit.compress.distill import DistillModule, build_student
from toolkit.compress.prune import prune_model
from toolkit.compress.quantize import (
    WEIGHT_FILES,
    check_quantize_config,
    model_card,
    quantize_model,
    save_quantized,
    weights_size_bytes,
)
from toolkit.console import console
from toolkit.errors import ToolkitError, lost_peer
from toolkit.files import atomic_dir, atomic_write_text
from toolkit.layout import METRICS, SAMPLES, SPLIT_RECORD, VARIANT_DIRS, compression_source, saved_variants
from toolkit.models.adapters import is_adapter
from toolkit.models.build import build_model
from toolkit.run.build import (
    build_data_and_task,
    build_module,
    build_task,
    model_kwargs,
    total_training_steps,
)
from toolkit.run.evaluate import LanguageChecks, evaluate_model, latency_ms, model_size_bytes, print_metrics
from toolkit.run.manifest import verify_manifest, write_manifest
from toolkit.run.report import metrics_of, write_report
from toolkit.tasks.base import Task
from toolkit.training.checkpoints import (
    find_checkpoint,
    load_weights,
    resume_checkpoint,
    state_dict_mismatch,
)
from toolkit.training.loggers import print_wandb_sync
from toolkit.training.trainer import build_trainer


def train_stage(cfg: DictConfig, run_dir: Path) -> bool:
    """Fit the model; returns True on the process that runs the later stages (global rank 0)."""
    L.seed_everything(cfg.seed, workers=True)
    data, task = build_data_and_task(cfg)
    data.setup("fit")
    steps = total_training_steps(cfg.trainer, data.batch_size, len(data.splits["train"]))
    module = build_module(cfg, task, data.pad_token_id, steps)
    trainer = build_trainer(cfg, run_dir, f"val/{task.primary_metric}", task.mode)
    if trainer.is_global_zero:
        atomic_write_text(run_dir / SPLIT_RECORD, json.dumps(data.split_fingerprints(), indent=2))
    checkpoint = resume_checkpoint(cfg.resume, run_dir)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint)
    except RuntimeError as err:
        mismatch = checkpoint and state_dict_mismatch(err)
        if mismatch:
            raise ToolkitError(f"resume checkpoint '{checkpoint}' is from another model: {mismatch}") from err
        lost = lost_peer(err)
        if lost:
            raise ToolkitError(
                f"lost contact with another rank ({lost}): its node or process died; the last complete "
                f"checkpoint is kept: rerun with from_run={run_dir} resume=last, on the nodes that are left"
            ) from err
        raise
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise ToolkitError(
            f"disk full while training in {run_dir} ({err}); the last complete checkpoint is kept: free "
            f"space, then rerun with from_run={run_dir} resume=last"
        ) from err
    print_wandb_sync(trainer)
    is_zero = trainer.is_global_zero
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # later stages run on rank 0 alone
    return is_zero


def export_stage(cfg: DictConfig, run_dir: Path) -> None:
    """Checkpoint -> export/adapter (PEFT) and export/model (merged or full model + the data's processor:
    tokenizer, image processor or item vocabulary)."""
    data, task = build_data_and_task(cfg)
    module = build_module(cfg, task, data.pad_token_id, training=False)
    module.configure_model()
    load_weights(module, find_checkpoint(run_dir))
    model, processor = module.model, data.processor  # the processor first: image data reads its labels
    with atomic_dir(run_dir / "export") as tmp:  # export/adapter and export/model
        if is_adapter(model):
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        name_labels(model, getattr(data, "label_names", None))
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        write_manifest(tmp)
    console.print(f"exported: {run_dir / 'export'}")


def name_labels(model: Any, label_names: list[str] | None) -> None:
    """id2label / label2id from the data's label names, so every HF client (`pipeline`, the hub widget)
    shows `positive` instead of `LABEL_1`."""
    if not label_names or getattr(model.config, "num_labels", None) != len(label_names):
        return
    model.config.id2label = {i: str(name) for i, name in enumerate(label_names)}
    model.config.label2id = {str(name): i for i, name in enumerate(label_names)}


def check_split(run_dir: Path, data: Any) -> None:
    """Refuse to evaluate on a test split other than the one the run recorded."""
    record = run_dir / SPLIT_RECORD
    if not record.exists():
        return
    saved = json.loads(record.read_text())["test"]
    current = data.split_fingerprints()["test"]
    if saved != current:
        raise ToolkitError(
            f"test split differs from the one recorded in {record} "
            f"(rows {saved['rows']} vs {current['rows']}, sha256 {saved['sha256']} vs "
            f"{current['sha256']}); evaluate refuses a different test set"
        )


def evaluate_stage(cfg: DictConfig, run_dir: Path) -> dict[str, dict[str, float]]:
    """Every variant in the run on the test split -> evaluate/metrics.json (variant -> metric -> value);
    for causal LMs also lm-eval scores and held-out answers (evaluate/samples.json)."""
    data, task = build_data_and_task(cfg)
    data.setup("test")
    check_split(run_dir, data)
    loader = data.test_dataloader()
    first_batch = next(iter(loader))
    timed = torch.compile if cfg.get("evaluate", {}).get("compile", False) else (lambda model: model)
    checks = LanguageChecks(cfg.get("evaluate") or OmegaConf.create({}), task, data.splits["test"])

    def measure(name: str, model: Any, size_bytes: int) -> None:
        results[name] = {**evaluate_model(model, task, loader), "size_bytes": size_bytes}
        results[name].update(latency_ms(timed(model), first_batch))
        results[name].update(checks.run(name, model))

    results: dict[str, dict[str, float]] = {}
    L.seed_everything(cfg.seed)  # the base model's fresh head: the same init the training run started from
    base = build_model(task.auto_class, **model_kwargs(cfg, data.pad_token_id), **task.model_kwargs())
    if hasattr(task, "reference"):  # preference tuning: rewards of every variant are against the base model
        task.reference = base
    measure("base", base, model_size_bytes(base))
    figures_of = {"base": base}  # the model a task's figures show: the fine-tuned one when there is one
    for name, folder in saved_variants(run_dir).items():
        verify_manifest(folder.parent)  # a truncated or altered weight file is named, not loaded
        model = task.auto_class.from_pretrained(folder)  # one at a time: peak memory of one extra model
        measure(name, model, weights_size_bytes(folder))
        if name == "fine_tuned":
            figures_of = {"fine_tuned": model}
        del model
    results.update(task.baselines(data))
    with atomic_dir(run_dir / "evaluate") as tmp:
        (tmp / Path(METRICS).name).write_text(json.dumps(results, indent=2))
        samples = checks.samples()
        if samples:
            (tmp / Path(SAMPLES).name).write_text(json.dumps(samples, indent=2, ensure_ascii=False))
        if hasattr(task, "save_figures"):  # e.g. the confusion matrix of image classification
            task.save_figures(figures_of, loader, tmp)
    if "report" not in cfg.stages:  # the report stage ends by printing the same table
        print_metrics(results)
    console.print(f"metrics: {run_dir / METRICS}")
    return results


def prune_stage(cfg: DictConfig, run_dir: Path) -> None:
    """export/model -> prune/model: magnitude pruning of the linear layers (see `prune` in train.yaml)."""
    task = build_task(cfg)
    source_name, source = compression_source(run_dir, "pruned")
    model = task.auto_class.from_pretrained(source)
    stats = prune_model(model, cfg.prune.amount, cfg.prune.structured)
    with atomic_dir(run_dir / "prune") as tmp:
        model.save_pretrained(tmp / "model")
        copy_preprocessing_files(source, tmp / "model")
        (tmp / "summary.json").write_text(json.dumps({**stats, "source": str(source)}, indent=2))
        write_manifest(tmp)
    console.print(
        f"pruned the {source_name} model: {stats['sparsity']:.1%} of {stats['layers']} linear layers' "
        f"weights are zero (stored dense: same size on disk): {run_dir / 'prune' / 'model'}"
    )


def distill_stage(cfg: DictConfig, run_dir: Path) -> None:
    """The fine-tuned (or pruned) teacher -> distill/model: a smaller student trained on its logits."""
    d = cfg.distill
    # one process, no experiment logger: a student run inside the parent run, not a run of its own
    cfg = OmegaConf.merge(
        cfg, {"logger": None, "trainer": {"devices": 1, "num_nodes": 1}, "optim": {"lr": d.lr}}
    )
    cfg.strategy = OmegaConf.create({"name": "auto"})
    data, task = build_data_and_task(cfg)
    data.setup("fit")
    teacher_name, teacher_dir = compression_source(run_dir, "distilled")
    L.seed_everything(cfg.seed)
    student = build_student(teacher_dir, task.auto_class, OmegaConf.to_container(d.student, resolve=True))
    module = DistillModule(
        task,
        task.auto_class.from_pretrained(teacher_dir),
        temperature=d.temperature,
        alpha=d.alpha,
        optimizer=instantiate(cfg.optim),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        total_steps=total_training_steps(cfg.trainer, data.batch_size, len(data.splits["train"])),
        prebuilt=student,
    )
    with tempfile.TemporaryDirectory(prefix=".distill-work-", dir=run_dir) as work:
        trainer = build_trainer(cfg, Path(work), f"val/{task.primary_metric}", task.mode)
        trainer.fit(module, datamodule=data)
    with atomic_dir(run_dir / "distill") as tmp:
        module.model.save_pretrained(tmp / "model")
        copy_preprocessing_files(teacher_dir, tmp / "model")
        write_manifest(tmp)
    student_params = sum(p.numel() for p in module.model.parameters())
    teacher_params = sum(p.numel() for p in module._teacher[0].parameters())
    console.print(
        f"distilled the {teacher_name} model ({teacher_params:,} parameters) into a student of "
        f"{student_params:,}: {run_dir / 'distill' / 'model'}"
    )


def quantize_stage(cfg: DictConfig, run_dir: Path) -> None:
    """The last saved variant -> quantize/model (HF-loadable), refused when the validation metric drops
    more than quantize.max_metric_drop."""
    q = cfg.quantize
    if q.quantization_config is None:
        console.print("quantize=none: nothing to quantize")
        return
    device = check_quantize_config(q)
    source_name, source = compression_source(run_dir, "quantized")
    task = build_task(cfg)
    build_config = instantiate(q.quantization_config)
    quantized = quantize_model(source, task.auto_class, build_config, q.include_embeddings, device, q.dtype)
    gate = None
    if q.max_metric_drop is not None:
        data, task = build_data_and_task(cfg)
        data.setup("validate")
        if hasattr(task, "reference"):  # preference metrics measured against the base model
            L.seed_everything(cfg.seed)
            task.reference = build_model(task.auto_class, **model_kwargs(cfg, data.pad_token_id))
        before = task.auto_class.from_pretrained(source)
        gate = metric_gate(before, quantized, task, data.val_dataloader(), q.max_metric_drop, source_name)
        del before
    with atomic_dir(run_dir / "quantize") as tmp:
        save_quantized(quantized, tmp / "model")
        copy_preprocessing_files(source, tmp / "model")
        config = quantized.config.quantization_config
        card = model_card(
            source=source,
            config_name=q.name,
            config=config,
            auto_class=task.auto_class,
            target=run_dir / VARIANT_DIRS["quantized"],
            gate=gate,
        )
        (tmp / "model" / "README.md").write_text(card)
        (tmp / "gate.json").write_text(json.dumps(gate, indent=2))
        write_manifest(tmp)
    size = weights_size_bytes(run_dir / VARIANT_DIRS["quantized"]) / weights_size_bytes(source)
    console.print(
        f"quantized ({q.name}): {run_dir / 'quantize' / 'model'} ({size:.2f}x the size of {source_name})"
    )


def metric_gate(
    before: Any, after: Any, task: Task, loader: Any, max_drop: float, before_name: str
) -> dict[str, Any]:
    """Validation primary metric before and after compression; a ToolkitError when it drops too far.

    The drop is in the metric's own fraction (0.01 = 1 point of accuracy) where higher is better, and
    relative where lower is better (perplexity: 0.01 = 1% higher).
    """
    metric = task.primary_metric
    old = evaluate_model(before, task, loader, stage="val")[metric]
    new = evaluate_model(after, task, loader, stage="val")[metric]
    drop = old - new if task.mode == "max" else (new - old) / old
    gate = {"metric": metric, "source": old, "quantized": new, "drop": drop, "max_metric_drop": max_drop}
    if drop > max_drop:
        raise ToolkitError(
            f"quantize gate: validation {metric} {new:.4f} quantized vs {old:.4f} {before_name} "
            f"(drop {drop:.4f} > quantize.max_metric_drop={max_drop}); quantize/model not written, "
            f"the {before_name} model is kept"
        )
    return gate


def copy_preprocessing_files(source: Path, target: Path) -> None:
    """Tokenizer/processor files of `source` beside the quantized weights: a self-contained folder."""
    for file in source.iterdir():
        weights = file.name.endswith((*WEIGHT_FILES, ".index.json"))
        if file.is_file() and not weights and not (target / file.name).exists() and file.name != "README.md":
            shutil.copy2(file, target / file.name)


def report_stage(cfg: DictConfig, run_dir: Path) -> None:
    """report.md (what ran, training curve, evaluation table, artifacts); ends by printing the table."""
    task = build_task(cfg)
    report = write_report(cfg, run_dir, task.primary_metric, task.auto_class.__name__)
    metrics = metrics_of(run_dir)
    if metrics:
        print_metrics(metrics, title=f"{run_dir} (test split)")
    console.print(f"report: {report}")
