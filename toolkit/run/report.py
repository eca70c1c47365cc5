"""report.md for a run directory: what ran, the training curve, the evaluation table, every artifact with the
one line that loads it."""

from __future__ import annotations

import csv
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from toolkit.data.preference import CONSTRUCTIONS
from toolkit.files import atomic_write_text
from toolkit.layout import ADAPTER, CHECKPOINTS, METRICS, REPORT, SAMPLES, STAGE_FOLDERS, VARIANT_DIRS
from toolkit.models.adapters import adapter_settings, quantization_settings
from toolkit.redaction import redact
from toolkit.run.evaluate import format_value

VERSIONED = ("torch", "lightning", "transformers", "peft", "torchao", "deepspeed", "datasets")


CURVE = "training_curve.png"


def versions() -> str:
    found = []
    for name in VERSIONED:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return f"python {platform.python_version()}, " + ", ".join(found)


def read_csv_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the run's CSV log (Lightning CSVLogger under csv/version_*), the newest version."""
    files = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def plot_training_curve(rows: list[dict[str, str]], primary: str, target: Path) -> bool:
    """train/loss per step, with the validation loss and primary metric; False when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in points], [p[1] for p in points]

    steps, loss = series("train/loss")
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, label="train/loss", linewidth=1)
    val_steps, val_loss = series("val/loss")
    if val_steps:
        ax.plot(val_steps, val_loss, "o-", label="val/loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    metric_steps, metric = series(f"val/{primary}")
    if metric_steps:
        other = ax.twinx()
        other.plot(metric_steps, metric, "s--", color="tab:green", label=f"val/{primary}")
        other.set_ylabel(primary)
        other.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    tmp = target.with_name(f".{target.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(target)
    return True


def metrics_markdown(metrics: dict[str, dict[str, float]]) -> str:
    """One row per metric, one column per variant (as the console table)."""
    variants = list(metrics)
    names = list(dict.fromkeys(k for values in metrics.values() for k in values))
    lines = ["| metric | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for name in names:
        cells = [format_value(metrics[v].get(name)) for v in variants]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples_markdown(path: Path, tail: int = 400) -> list[str]:
    """Held-out prompts with each variant's answer (evaluate.samples); a long prompt shows its end, where
    the turn being answered is."""
    if not path.exists():
        return []
    lines = ["", "## Held-out prompts", ""]
    for i, sample in enumerate(json.loads(path.read_text()), 1):
        prompt = sample["prompt"]
        prompt = prompt if len(prompt) <= tail else "..." + prompt[-tail:]
        lines += [f"### Prompt {i}", "", "~~~text", prompt.strip(), "~~~", ""]  # ShareGPT holds ``` fences
        lines += ["| | answer |", "|---|---|", f"| reference | {table_cell(sample['reference'])} |"]
        lines += [f"| {variant} | {table_cell(text)} |" for variant, text in sample["answers"].items()]
        lines.append("")
    return lines


def table_cell(text: str) -> str:
    """Text in one markdown table cell: pipes escaped, line breaks as <br>."""
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def artifacts(run_dir: Path, auto_class: str) -> list[tuple[str, Path, str]]:
    """(what, path, one-line load command) for each artifact present in the run directory."""
    imports = f"{registering_import(run_dir)}from transformers import {auto_class}"
    load = f"{imports}; m = {auto_class}.from_pretrained"
    peft_class = auto_class.replace("AutoModel", "AutoPeftModel")
    candidates = [
        ("best checkpoint", run_dir / CHECKPOINTS / "best.ckpt", "toolkit-train ... resume={p}"),
        ("last checkpoint", run_dir / CHECKPOINTS / "last.ckpt", "toolkit-train ... resume={p}"),
        (
            "LoRA adapter",
            run_dir / ADAPTER,
            f"from peft import {peft_class}; m = {peft_class}.from_pretrained('{{p}}')",
        ),
        ("fine-tuned model", run_dir / VARIANT_DIRS["fine_tuned"], load + "('{p}')"),
        ("pruned model", run_dir / VARIANT_DIRS["pruned"], load + "('{p}')"),
        ("distilled model", run_dir / VARIANT_DIRS["distilled"], load + "('{p}')"),
        ("quantized model", run_dir / VARIANT_DIRS["quantized"], load + "('{p}')"),
        ("metrics", run_dir / METRICS, "import json; json.load(open('{p}'))"),
        ("held-out answers", run_dir / SAMPLES, "import json; json.load(open('{p}'))"),
        ("training curve", run_dir / CURVE, "open {p}"),
        ("data split record", run_dir / "data_split.json", "import json; json.load(open('{p}'))"),
    ]
    named = [(what, path, cmd.format(p=path)) for what, path, cmd in candidates if path.exists()]
    return named + other_files(run_dir, {path for _, path, _ in named})


def registering_import(run_dir: Path) -> str:
    """`import <module>; ` when the run's model type is one the toolkit registers with transformers (the
    seed MLP, SASRec, BERT4Rec): without it `from_pretrained` does not know the type. Found from the config
    class itself, which this process has registered while building the task."""
    saved = [
        run_dir / folder for folder in VARIANT_DIRS.values() if (run_dir / folder / "config.json").exists()
    ]
    if not saved:
        return ""
    module = type(AutoConfig.from_pretrained(saved[0])).__module__
    return f"import {module}; " if module.startswith("toolkit.") else ""


def other_files(run_dir: Path, listed: set[Path]) -> list[tuple[str, Path, str]]:
    """Every other file the stages wrote (gate, pruning summary, confusion matrix, manifests, ...)."""
    found = []
    for folder in STAGE_FOLDERS:
        for path in sorted((run_dir / folder).glob("*")):
            if path in listed or not path.is_file():
                continue
            command = "import json; json.load(open('{p}'))" if path.suffix == ".json" else "open {p}"
            found.append((str(path.relative_to(run_dir)), path, command.format(p=path)))
    return found


def compression_notes(metrics: dict[str, dict[str, float]]) -> list[str]:
    """Honest remarks where a compression step did not buy what its name suggests."""
    notes = []
    tuned, pruned = metrics.get("fine_tuned"), metrics.get("pruned")
    if tuned and pruned and pruned["size_bytes"] >= 0.95 * tuned["size_bytes"]:
        notes.append(
            "Pruning zeroed weights in place: the pruned model is stored dense, so its size on disk is "
            f"{pruned['size_bytes'] / tuned['size_bytes']:.2f}x the fine-tuned one and its latency is not "
            "lower either (no sparse kernels on this path); only structural pruning (removing heads or "
            "neurons) shrinks both."
        )
    quantized = metrics.get("quantized")
    if tuned and quantized and quantized["latency_ms_single"] > tuned["latency_ms_single"]:
        notes.append(
            "The quantized model is slower than fp32 on a single example here: torchao's int8 paths pay "
            "per-call quantization overhead in eager mode (torch.compile removes most of it)."
        )
    return notes


def recipe_of(run_dir: Path, overrides: list[str]) -> str:
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.exists():
        choice = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices.recipe")
        if choice:
            return str(choice)
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), "quickstart (default)")


def adapter_summary(adapter: Any) -> str:
    settings, quantization = adapter_settings(adapter), quantization_settings(adapter)
    if not settings:
        return "none (full fine-tuning)"
    kind = "DoRA" if settings.get("use_dora") else "LoRA"
    if quantization:
        kind = f"Q{kind} ({quantization.get('bnb_4bit_quant_type', 'nf4').upper()} base)"
    return f"{kind} r={settings.get('r')}, alpha={settings.get('lora_alpha')}"


def data_summary(data: Any) -> str:
    """Where the data came from, its format, and for preference data how its pairs were made."""
    sources = [str(source.get("path")) for source in data.get("sources") or []]
    where = ", ".join(f"`{p}`" for p in sources) if sources else f"`{data.get('path')}`"
    line = f"{where}, format `{data.format}`" if data.get("format") else where
    construction = CONSTRUCTIONS.get(data.get("format"))  # preference formats: how the pairs were made
    return f"{line} ({construction})" if construction else line


def write_report(cfg: DictConfig, run_dir: Path, primary_metric: str, auto_class: str) -> Path:
    """report.md in the run directory (and training_curve.png when the run has a CSV log)."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    recipe = recipe_of(run_dir, overrides)
    strategy = cfg.strategy.get("_target_") or cfg.strategy.get("name", "auto")
    t = cfg.trainer
    lines = [
        f"# Run report: {recipe}",
        "",
        f"- run directory: `{run_dir}`",
        f"- recipe: `{recipe}`; overrides: `{' '.join(overrides) or '(none)'}`",
        f"- stages: {', '.join(cfg.stages)}",
        f"- data: {data_summary(cfg.data)}",
        f"- model: `{cfg.model.name_or_path or 'from config'}`; adapter: {adapter_summary(cfg.adapter)}",
        f"- strategy: `{strategy}`; devices: accelerator={t.accelerator}, devices={t.devices}, "
        f"num_nodes={t.num_nodes}, precision={t.get('precision', '32')}",
        f"- quantize: `{cfg.quantize.name}`" if cfg.get("quantize") else "- quantize: not configured",
        f"- versions: {versions()}",
        "",
        "## Training curve",
        "",
    ]
    if plot_training_curve(read_csv_metrics(run_dir), primary_metric, run_dir / CURVE):
        lines.append(f"![training curve]({CURVE})")
    else:
        lines.append("No training metrics in a CSV log here (logger=none, or the train stage did not run).")
    lines += ["", "## Evaluation (test split)", ""]
    metrics_file = run_dir / METRICS
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    lines.append(metrics_markdown(metrics) if metrics else "The evaluate stage has not run.")
    lines += [""] + [f"- {note}" for note in compression_notes(metrics)]
    lines += samples_markdown(run_dir / SAMPLES)
    lines += ["", "## Artifacts", "", "| artifact | path | load |", "|---|---|---|"]
    for what, path, command in artifacts(run_dir, auto_class):
        lines.append(f"| {what} | `{path}` | `{command}` |")
    report = run_dir / REPORT
    atomic_write_text(report, redact("\n".join(lines) + "\n"))  # overrides may carry a token
    return report


def metrics_of(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS
    return json.loads(path.read_text()) if path.exists() else {}
