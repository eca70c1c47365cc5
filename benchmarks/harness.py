"""Shared plumbing for benchmarks: machine description, medians, and publishing results.

Each benchmark module has `main(tiny: bool) -> Result`; `python -m benchmarks` runs them all and
`publish` appends each table to `benchmarks/results/<date>.md` and merges its figures into
`benchmarks/results/latest.json` (a flat {"figure.name": number} map compared across commits).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from toolkit.training import callbacks

RESULTS = Path(__file__).resolve().parent / "results"
# Tiny models built from config (real tokenizers): --tiny benchmark runs and the test suite
TINY_BERT = (
    "model.config={model_type:bert,hidden_size:32,num_hidden_layers:2,num_attention_heads:2,"
    "intermediate_size:64,vocab_size:30522,max_position_embeddings:128}"
)
TINY_LLAMA = (
    "model.config={model_type:llama,hidden_size:32,num_hidden_layers:2,num_attention_heads:4,"
    "num_key_value_heads:2,intermediate_size:64,vocab_size:49152,max_position_embeddings:256,"
    "tie_word_embeddings:true}"
)


def save_tiny_llama(path: Path, override: str = TINY_LLAMA) -> Path:
    """A seeded Llama built from `override` (`model.config={...}`), saved with SmolLM2's tokenizer like a
    pretrained checkpoint: what the paths that load pretrained weights (serving, QLoRA) need at tiny size."""
    import torch
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from toolkit.data.assets import asset_path

    values = dict(OverridesParser.create().parse_override(override).value())
    torch.manual_seed(0)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(asset_path("smollm2_135m_instruct")).save_pretrained(path)
    return path


VERSIONED = ("torch", "lightning", "deepspeed", "transformers", "peft", "torchao")


@dataclass
class Result:
    title: str
    command: str
    table: list[dict]  # rows of {column: value}, first row's keys are the header
    figures: dict[str, float] = field(default_factory=dict)
    notes: str = ""


def machine() -> str:
    versions = ", ".join(f"{name} {version(name)}" for name in VERSIONED)
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}; {versions}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM, which exec does not inherit)."""
    return callbacks.peak_rss_bytes()


def markdown_table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[key]) for key in header) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def publish(result: Result, results_dir: Path = RESULTS) -> Path:
    """Append the table to today's report and merge the figures into latest.json; returns the report."""
    results_dir.mkdir(parents=True, exist_ok=True)
    report = results_dir / f"{dt.date.today().isoformat()}.md"
    section = [
        f"## {result.title}",
        "",
        f"- machine: {machine()}",
        f"- command: `{result.command}`",
        f"- at: {dt.datetime.now().isoformat(timespec='seconds')}",
        "",
        markdown_table(result.table),
        "",
    ]
    if result.notes:
        section += [result.notes, ""]
    with report.open("a") as f:
        f.write("\n".join(section) + "\n")
    latest = results_dir / "latest.json"
    figures = json.loads(latest.read_text()) if latest.exists() else {}
    figures.update({name: float(value) for name, value in result.figures.items()})
    tmp = latest.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(figures.items())), indent=2) + "\n")
    tmp.replace(latest)
    return report


def train_with_resources(overrides: list[str], out: Path) -> list[dict]:
    """`toolkit-train <overrides>` into `out/run` with a ResourceReport attached; each rank's report."""
    args = [
        *overrides,
        f"hydra.run.dir={out / 'run'}",
        "+callbacks.resources={_target_:toolkit.training.callbacks.ResourceReport,"
        f"path:{out / 'resources'}}}",
    ]
    train = Path(sys.executable).with_name("toolkit-train")
    done = subprocess.run([str(train), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"toolkit-train {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted((out / "resources").glob("rank*.json"))]
