"""Runs of a study as one pandas DataFrame, from an MLflow experiment or from a CSV of the same columns."""
from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from hldx.errors import BadInput
from hldx.tracking import all_runs

log = logging.getLogger(__name__)

HPARAMS = ["lr", "tau", "alpha", "gamma", "p1"]
METRICS = ["val_logppl", "wikitext_logppl", "hellaswag_err", "piqa_err", "arc_easy_err",
           "winogrande_err", "lambada_err"]
COLUMNS = ["student", "method", *HPARAMS, *METRICS]
METHODS = ["nll", "kd", "hldc", "hldf", "teacher"]  # "teacher": the run tagged hldx.role=teacher
RUN_ID = "run_id"  # optional extra column: the MLflow run id, empty for CSV rows without one
SEED = "seed"      # optional extra column: the run's initialisation seed, 0 for CSV rows without one
EVAL_DATA = "eval_data"  # optional extra column: the tag hldx.eval_data (hub, local, demo), empty if unknown
HIDDEN = "hidden"  # optional extra column: an HLD run's hidden path where not the paper's (pairs=..., the param)
LOGITS = "logits"  # optional extra column: a distilled run's teacher logits where not top-k (logits=sampled(...))
DEMO = "demo"      # eval_data of runs evaluated on the demo's own tasks (python -m hldx.demotasks)
# Optional extra columns: the hidden path's fit as hldx.train logs it (HLDF: phase 1's held-out cosine; HLDC:
# loss_emb at the first and last step), NaN where a run has none.
FIT = ["cosine_start", "cosine_end", "loss_emb_start", "loss_emb_end"]
ROW = COLUMNS + [SEED, RUN_ID, EVAL_DATA, HIDDEN, LOGITS, *FIT]  # the columns of a run as read (row, _typed)


def _typed(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Lower-case methods, numeric hyperparameters and metrics; a clear error on anything else."""
    df = df.copy()
    df["student"] = df["student"].fillna("").astype(str)
    df["method"] = df["method"].fillna("").astype(str).str.strip().str.lower()
    unknown = sorted(set(df["method"]) - set(METHODS))
    if unknown:
        raise BadInput(f"{where}: unknown method(s) {unknown}; expected one of {METHODS} (any case)")
    for col in HPARAMS + METRICS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df[col].notna() & (df[col].astype(str).str.strip() != "") & values.isna()
        if bad.any():
            raise BadInput(f"{where}: column {col!r} holds a non-number {df[col][bad].iloc[0]!r}; "
                             "use a number or leave the cell empty")
        df[col] = values.astype(float)
    df[RUN_ID] = df[RUN_ID].fillna("").astype(str) if RUN_ID in df else ""
    seeds = pd.to_numeric(df[SEED], errors="coerce") if SEED in df else pd.Series(0, index=df.index)
    if seeds.isna().any():
        raise BadInput(f"{where}: column 'seed' holds a non-integer {df[SEED][seeds.isna()].iloc[0]!r}")
    df[SEED] = seeds.astype(int)
    df[EVAL_DATA] = df[EVAL_DATA].fillna("").astype(str) if EVAL_DATA in df else ""
    df[HIDDEN] = df[HIDDEN].fillna("").astype(str) if HIDDEN in df else ""
    df[LOGITS] = df[LOGITS].fillna("").astype(str) if LOGITS in df else ""
    for col in FIT:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else float("nan")
    order = df["method"].map(METHODS.index)
    df = df.assign(_order=order).sort_values(["student", "_order", *HPARAMS, HIDDEN, LOGITS, SEED], kind="stable")
    return df[ROW].reset_index(drop=True)


def read_csv(path: str | Path) -> pd.DataFrame:
    """One row per run with the columns COLUMNS (plus the optional run_id, seed, eval_data, hidden, logits); empty cells
    are missing."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise BadInput(f"{path}: missing column(s) {missing}; the CSV needs the columns {COLUMNS}")
    if df.empty:
        raise BadInput(f"{path}: no runs (the CSV has a header but no rows)")
    return _typed(df, str(path))


def row(run) -> dict:
    """One finished MLflow run in the CSV's columns."""
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    teacher = tags.get("hldx.role") == "teacher"
    return {
        "student": params.get("student", tags.get("hldx.student", "")),
        "method": "teacher" if teacher else params.get("method", tags.get("hldx.method", "")),
        **{h: params.get(h) for h in HPARAMS},
        **{m: metrics.get(f"eval/{m}") for m in METRICS},
        SEED: params.get("seed", 0),
        RUN_ID: run.info.run_id,
        EVAL_DATA: tags.get("hldx.eval_data", ""),
        HIDDEN: params.get("hidden", ""),
        LOGITS: params.get("logits", ""),
        **{f: metrics.get(f"hidden/{f}") for f in FIT},
    }


def read_mlflow(experiment: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """FINISHED runs of `experiment`, the latest per hldx.run_key, without report runs (hldx.role=report)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        uri = tracking_uri or mlflow.get_tracking_uri()
        raise BadInput(f"no experiment named {experiment!r} at tracking URI {uri!r}; check --experiment "
                         "and --tracking-uri (list them with `mlflow experiments search`)")
    runs = [r for r in all_runs(client, exp.experiment_id) if r.data.tags.get("hldx.role") != "report"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if len(finished) < len(runs):
        log.info("skipped %d run(s) that are not FINISHED", len(runs) - len(finished))
    latest: dict[str, object] = {}
    for r in sorted(finished, key=lambda r: (r.info.end_time or 0, r.info.start_time or 0)):
        latest[r.data.tags.get("hldx.run_key") or r.info.run_id] = r
    if len(latest) < len(finished):
        log.info("skipped %d run(s) superseded by a later run with the same hldx.run_key",
                 len(finished) - len(latest))
    if not latest:
        raise BadInput(f"experiment {experiment!r} has no FINISHED runs to report on "
                         f"({len(runs)} run(s) in other states); train some with `python -m hldx.run`")
    df = pd.DataFrame([row(r) for r in latest.values()], columns=ROW)
    return _typed(df, f"experiment {experiment!r}")
