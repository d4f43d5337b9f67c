"""MLflow: one experiment per study, one run per run_key, resumed into the same run after a restart."""
from __future__ import annotations

import logging
import time

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from hldx import config as C

log = logging.getLogger(__name__)
MAX_BATCH = 100  # MLflow's limit of params (and tags) per log_batch call


def client(cfg: DictConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.tracking.uri)


def experiment_id(mlflow: MlflowClient, name: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name)
    except MlflowException:  # jobs started together: another one created it first
        return mlflow.get_experiment_by_name(name).experiment_id


def find_run(mlflow: MlflowClient, experiment: str, key: str):
    """The latest run of this run_key in the experiment, or None."""
    runs = mlflow.search_runs([experiment], filter_string=f"tags.`hldx.run_key` = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class Tracker:
    """Logs one hldx run; `run_id` given (from a checkpoint) or found by run_key resumes that run."""

    def __init__(self, cfg: DictConfig, key: str, role: str = "student", run_id: str | None = None):
        self.mlflow = client(cfg)
        self.experiment = experiment_id(self.mlflow, cfg.tracking.experiment)
        if run_id is None:
            previous = find_run(self.mlflow, self.experiment, key)
            run_id = previous.info.run_id if previous and previous.info.status != "FINISHED" else None
        if run_id is not None:
            self.run_id = run_id
            self.mlflow.update_run(run_id, status="RUNNING")
            log.info("resuming MLflow run %s", run_id)
            return
        tags = {"hldx.method": cfg.method.name, "hldx.student": cfg.student.name, "hldx.hp_key": C.hp_key(cfg),
                "hldx.run_key": key, "hldx.role": role}
        self.run_id = self.mlflow.create_run(self.experiment, run_name=C.run_name(cfg), tags=tags).info.run_id
        params = {"method": cfg.method.name, "student": cfg.student.name, "seed": cfg.seed,
                  **{k: v for k, v in C.hparams(cfg).items() if v is not None}}
        params |= {f"cfg.{k}": v for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items()}
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.mlflow.log_batch(self.run_id, params=items[i:i + MAX_BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.mlflow.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def tag(self, **tags: str) -> None:
        self.mlflow.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.set_terminated(self.run_id, status=status)


def finished_run(cfg: DictConfig, key: str) -> str | None:
    """The id of a FINISHED run with this run_key in the experiment, if any."""
    mlflow = client(cfg)
    found = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if found is None:
        return None
    run = find_run(mlflow, found.experiment_id, key)
    return run.info.run_id if run and run.info.status == "FINISHED" else None
