"""Benchmarks at tiny size: they run end to end and publish a well-formed table and figures (no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, results: Path) -> tuple[str, dict[str, float]]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--only", *name.split(), "--results", str(results)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = results.glob("*.md")
    return report.read_text(), json.loads((results / "latest.json").read_text())


def test_strategies_benchmark_publishes_its_table_and_ratios(tmp_path):
    report, figures = run_benchmark("strategies", tmp_path)
    assert "| strategy | median step s |" in report and "| fsdp2 |" in report
    assert figures["strategies.ddp.state_bytes_over_ddp"] == 1.0
    # FSDP2 shards parameters, gradients and AdamW states over the 2 ranks: half of DDP's, plus buffers
    assert 0.45 < figures["strategies.fsdp2.state_bytes_over_ddp"] < 0.6
    assert all(value > 0 for value in figures.values())


def test_performance_benchmarks_publish_their_tables_and_figures(tmp_path):
    report, figures = run_benchmark("overhead packing chat memory data_cache defaults serve", tmp_path)
    headers = (
        "| model | variant |",
        "| arm | rows in epoch |",
        "| packed |",
        "| arm | peak RSS GiB |",
        "| data |",
        "| side |",
        "| arm | requests_per_s |",
    )
    for header in headers:
        assert header in report
    for model in ("minilm", "smollm2_lora"):
        for variant in ("toolkit", "plain", "trainer"):
            assert f"| {model} | {variant} |" in report
    for name in ("minilm", "smollm2_lora"):
        assert figures[f"overhead.{name}.toolkit_over_plain"] > 0
        assert figures[f"overhead.{name}.toolkit_over_trainer"] > 0
    assert figures["startup.seconds_to_first_step"] > 0
    assert 0 < figures["packing.padded_nonpad_fraction"] <= 1 and 0 < figures["packing.nonpad_fraction"] <= 1
    # LoRA keeps no gradients or AdamW states for the frozen base: far fewer tensor bytes than full tuning
    assert figures["memory.lora_tensors_over_full"] < 0.6
    assert (
        0 < figures["chat.packed_nonpad_fraction"] <= 1
        and figures["chat.packed_tokens_per_s_over_padded"] > 0
    )
    assert figures["data_cache.quickstart.cached_over_first"] > 0
    for name in ("throughput_batched_over_sequential", "quantized_over_fine_tuned", "overhead_over_generate"):
        assert figures[f"serve.{name}"] > 0
    assert figures["overhead.minilm.defaults_time_over_trainer"] > 0
    assert -1 <= figures["overhead.minilm.defaults_accuracy_delta"] <= 1


def test_overhead_plain_loop_sees_the_toolkits_batches():
    """toolkit/plain compares equal work only if both draw the same batches (in the benchmark's own process:
    the test suite does not import the benchmarks)."""
    script = (
        "import json; from benchmarks.overhead import compare; "
        "c = compare('minilm', tiny=True, steps=4, reps=1); "
        "print(json.dumps({k: v[0].tokens for k, v in c.items()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = json.loads(done.stdout.strip().splitlines()[-1])
    toolkit, plain, trainer = tokens["toolkit"], tokens["plain"], tokens["trainer"]
    assert len(toolkit) == len(plain) == len(trainer[:4]) == 4
    assert toolkit == plain and all(t > 0 for t in toolkit)


def test_memory_levers_benchmark_publishes_its_table_and_figures(tmp_path):
    report, figures = run_benchmark("levers", tmp_path)
    assert "| arm | peak activations MiB (64 tokens) |" in report and "| qlora + checkpointing |" in report
    assert 0 < figures["memory.qlora_over_lora"] < 1  # the tiny model's embeddings dominate: barely below 1
    assert 0 < figures["memory.activation_checkpointing_over_none"] <= 1.05
    for arm in ("lora", "lora_checkpointing", "qlora", "qlora_checkpointing"):
        assert figures[f"memory.estimate_over_held.{arm}"] == pytest.approx(1, abs=0.1)


def test_local_sgd_benchmark_publishes_bytes_and_quality(tmp_path):
    report, figures = run_benchmark("local_sgd", tmp_path)
    assert "| arm | counted_bytes_per_step |" in report and "| period 4 |" in report
    # 8 steps: DDP all-reduces the gradients at every one; period 4 averages the same bytes of parameters
    # after steps 0 and 4, and once more after the last
    assert figures["local_sgd.period_4.bytes_over_ddp"] == 3 / 8
    assert "local_sgd.period_4.val_loss_delta" in figures
    assert figures["local_sgd.period_4.step_time_over_ddp"] > 0
