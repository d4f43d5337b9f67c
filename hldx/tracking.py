"""MLflow: one experiment per study, one run per run_key, resumed into the same run after a restart."""
from __future__ import annotations

import functools
import logging
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from hldx import config as C
from hldx import hidden
from hldx.cli import log_file
from hldx.device import device_of, machine
from hldx.errors import ConfigError
from hldx.teacher import teacher_key

if TYPE_CHECKING:  # MLflow is imported where a run is logged: checking, planning or benching a job needs none
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
MAX_BATCH = 100  # MLflow's limit of params (and tags) per log_batch call


def client(cfg: DictConfig) -> MlflowClient:
    """The tracking client; a local sqlite store is first opened under a file lock beside it: jobs started
    together would otherwise race to create its tables."""
    from mlflow.tracking import MlflowClient

    uri = cfg.tracking.uri
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):  # the client creates the tables
        return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

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


def all_runs(mlflow: MlflowClient, experiment: str) -> list:
    """Every run of the experiment (id), page after page."""
    runs, token = [], None
    while True:
        page = mlflow.search_runs([experiment], max_results=1000, page_token=token)
        runs.extend(page)
        if not (token := page.token):
            return runs


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


@functools.cache
def commit() -> str:
    """The git commit of hldx's source (`-dirty` with uncommitted changes), or `unknown` outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def run_name(cfg: DictConfig, role: str) -> str:
    """A student's readable name (hldx.config.run_name); the on-demand teacher's says it is the teacher, e.g.
    teacher|tiny-teacher|tokens=5e5|lr=3e-3."""
    if role != "teacher":
        return C.run_name(cfg)
    return f"teacher|{cfg.student.name}|tokens={C.short(float(cfg.budget.tokens))}|lr={C.short(float(cfg.lr))}"


class Tracker:
    """Logs one hldx run; `run_id` given (from a checkpoint) or found by run_key resumes that run."""

    def __init__(self, cfg: DictConfig, key: str, role: str = "student", run_id: str | None = None):
        from mlflow.entities import Param

        self.mlflow = client(cfg)
        self.experiment = experiment_id(self.mlflow, cfg.tracking.experiment)
        if run_id is not None and not self._here(run_id):
            log.warning("the checkpoint's MLflow run %s is not in experiment %r of %s (a new store?): this run is "
                        "logged as a new MLflow run", run_id, cfg.tracking.experiment, cfg.tracking.uri)
            run_id = None
        if run_id is None:
            previous = find_run(self.mlflow, self.experiment, key)
            run_id = previous.info.run_id if previous and previous.info.status != "FINISHED" else None
        logged = {"hldx.log": where} if (where := log_file()) else {}  # where this job's log is (hldx.status)
        if run_id is not None:
            self.run_id = run_id
            self.mlflow.update_run(run_id, status="RUNNING")
            self.tag(**logged)
            log.info("resuming MLflow run %s", run_id)
            return
        tags = {"hldx.method": cfg.method.name, "hldx.student": cfg.student.name,
                "hldx.hp_key": C.hp_key(cfg) if role == "student" else role, "hldx.run_key": key, "hldx.role": role,
                "hldx.commit": commit(), "hldx.machine": machine(device_of(cfg)), **logged}
        if role == "student" and cfg.method.name in C.DISTILLED:
            tags["hldx.teacher"] = teacher_key(cfg)
        self.run_id = self.mlflow.create_run(self.experiment, run_name=run_name(cfg, role), tags=tags).info.run_id
        params = {"method": cfg.method.name, "student": cfg.student.name, "seed": cfg.seed,
                  **{k: v for k, v in C.hparams(cfg).items() if v is not None}}
        if path := hidden.variant(cfg):  # an HLD run's hidden path where it is not the paper's (the analysis' variant)
            params["hidden"] = path
        if logits := C.logits_text(cfg):  # the teacher's logits where they are not the paper's top-k (a variant too)
            params["logits"] = logits
        params |= {f"cfg.{k}": v for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items()}
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.mlflow.log_batch(self.run_id, params=items[i:i + MAX_BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.mlflow.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def _here(self, run_id: str) -> bool:
        """Whether the run exists in this store, in this run's experiment."""
        from mlflow.exceptions import MlflowException

        try:
            return self.mlflow.get_run(run_id).info.experiment_id == self.experiment
        except MlflowException:
            return False

    def tag(self, **tags: str) -> None:
        from mlflow.entities import RunTag

        self.mlflow.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.set_terminated(self.run_id, status=status)

    def compare_with_kd(self, cfg: DictConfig, metrics: dict[str, float]) -> None:
        """Log vs_kd/<metric> (KD's value minus this run's: > 0 is better) and the tag hldx.kd_run when this
        run's KD partner has finished: the KD run at the same (lr, tau, alpha), student and seed; for NLL the
        KD runs at its lr, against their mean. analysis.report fills in the runs that finish first."""
        if cfg.method.name == "kd":
            return
        hp = C.hp_key(cfg)
        point = f"tags.`hldx.hp_key` = '{hp}'" if cfg.method.name != "nll" else f"tags.`hldx.hp_key` LIKE '{hp}|%'"
        found = self.mlflow.search_runs(
            [self.experiment], filter_string=f"tags.`hldx.method` = 'kd' and tags.`hldx.student` = "
            f"'{cfg.student.name}' and params.seed = '{cfg.seed}' and attributes.status = 'FINISHED' and {point}")
        latest: dict[str, object] = {}  # the latest run of each partner's run_key: the same run but for the method
        for r in sorted(found, key=lambda r: r.info.end_time or 0):
            key = C.kd_partner_key(cfg, float(r.data.params["tau"]), float(r.data.params["alpha"]))
            if r.data.tags.get("hldx.run_key") == key:
                latest[key] = r
        if not latest:
            return
        vs = {f"vs_kd/{k}": sum(r.data.metrics[k] for r in latest.values()) / len(latest) - v
              for k, v in metrics.items() if all(k in r.data.metrics for r in latest.values())}
        self.log(vs, 0)
        self.tag(**{"hldx.kd_run": ",".join(sorted(r.info.run_id for r in latest.values()))})


def finished_run(cfg: DictConfig, key: str) -> str | None:
    """The id of a FINISHED run with this run_key in the experiment, if any."""
    mlflow = client(cfg)
    found = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if found is None:
        return None
    run = find_run(mlflow, found.experiment_id, key)
    return run.info.run_id if run and run.info.status == "FINISHED" else None


def log_evaluation(cfg: DictConfig, run_id: str, metrics: dict[str, float], tags: dict[str, str],
                   evaluated: list[str]) -> None:
    """Log an evaluation into an existing run, at the last step its eval metrics were logged (so these become
    the latest), and drop the skip tags of the tasks now `evaluated`."""
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    mlflow = client(cfg)
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as e:
        raise ConfigError(f"eval.run_id={run_id} is invalid: no such run at tracking.uri={cfg.tracking.uri}") from e
    step = max((m.step for k in metrics for m in mlflow.get_metric_history(run_id, k)), default=0)
    now = int(time.time() * 1000)
    mlflow.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
                     tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
    for task in evaluated:
        if f"hldx.eval_skipped.{task}" in run.data.tags:
            mlflow.delete_tag(run_id, f"hldx.eval_skipped.{task}")


def unreachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an http(s) tracking server does not answer its health check within seconds; None if it does (or
    the URI is not a server). MLflow's client would otherwise retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return None
    except (OSError, ValueError) as err:
        return (f"tracking.uri={uri} does not answer ({getattr(err, 'reason', err)}): start the server "
                f"(mlflow server --host HOST --port PORT) or point tracking.uri at a running one")


def check(cfg: DictConfig) -> None:
    """Raise ConfigError if tracking.uri names a server that does not answer."""
    if problem := unreachable(cfg.tracking.uri):
        raise ConfigError(problem)
