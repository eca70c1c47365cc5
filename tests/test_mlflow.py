"""logger=mlflow: a tiny run read back with MLflow's own client, secrets redacted, one MLflow run per run
directory (a resume continues it), and a later run in the same process logs into its own store."""

from __future__ import annotations

import csv
import os

import mlflow
from mlflow.tracking import MlflowClient

from toolkit.training.loggers import build_logger

from .helpers import TINY_RUN, compose_config, toolkit_train

SECRETS = {"HF_TOKEN": "hf_secretTOKEN9876543210", "MY_SERVICE_TOKEN": "svc-secret-55555"}
STEPS = 3


def test_mlflow_run_reads_back_redacted_and_continues_on_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # unset: the store in the run directory
    run_dir = tmp_path / "run"
    done = toolkit_train(
        [
            *TINY_RUN,
            "trainer.accelerator=cpu",
            f"trainer.max_steps={STEPS}",
            "trainer.log_every_n_steps=1",
            "logger=mlflow",
            "stages=[train]",
            "+hub_token=${oc.env:HF_TOKEN}",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        env={**os.environ, **SECRETS},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    uri = f"sqlite:///{run_dir.resolve() / 'mlruns' / 'mlflow.db'}"

    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["quickstart"])
    finally:
        mlflow.set_tracking_uri(None)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.mlflow.runName"] == "quickstart"
    assert float(run["params.optim/lr"]) == 1.0e-3  # the recipe's value, from the resolved config
    assert run["params.hub_token"] == "***"
    logged = " ".join(str(v) for v in run.to_dict().values())
    for name, value in SECRETS.items():
        assert value not in logged, f"{name} reached the MLflow run"
        assert value.encode() not in (run_dir / "mlruns" / "mlflow.db").read_bytes()

    client = MlflowClient(uri)
    history = client.get_metric_history(run["run_id"], "train/loss")
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(history) == len(rows) == STEPS
    assert [m.step for m in history] == [int(r["step"]) for r in rows]
    assert [round(m.value, 5) for m in history] == [round(float(r["train/loss"]), 5) for r in rows]

    # a resume (same run directory, changed config keys) continues the run instead of starting another
    mlflow_args = ["logger=mlflow", "logger.experiment_name=quickstart"]
    resumed = compose_config([*TINY_RUN, *mlflow_args, f"from_run={run_dir}", "resume=last"])
    assert build_logger(resumed.logger, run_dir, resumed)[0].run_id == run["run_id"]
    assert len(client.search_runs([run["experiment_id"]])) == 1
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the next run in this process gets its own store
    other = build_logger(resumed.logger, tmp_path / "other", resumed)[0]
    assert other.experiment.tracking_uri == f"sqlite:///{(tmp_path / 'other').resolve()}/mlruns/mlflow.db"
    assert len(client.search_runs([run["experiment_id"]])) == 1
