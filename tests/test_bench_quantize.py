"""Smoke test of the quantization benchmark: --tiny runs every model and config and publishes its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quantize_benchmark_tiny_publishes_figures(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "quantize", "--tiny", "--results", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "latest.json").read_text())
    for model in ("minilm", "smollm2"):
        for config in ("int8_weight_only", "int8_dynamic", "int8_dynamic_linear_only"):
            for figure in ("size_over_fp32", "latency_over_fp32", "metric_drop"):
                assert f"quantize.{model}.{config}.{figure}" in figures
        # the word embeddings dominate the tiny models: quantizing them is what shrinks the files (the tiny
        # Llama's tied LM head stored a second time made it ~0.55)
        assert figures[f"quantize.{model}.int8_dynamic.size_over_fp32"] < 0.35
        assert figures[f"quantize.{model}.int8_dynamic_linear_only.size_over_fp32"] > 0.9
    report = next(tmp_path.glob("*.md")).read_text()
    assert "## Post-training quantization on CPU (torchao) [tiny]" in report
    assert "| minilm | fp32 |" in report
