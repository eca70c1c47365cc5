"""Safe defaults: secrets reach no artifact of a run, private run directories, remote code off by default."""

from __future__ import annotations

import logging
import os
import stat

from transformers import AutoModelForSequenceClassification

from toolkit.models.build import build_model
from toolkit.redaction import redact

from .helpers import TINY_RUN, toolkit_train

SECRETS = {
    "WANDB_API_KEY": "wandb-secret-0123456789",
    "HF_TOKEN": "hf_secretTOKEN9876543210",
    "MY_SERVICE_TOKEN": "svc-secret-55555",
    "DB_PASSWORD": "pw-secret-77777",
}


def test_redact_replaces_secret_values_anywhere(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH_KEY", "ab")  # too short to be a secret: left alone
    config = {"a": f"Bearer {SECRETS['HF_TOKEN']}", "b": [SECRETS["DB_PASSWORD"], 3], "c": "ab"}
    assert redact(config) == {"a": "Bearer ***", "b": ["***", 3], "c": "ab"}


def test_secrets_in_the_environment_reach_no_artifact(tmp_path):
    """A W&B offline run whose config even interpolates a token: no file of the run holds a secret."""
    run_dir = tmp_path / "run"
    env = {**os.environ, **SECRETS, "WANDB_MODE": "offline"}
    done = toolkit_train(
        [
            *TINY_RUN,
            "trainer.max_steps=2",
            "logger=wandb",
            "logger.offline=true",
            "+hub_token=${oc.env:HF_TOKEN}",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.name == "config.yaml" for p in files)
    for path in files:
        content = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    assert SECRETS["HF_TOKEN"] not in done.stdout + done.stderr


def test_private_run_dir_is_readable_by_its_owner_only(tmp_path):
    run_dir = tmp_path / "run"
    done = toolkit_train(
        [
            *TINY_RUN,
            "trainer.max_steps=1",
            "logger=none",
            "private_run_dir=true",
            "stages=[train]",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert stat.S_IMODE(checkpoint.stat().st_mode) & 0o077 == 0


def test_remote_code_is_off_by_default_and_warned_about_when_on(tiny_bert_dir, caplog):
    with caplog.at_level(logging.WARNING):
        build_model(AutoModelForSequenceClassification, str(tiny_bert_dir), num_labels=2)
        assert "trust_remote_code" not in caplog.text
        build_model(
            AutoModelForSequenceClassification, str(tiny_bert_dir), trust_remote_code=True, num_labels=2
        )
    assert "trust_remote_code=true: code shipped with" in caplog.text
