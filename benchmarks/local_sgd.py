"""Local SGD against DDP: bytes each rank sends per optimizer step, step time, and validation loss after the
same samples, for averaging periods 1, 4 and 16.

On the two-node local cluster (slurm/local-cluster.sh up --nodes 2; SLURM_CONF set) every arm is a
`toolkit-submit ... slurm.nodes=2` job, one rank per node, and the bytes its node put on the wire
(/proc/net/dev, during training) stand beside the bytes the strategy counted. Without such a cluster the
arms run as two ranks on this machine and only the counted bytes are reported.

The DDP arm is `ddp_local_sgd` whose warm-up lasts the whole run: every step all-reduces the gradients
through the same counted hook. Every arm uses SGD with momentum and no clipping, so period 1 computes
what DDP does (tests/test_local_sgd.py checks it to 1e-6); longer periods trade quality for bytes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.harness import TINY_BERT, Result

PERIODS = (1, 4, 16)
BIN = Path(sys.executable).parent


def overrides(arm: str, steps: int, tiny: bool, out: Path) -> list[str]:
    strategy = (
        ["strategy=ddp_local_sgd", f"strategy.warmup_steps={steps}"]
        if arm == "ddp"
        else ["strategy=ddp_local_sgd", f"strategy.averaging_period={arm.split()[-1]}"]
    )
    return [
        "recipe=quickstart",
        *strategy,
        "optim=sgd",
        "optim.lr=0.05",
        "trainer.gradient_clip_val=null",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",  # one validation, after the same samples in every arm
        "trainer.check_val_every_n_epoch=null",  # counted in steps across epochs
        "trainer.max_epochs=100",
        "scheduler.num_warmup_steps=0",
        "data.batch_size=8",  # per rank
        "data.group_by_length=false",
        f"data.max_eval_examples={64 if tiny else 512}",
        "logger=csv",
        "progress_bar=false",
        "stages=[train]",
        "+callbacks.resources={_target_:toolkit.training.callbacks.ResourceReport,"
        f"path:{out / 'resources'}}}",
        *([TINY_BERT, "data.max_train_examples=64"] if tiny else []),
    ]


def two_nodes_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and len(re.findall(r" (?:idle|mix)$", out.stdout, re.M)) >= 2


def run_on_two_nodes(args: list[str], cwd: Path) -> Path:
    done = subprocess.run([str(BIN / "toolkit-submit"), *args, "slurm.nodes=2", "trainer.devices=1"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"toolkit-submit failed: {done.stderr[-2000:]}")
    job = re.search(r"submitted job (\d+)", done.stdout).group(1)
    run_dir = Path(re.search(r"run dir: (\S+)", done.stdout).group(1))
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        time.sleep(2)
    if not (cwd / "resources" / "rank1.json").exists():
        raise RuntimeError(f"job {job} failed: {(run_dir / f'slurm-{job}.err').read_text()[-2000:]}")
    return run_dir


def run_here(args: list[str], cwd: Path) -> Path:
    run_dir = cwd / "run"
    args = [*args, "trainer.devices=2", f"hydra.run.dir={run_dir}"]
    done = subprocess.run([str(BIN / "toolkit-train"), *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"toolkit-train failed:\n{done.stderr[-3000:]}")
    return run_dir


def measure(run_dir: Path, out: Path, steps: int, wire: bool) -> dict:
    counted = [json.loads((run_dir / f"communication_rank{r}.json").read_text()) for r in (0, 1)]
    resources = [json.loads((out / "resources" / f"rank{r}.json").read_text()) for r in (0, 1)]
    metrics = pd.read_csv(run_dir / "csv" / "version_0" / "metrics.csv")
    row = {
        "counted_bytes_per_step": (counted[0]["gradient_bytes"] + counted[0]["parameter_bytes"]) / steps,
        "communication_steps": len(counted[0]["communication_steps"]),
        "median_step_s": max(r["median_step_seconds"] for r in resources),
        "val_loss": float(metrics["val/loss"].dropna().iloc[-1]),
    }
    if wire:  # each rank alone on its node: its namespace's transmit counter is its own traffic
        row["wire_bytes_per_step"] = sum(r["sent_bytes"] for r in resources) / 2 / steps
    return row


def main(tiny: bool = False) -> Result:
    steps = 8 if tiny else 64
    periods = (4,) if tiny else PERIODS  # tiny checks the harness: one local-SGD arm is enough
    arms = ["ddp", *(f"period {k}" for k in periods)]
    wire = two_nodes_up()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:
            cwd = Path(tmp) / arm.replace(" ", "_")
            cwd.mkdir()
            args = overrides(arm, steps, tiny, cwd)
            run_dir = run_on_two_nodes(args, cwd) if wire else run_here(args, cwd)
            rows[arm] = measure(run_dir, cwd, steps, wire)
    ddp = rows["ddp"]
    figures = {}
    for k in periods:
        row = rows[f"period {k}"]
        name = f"local_sgd.period_{k}"
        figures[f"{name}.bytes_over_ddp"] = row["counted_bytes_per_step"] / ddp["counted_bytes_per_step"]
        figures[f"{name}.val_loss_delta"] = row["val_loss"] - ddp["val_loss"]
        figures[f"{name}.step_time_over_ddp"] = row["median_step_s"] / ddp["median_step_s"]
        if wire:
            figures[f"{name}.wire_bytes_over_ddp"] = row["wire_bytes_per_step"] / ddp["wire_bytes_per_step"]
    where = "2 Slurm nodes (network namespaces on a bridge), 1 rank each" if wire else "2 ranks, 1 machine"
    return Result(
        title="Local SGD: communication and quality against DDP",
        command="python -m benchmarks --only local_sgd",
        table=[{"arm": arm, **row} for arm, row in rows.items()],
        figures=figures,
        notes=(
            f"{where}; quickstart (MiniLM + LoRA), SGD momentum 0.9, lr 0.05, {steps} steps of 8 examples "
            "per rank, validation loss after the last step. counted: bytes the strategy all-reduced per rank "
            "(gradients, or parameters at averages, including one after the last step); wire: bytes the "
            "rank's node sent during training (/proc/net/dev, TCP/IP headers and validation included)."
        ),
    )
