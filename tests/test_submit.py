"""toolkit-submit without a cluster: the rendered sbatch text (golden), dry runs, and its bad-input errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from toolkit.cli import submit
from toolkit.config import compose_config
from toolkit.run import slurm

GOLDEN = Path(__file__).parent / "golden" / "llama3_gpu_2x8.sbatch"
GPU_2X8 = [
    "recipe=nlp/llama3_8b_lora_sft",
    "slurm=gpu",
    "slurm.nodes=2",
    "slurm.account=ml",
    "slurm.qos=high",
    "slurm.setup=[source /opt/venv/bin/activate]",
]


def render(overrides: list[str]) -> str:
    cfg = compose_config(overrides)
    text = slurm.render_sbatch(
        cfg, overrides, Path("/scratch/runs/nlp/llama3_8b_lora_sft/2026-01-01_00-00-00_000000")
    )
    return text.replace(str(Path(sys.executable).with_name("toolkit-train")), "toolkit-train")


def test_multi_node_gpu_script_matches_golden():
    assert render(GPU_2X8) == GOLDEN.read_text()


def run_submit(args: list[str], monkeypatch, tmp_path, capsys) -> tuple[int | None, str, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["toolkit-submit", *args])
    code = None
    try:
        submit.main()
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_prints_the_script_and_creates_nothing(monkeypatch, tmp_path, capsys):
    code, out, _ = run_submit([*GPU_2X8, "--dry-run"], monkeypatch, tmp_path, capsys)
    assert code is None
    assert out.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in out and "srun --kill-on-bad-exit=1" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["slurm=gpu", "slurm.tasks_per_node=16"],
            "slurm.tasks_per_node=16 exceeds slurm.gpus_per_node=8: a GPU job runs one task per GPU",
        ),
        (
            ["slurm.tasks_per_node=2"],
            "slurm.nodes=1 x slurm.tasks_per_node=2 ranks need a multi-process strategy",
        ),
        (["slurm.nodes=0"], "slurm.nodes=0 must be a positive integer"),
        (["slurm=nope"], "Could not find 'slurm/nope'"),
    ],
)
def test_conflicting_or_unknown_slurm_options(args, message, monkeypatch, tmp_path, capsys):
    code, _, err = run_submit(["recipe=quickstart", *args], monkeypatch, tmp_path, capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_no_sbatch_on_path_suggests_dry_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, err = run_submit(["recipe=quickstart"], monkeypatch, tmp_path, capsys)
    assert code == 2
    assert err == (
        "error: sbatch not found on PATH: run toolkit-submit on a Slurm login node, "
        "or add --dry-run to print the script\n"
    )
    assert not [p for p in tmp_path.glob("runs/**/*") if p.is_file()], "a run directory was left behind"
