"""Jobs on the local Slurm cluster (slurm/local-cluster.sh): submit with toolkit-submit, wait, read logs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def require_cluster(nodes: int) -> None:
    """Skip (fail under CI=true) unless a Slurm cluster with at least `nodes` nodes up answers."""
    os.environ.setdefault("SLURM_CONF", "/tmp/toolkit-slurm/slurm.conf")
    try:
        up = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
        ready = {line.split()[0] for line in up.stdout.splitlines() if re.search(r" (idle|mix|alloc)$", line)}
        ok = up.returncode == 0 and len(ready) >= nodes
    except (FileNotFoundError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        message = f"no Slurm cluster with {nodes} node(s) up: run slurm/local-cluster.sh up --nodes {nodes}"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)


def submit(args: list[str], cwd: Path) -> tuple[str, Path]:
    result = subprocess.run(
        [str(BIN / "toolkit-submit"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    run_dir = Path(re.search(r"run dir: (\S+)", result.stdout).group(1))
    return job, run_dir


def queued(job: str) -> str:
    """The job's state and reason ('' once it left the queue)."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout
    return out.strip()


def wait(job: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while (state := queued(job)) and time.time() < deadline:
        if "BeginTime" in state:  # Slurm delays a requeued job's start; release it now
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    assert not queued(job), f"job {job} still queued after {timeout} s"


def logs(run_dir: Path) -> str:
    """What the job printed (slurm-<job>.out/.err) and what every rank logged to the run's train.log
    (Lightning's info lines, such as the rank table and the restore message, go there only)."""
    files = [*sorted(run_dir.glob("slurm-*.*")), run_dir / "train.log"]
    return "".join(p.read_text(errors="replace") for p in files if p.exists())


def lr_sweep(args: list[str], cwd: Path, timeout: float) -> Path:
    """`toolkit-train -m <args> optim.lr=1e-3,3e-3` through the submitit launcher: both jobs evaluated and
    listed in summary.md; returns the sweep directory."""
    result = subprocess.run(
        [str(BIN / "toolkit-train"), "-m", *args, "optim.lr=1e-3,3e-3"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((cwd / "runs" / "multirun").iterdir())
    for job in ("0", "1"):
        assert (sweep / job / "evaluate" / "metrics.json").exists()
    summary = (sweep / "summary.md").read_text()
    assert "| 0 | `optim.lr=0.001` |" in summary and "| 1 | `optim.lr=0.003` |" in summary
    return sweep
