"""The paper's two comparisons: best-vs-best (Table 1) and pointwise against KD at shared (lr, tau, alpha)."""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from analysis.runs import COLUMNS, HPARAMS, METHODS, METRICS, RUN_ID
from hldx import evaluation

log = logging.getLogger(__name__)

POINT = ["student", "lr", "tau", "alpha"]  # a shared hyperparameter point
RANDOM_ERR = {f"{task}_err": err for task, err in evaluation.RANDOM_ERR.items()}  # Table 1's Random row
POINTWISE = ["student", "method", *HPARAMS, "metric", "score", "kd_score", "improvement", "paired",
             RUN_ID, "kd_run_id"]
SUMMARY = ["student", "method", "metric", "n", "improve", "tie", "worsen", "median_improvement", "ci_low",
           "ci_high", "sign_p"]


def best(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (student, method) the run with the lowest val_logppl, Random and Teacher rows first."""
    ranked = runs.dropna(subset=["val_logppl"])
    for student, method in runs.groupby(["student", "method"]).groups.keys() - \
            ranked.groupby(["student", "method"]).groups.keys():
        log.warning("no %s run of student %r has val_logppl: it has no best row", method, student)
    chosen = runs.loc[ranked.groupby(["student", "method"], sort=False)["val_logppl"].idxmin(), COLUMNS]
    teacher = chosen["method"] == "teacher"
    random = pd.DataFrame([{"student": "", "method": "random", **RANDOM_ERR}], columns=COLUMNS)
    return pd.concat([random, chosen[teacher], chosen[~teacher]], ignore_index=True)


def pointwise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (compared run, KD partner, metric); improvement = kd_score - score (> 0: better than KD).

    HLDC/HLDF runs pair with the KD run(s) of the same (student, lr, tau, alpha); NLL runs with every KD run
    of the same (student, lr), and take that run's tau and alpha as their point. A run with no partner is
    kept with paired=False and empty KD columns.
    """
    kd = runs.loc[runs["method"] == "kd", POINT + METRICS + [RUN_ID]]
    kd = kd.rename(columns={RUN_ID: "kd_run_id", **{m: f"{m}_kd" for m in METRICS}})
    hld = runs[runs["method"].isin(["hldc", "hldf"])].merge(kd, on=POINT, how="left", indicator=True)
    nll = runs[runs["method"] == "nll"].drop(columns=["tau", "alpha"])
    nll = nll.merge(kd, on=["student", "lr"], how="left", indicator=True)
    pairs = pd.concat([hld, nll], ignore_index=True)
    pairs["paired"] = pairs.pop("_merge") == "both"
    long = pd.concat(
        [pairs[["student", "method", *HPARAMS, "paired", RUN_ID, "kd_run_id"]].assign(
            metric=m, score=pairs[m], kd_score=pairs[f"{m}_kd"]) for m in METRICS],
        ignore_index=True)
    long["improvement"] = long["kd_score"] - long["score"]
    long["_m"], long["_k"] = long["method"].map(METHODS.index), long["metric"].map(METRICS.index)
    long = long.sort_values(["student", "_m", *HPARAMS, "_k", "kd_run_id"], kind="stable")
    return long[POINTWISE].reset_index(drop=True)


def sign_test(improve: int, worsen: int) -> float:
    """Exact two-sided sign test (ties already dropped): P(a split at least as uneven | p = 1/2)."""
    n = improve + worsen
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(improve, worsen) + 1))
    return min(1.0, 2 * tail / 2**n)


def bootstrap_median_ci(x_N: np.ndarray, seed: int = 0, n_boot: int = 10_000,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of x_N, reproducible through `seed`."""
    rng = np.random.default_rng(seed)
    medians_B = np.median(x_N[rng.integers(0, len(x_N), size=(n_boot, len(x_N)))], axis=1)
    low, high = np.quantile(medians_B, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summary(points: pd.DataFrame, seed: int = 0, n_boot: int = 10_000) -> pd.DataFrame:
    """Per (student, method, metric): counts of improve/tie/worsen, median improvement, its CI, sign-test p.

    Scores equal as logged are ties (improvement exactly 0); unpaired points and missing scores are not counted.
    """
    rows = []
    for (student, method, metric), group in points.groupby(["student", "method", "metric"], sort=False):
        d_N = group["improvement"].dropna().to_numpy(dtype=float)
        improve, worsen = int((d_N > 0).sum()), int((d_N < 0).sum())
        low, high = bootstrap_median_ci(d_N, seed, n_boot) if len(d_N) else (math.nan, math.nan)
        rows.append({"student": student, "method": method, "metric": metric, "n": len(d_N),
                     "improve": improve, "tie": len(d_N) - improve - worsen, "worsen": worsen,
                     "median_improvement": float(np.median(d_N)) if len(d_N) else math.nan,
                     "ci_low": low, "ci_high": high,
                     "sign_p": sign_test(improve, worsen) if len(d_N) else math.nan})
    return pd.DataFrame(rows, columns=SUMMARY)
