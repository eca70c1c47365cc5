"""strategy=ddp_local_sgd on 2 CPU ranks: period 1 is DDP, period k communicates every k-th step (counted
by its comm hook and averager), the outer step is torch's Nesterov SGD, and a killed run resumes exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from toolkit.training.checkpoints import existing_checkpoint, read_state_dict
from toolkit.training.local_sgd import OuterAverager, rank_file

from .helpers import COMMON, kill_after_a_checkpoint, toolkit_train, train

RANKS = ["trainer.devices=2", "data.batch_size=8"]
# plain SGD without clipping: averaging parameters after each step is then averaging gradients
LINEAR = ["optim=sgd", "optim.lr=0.05", "trainer.gradient_clip_val=null"]


def local_sgd(period: int, warmup: int = 0) -> list[str]:
    return [
        "strategy=ddp_local_sgd",
        f"strategy.averaging_period={period}",
        f"strategy.warmup_steps={warmup}",
    ]


def fresh(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name / "run"


def communication(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / f"communication_rank{rank}.json").read_text())


def test_period_one_equals_ddp(tmp_path, base_dir):
    ddp = train(fresh(tmp_path, "ddp"), base_dir, "strategy=ddp", *RANKS, *LINEAR)
    run_dir = fresh(tmp_path, "local")
    averaged = train(run_dir, base_dir, *local_sgd(1), *RANKS, *LINEAR)
    torch.testing.assert_close(averaged, ddp, rtol=0, atol=1e-6)
    expected = read_state_dict(tmp_path / "ddp" / "run" / "checkpoints" / "last.ckpt")
    got = read_state_dict(run_dir / "checkpoints" / "last.ckpt")
    assert max((got[k] - v).abs().max().item() for k, v in expected.items()) < 1e-6
    report = communication(run_dir, 0)
    assert report["gradient_bytes"] == 0 and report["communication_steps"] == [0, 1, 2]


def test_period_four_after_warmup_communicates_every_fourth_step_and_refuses_another_world_size(
    tmp_path, base_dir
):
    run_dir = fresh(tmp_path, "local")
    steps = ["trainer.max_steps=8", "trainer.max_epochs=10"]
    train(run_dir, base_dir, *local_sgd(4, warmup=2), *RANKS, *steps)
    reports = [communication(run_dir, rank) for rank in (0, 1)]
    assert reports[0] == reports[1]
    # gradients all-reduced at warm-up steps 0, 1; parameters averaged at 2 and 6, and after the last step
    assert reports[0]["communication_steps"] == [0, 1, 2, 6, 7]
    assert reports[0]["optimizer_steps"] == 8
    # two gradient all-reduces of the trainable weights against three averages of them
    assert reports[0]["parameter_bytes"] == 1.5 * reports[0]["gradient_bytes"] > 0
    last = run_dir / "checkpoints" / "last.ckpt"
    ranks = [torch.load(rank_file(last, r, 8), weights_only=True)["state_dict"] for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), "ranks end with different models"

    # each rank's weights are its own: resuming on one rank cannot continue the same training
    args = [*COMMON, f"model.name_or_path={base_dir}", *local_sgd(4, warmup=2), "trainer.devices=1"]
    result = toolkit_train([*args, "trainer.max_steps=10", f"from_run={run_dir}", "resume=last"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {last} is a local-SGD checkpoint of 2 ranks, each with its own weights; resume it on 2 "
        "ranks (trainer.num_nodes x trainer.devices), not 1"
    )
    assert torch.load(last, weights_only=True)["global_step"] == 8, (
        "the refused resume changed the checkpoint"
    )


def outer_steps(rank: int, world: int, store_dir: str, queue) -> None:
    """Three rounds of local drift + OuterAverager on `world` gloo ranks; rank 0 reports the parameters."""
    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.zeros_like(p)  # torch averages only parameters with a gradient
    averager = OuterAverager(period=1, warmup_steps=0, outer_lr=0.7, outer_momentum=0.9)
    drifts = []
    for step in range(3):
        averager.keep_anchor(params)
        drift = [
            torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + rank)) for p in params
        ]
        drifts.append(drift)
        for p, d in zip(params, drift, strict=True):
            p.data.add_(d)  # each rank's local steps moved it somewhere else
        averager.average_parameters(params)
    if rank == 0:
        queue.put([p.detach().tolist() for p in params])  # plain lists: no shared memory outliving the child
    dist.destroy_process_group()


def test_outer_step_is_torch_sgd_with_nesterov_on_the_averaged_change(tmp_path):
    """DiLoCo's outer optimizer: SGD(lr, momentum, nesterov) whose gradient is anchor - average."""
    world = 2
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(outer_steps, args=(world, str(tmp_path), queue), nprocs=world, start_method="spawn")
    got = [torch.tensor(values) for values in queue.get()]

    torch.manual_seed(0)
    anchor = [torch.randn(5, 3).requires_grad_(), torch.randn(7).requires_grad_()]
    reference = torch.optim.SGD(anchor, lr=0.7, momentum=0.9, nesterov=True)
    for step in range(3):
        drifts = [
            [torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + r)) for p in anchor]
            for r in range(world)
        ]
        for i, p in enumerate(anchor):
            average = p.detach() + sum(d[i] for d in drifts) / world
            p.grad = p.detach() - average
        reference.step()
    for expected, actual in zip(anchor, got, strict=True):
        torch.testing.assert_close(actual, expected.detach(), rtol=1e-6, atol=1e-6)


KILL = [
    *local_sgd(4, warmup=2),
    *RANKS,
    "trainer.max_steps=40",
    "trainer.max_epochs=10",
    "checkpoint.every_n_train_steps=1",
    "stages=[train]",
]


@pytest.mark.faults
@pytest.mark.slow  # ~90 s; the strategies' kill tests cover the shared machinery by default
def test_kill_and_resume_ends_with_the_same_weights(tmp_path, tiny_bert_dir):
    """Dropout on, each rank with its own weights and Adam states between averages: SIGKILL at a random
    moment after a checkpoint, resume; every rank's final weights equal an uninterrupted run's."""
    straight = fresh(tmp_path, "straight")
    train(straight, tiny_bert_dir, *KILL)
    killed = fresh(tmp_path, "killed")
    stopped_at = kill_after_a_checkpoint(killed, tiny_bert_dir, *KILL)
    assert stopped_at < 40, "the run finished before it could be killed"
    train(killed, tiny_bert_dir, *KILL, f"from_run={killed}", "resume=last")
    last = existing_checkpoint(killed / "checkpoints" / "last.ckpt")
    for rank in (0, 1):
        expected = torch.load(rank_file(straight / "checkpoints" / "last.ckpt", rank, 40), weights_only=True)
        resumed = torch.load(rank_file(last, rank, 40), weights_only=True)
        for key, value in expected["state_dict"].items():
            diff = (resumed["state_dict"][key] - value).abs().max().item()
            assert diff == 0.0, f"rank {rank}, killed after step {stopped_at}: {key} differs by {diff}"
    assert sorted(p.name for p in (killed / "checkpoints" / "local_sgd").glob("last.ckpt.*")) == [
        "last.ckpt.rank0.step40",
        "last.ckpt.rank1.step40",
    ], "older rank states are removed once a newer checkpoint is whole"
