"""Against a real Slurm cluster (slurm/local-cluster.sh up): submit, DDP under srun, a submitit sweep, and
preemption with requeue. Under CI=true a missing cluster fails these tests instead of skipping them."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .helpers import TINY_RUN
from .slurm_jobs import BIN, logs, lr_sweep, require_cluster, submit, wait

pytestmark = pytest.mark.slurm

TINY = TINY_RUN


@pytest.fixture(scope="module", autouse=True)
def cluster():
    require_cluster(nodes=1)


def test_submit_runs_every_stage_under_sbatch(tmp_path):
    job, run_dir = submit([*TINY, "trainer.max_steps=4", "logger=csv"], tmp_path)
    wait(job)
    assert (run_dir / "submit.sbatch").exists() and (run_dir / f"slurm-{job}.out").exists()
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert {"base", "fine_tuned", "majority"} <= set(metrics), logs(run_dir)[-3000:]
    assert (run_dir / "export" / "adapter" / "adapter_config.json").exists()


def test_srun_two_tasks_run_ddp_with_world_size_two(tmp_path):
    job, run_dir = submit(
        [
            *TINY,
            "trainer.max_steps=4",
            "logger=none",
            "strategy=ddp",
            "slurm.tasks_per_node=2",
            "stages=[train]",
        ],
        tmp_path,
    )
    wait(job)
    text = logs(run_dir)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text, text[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and len(ckpt["rng_states"]) == 2


def test_submitit_sweep_of_two_jobs(tmp_path):
    args = [*TINY, "recipe=sweeps/quickstart_lr", "trainer.max_steps=2", "logger=none"]
    lr_sweep(args, tmp_path, timeout=600)


def test_preempted_job_requeues_and_ends_with_the_same_weights(tmp_path):
    """USR1 mid-training: checkpoint at the step boundary, requeue, resume; final weights equal an
    uninterrupted job's, and W&B continues the same run id from the step where it stopped."""
    args = [
        *TINY,
        "trainer.max_steps=300",
        "trainer.max_epochs=100",
        "checkpoint.every_n_train_steps=5",
        "trainer.log_every_n_steps=1",  # the signal may come at step 5: the first job has logged by then
        "logger=wandb",
        "stages=[train]",
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference_job, reference_dir = submit(args, tmp_path / "a")
    job, run_dir = submit(args, tmp_path / "b")
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait(job)
    wait(reference_job)
    hpc = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, logs(run_dir)[-3000:]
    stopped_at = torch.load(hpc[0], weights_only=True)["global_step"]
    assert 0 < stopped_at < 300
    assert "Restored all states from the checkpoint" in logs(run_dir)
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == expected["global_step"] == 300
    diff = max((final["state_dict"][k] - v).abs().max().item() for k, v in expected["state_dict"].items())
    assert diff == 0.0, f"preempted at step {stopped_at}: max |dw| = {diff}"
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, "one W&B run id across jobs"
    steps = [wandb_steps(r) for r in runs]
    assert steps[0] and steps[1] and max(steps[0]) < min(steps[1]) and max(steps[1]) == 299


def wandb_steps(offline_run: Path) -> list[int]:
    out = subprocess.run(
        [str(BIN / "wandb"), "leet", "inspect", "--json", str(offline_run)],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return [int(s) for s in re.findall(r'"trainer/global_step":(\d+)', out)]


def test_sbatch_rejection_is_reported(tmp_path):
    result = subprocess.run(
        [str(BIN / "toolkit-submit"), *TINY, "slurm.partition=nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: sbatch rejected the job: sbatch: error:")
    assert "nope" in result.stderr or "partition" in result.stderr
    assert not [p for p in tmp_path.glob("runs/**/*") if p.is_file()]
