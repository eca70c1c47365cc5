"""After a multirun (`toolkit-train -m ...`): one table of every job's run directory and test metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from toolkit.console import console
from toolkit.files import atomic_write_text
from toolkit.layout import METRICS


def summarize(sweep_dir: Path) -> str:
    """Markdown table: job number, the overrides that vary between jobs, and the fine-tuned test metrics."""
    rows, metric_names = [], []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        metrics_file = job_dir / METRICS
        metrics = json.loads(metrics_file.read_text()).get("fine_tuned", {}) if metrics_file.exists() else {}
        metric_names += [m for m in metrics if m not in metric_names]
        rows.append((job_dir.name, overrides, metrics))
    lines = [
        "| job | swept | " + " | ".join(metric_names) + " | run dir |",
        "|---|---|" + "---|" * len(metric_names) + "---|",
    ]
    shared = set.intersection(*(set(o) for _, o, _ in rows)) if rows else set()
    for job, overrides, metrics in rows:
        varying = " ".join(o for o in overrides if o not in shared)
        values = [f"{metrics[m]:.4g}" if m in metrics else "-" for m in metric_names]
        lines.append(f"| {job} | `{varying}` | " + " | ".join(values) + f" | {sweep_dir / job} |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback: writes <sweep dir>/summary.md when a multirun ends and prints it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = summarize(sweep_dir)
        atomic_write_text(sweep_dir / "summary.md", f"# Sweep {sweep_dir}\n\n{table}")
        console.print(f"sweep summary: {sweep_dir / 'summary.md'}\n{table}")
