"""The paper's two comparisons: best-vs-best (Table 1) and pointwise against KD at shared (lr, tau, alpha).

Pointwise statistics count independent units only: each variant (HLDC's gamma, HLDF's p1, with the hidden path
where it is not the paper's: pairs=..., weights=..., adapter=...; and the teacher's logits where they are not its
top-k: logits=sampled(...), which the KD partner shares) at a point, or a
point with its variants averaged; seeds are averaged within a unit first, so a replicate never counts as
another point, and NLL is compared once per lr (against the mean of the KD runs at that lr)."""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from analysis.runs import COLUMNS, HIDDEN, HPARAMS, LOGITS, METHODS, METRICS, RUN_ID, SEED
from hldx import evaluation

log = logging.getLogger(__name__)

POINT = ["student", "lr", "tau", "alpha"]  # a shared hyperparameter point
RANDOM_ERR = {f"{task}_err": err for task, err in evaluation.RANDOM_ERR.items()}  # Table 1's Random row
POINTWISE = ["student", "method", *HPARAMS, SEED, "point", "variant", "metric", "score", "kd_score", "improvement",
             "paired", RUN_ID, "kd_run_id"]
VIEWS = ("variant", "point")
SUMMARY = ["view", "student", "method", "variant", "metric", "n", "improve", "tie", "worsen", "median_improvement",
           "ci_low", "ci_high", "sign_p", "seeds", "seed_sd"]


def _text(x: float) -> str:
    return f"{x:g}"


def best(runs: pd.DataFrame, on: str = "val_logppl") -> pd.DataFrame:
    """Per (student, method) the run with the lowest `on` (the paper: val_logppl), Random and Teacher rows
    first."""
    ranked = runs.dropna(subset=[on])
    for student, method in runs.groupby(["student", "method"]).groups.keys() - \
            ranked.groupby(["student", "method"]).groups.keys():
        log.warning("no %s run of student %r has %s: it has no best row", method, student, on)
    chosen = runs.loc[ranked.groupby(["student", "method"], sort=False)[on].idxmin(), COLUMNS]
    teacher = chosen["method"] == "teacher"
    random = pd.DataFrame([{"student": "", "method": "random", **RANDOM_ERR}], columns=COLUMNS)
    return pd.concat([random, chosen[teacher], chosen[~teacher]], ignore_index=True)


def pointwise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (compared run, KD partner, metric); improvement = kd_score - score (> 0: better than KD).

    HLDC/HLDF runs pair with the KD run of the same (student, lr, tau, alpha), seed and teacher logits; their
    `point` is that (lr, tau, alpha), their `variant` the gamma or p1 that KD lacks (and their hidden path where it
    is not the paper's, e.g. gamma=0.1|pairs=[[1,2],[3,5]], and the logits where they are not top-k). NLL runs
    pair with every KD run of the same (student, lr) and seed; their point is the lr alone, their variant the KD
    run's logits where they are not top-k. A run with no partner is kept with paired=False and empty KD columns.
    """
    kd = runs.loc[runs["method"] == "kd", POINT + [SEED, LOGITS] + METRICS + [RUN_ID]]
    kd = kd.rename(columns={RUN_ID: "kd_run_id", **{m: f"{m}_kd" for m in METRICS}})
    hld = runs[runs["method"].isin(["hldc", "hldf"])].merge(kd, on=POINT + [SEED, LOGITS], how="left",
                                                            indicator=True)
    hld["point"] = [f"lr={_text(a)}|tau={_text(b)}|alpha={_text(c)}" for a, b, c in
                    zip(hld["lr"], hld["tau"], hld["alpha"])]
    hld["variant"] = ["|".join([f"gamma={_text(g)}" if m == "hldc" else f"p1={_text(p)}"] + [x for x in (h, t) if x])
                      for m, g, p, h, t in zip(hld["method"], hld["gamma"], hld["p1"], hld[HIDDEN], hld[LOGITS])]
    nll = runs[runs["method"] == "nll"].drop(columns=["tau", "alpha", LOGITS])
    nll = nll.merge(kd, on=["student", "lr", SEED], how="left", indicator=True)
    nll["point"], nll["variant"] = [f"lr={_text(a)}" for a in nll["lr"]], nll[LOGITS].fillna("")
    pairs = pd.concat([hld, nll], ignore_index=True)
    pairs["paired"] = pairs.pop("_merge") == "both"
    long = pd.concat(
        [pairs[["student", "method", *HPARAMS, SEED, "point", "variant", "paired", RUN_ID, "kd_run_id"]].assign(
            metric=m, score=pairs[m], kd_score=pairs[f"{m}_kd"]) for m in METRICS],
        ignore_index=True)
    long["improvement"] = long["kd_score"] - long["score"]
    long["_m"], long["_k"] = long["method"].map(METHODS.index), long["metric"].map(METRICS.index)
    long = long.sort_values(["student", "_m", *HPARAMS, "variant", SEED, "_k", "kd_run_id"], kind="stable")
    return long[POINTWISE].reset_index(drop=True)


def units(points: pd.DataFrame, view: str) -> pd.DataFrame:
    """The independent units of a comparison, one row each: per `variant` view a (point, variant), per `point`
    view a point, its differences averaged over the variants (and, for NLL, over the KD runs of its lr)
    within each seed, then over seeds. Columns: the keys, improvement (the seed average), seeds, seed_sd (the
    between-seed standard deviation of that seed's difference; NaN with one seed)."""
    if view not in VIEWS:
        raise ValueError(f"view {view!r}: expected one of {VIEWS}")
    keys = ["student", "method", "metric", "point"] + (["variant"] if view == "variant" else [])
    paired = points[points["paired"]].dropna(subset=["improvement"])
    per_seed = paired.groupby(keys + [SEED], sort=False)["improvement"].mean().reset_index()
    out = per_seed.groupby(keys, sort=False)["improvement"].agg(["mean", "count", "std"]).reset_index()
    out = out.rename(columns={"mean": "improvement", "count": "seeds", "std": "seed_sd"})
    if view == "point":
        out["variant"] = ""
    return out


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
    """Both views (`units`), per (student, method, [variant,] metric): counts of improve/tie/worsen over the
    independent units, their median improvement, its bootstrap CI, the sign-test p; seeds per unit and the
    median between-seed spread. A unit whose (averaged) improvement is exactly 0 is a tie."""
    rows = []
    for view in VIEWS:
        table = units(points, view)
        for (student, method, variant, metric), group in table.groupby(["student", "method", "variant", "metric"],
                                                                       sort=False):
            d_N = group["improvement"].to_numpy(dtype=float)
            improve, worsen = int((d_N > 0).sum()), int((d_N < 0).sum())
            low, high = bootstrap_median_ci(d_N, seed, n_boot)
            rows.append({"view": view, "student": student, "method": method, "variant": variant, "metric": metric,
                         "n": len(d_N), "improve": improve, "tie": len(d_N) - improve - worsen, "worsen": worsen,
                         "median_improvement": float(np.median(d_N)), "ci_low": low, "ci_high": high,
                         "sign_p": sign_test(improve, worsen), "seeds": int(group["seeds"].max()),
                         "seed_sd": float(group["seed_sd"].median())})
    out = pd.DataFrame(rows, columns=SUMMARY)
    out["_m"], out["_k"] = out["method"].map(METHODS.index), out["metric"].map(METRICS.index)
    return out.sort_values(["view", "student", "_m", "variant", "_k"], kind="stable", key=_view_order)[SUMMARY] \
        .reset_index(drop=True)


def _view_order(col: pd.Series) -> pd.Series:
    return col.map(VIEWS.index) if col.name == "view" else col


FAMILIES = {"val": ["val_logppl"], "downstream": [f"{task}_err" for task in evaluation.DOWNSTREAM]}
EPS = 1e-9  # an interval's end this close to 0 is 0 (averaged error rates equal as logged differ by rounding)
HEADLINE = ["student", "method", "family", "verdict", "n", "median_improvement", "ci_low", "ci_high", "seeds",
            "seed_sd", "beyond_seeds"]


def headline(points: pd.DataFrame, seed: int = 0, n_boot: int = 10_000) -> pd.DataFrame:
    """The study's answer, one row per compared (student, method) and metric family: val (the held-out split's
    log-perplexity) and downstream (the mean of the benchmarks' error rates, one unit per point as for a
    metric). Over the points (variants and seeds averaged within each): the median improvement over KD, its
    bootstrap interval and a verdict, better (the interval above 0), worse (below 0) or tied; and whether the
    median lies beyond the seed spread (the units' median between-seed standard deviation; NaN with one seed)."""
    rows = []
    for family, metrics in FAMILIES.items():
        chosen = points[points["metric"].isin(metrics)]
        keys = [c for c in POINTWISE if c not in ("metric", "score", "kd_score", "improvement")]
        chosen = chosen.groupby(keys, sort=False, dropna=False)["improvement"].mean().reset_index()
        table = units(chosen.assign(metric=family), "point")
        for (student, method), group in table.groupby(["student", "method"], sort=False):
            d_N = group["improvement"].to_numpy(dtype=float)
            low, high = bootstrap_median_ci(d_N, seed, n_boot)
            median, spread = float(np.median(d_N)), float(group["seed_sd"].median())
            verdict = "better" if low > EPS else "worse" if high < -EPS else "tied"
            rows.append({"student": student, "method": method, "family": family, "verdict": verdict, "n": len(d_N),
                         "median_improvement": median, "ci_low": low, "ci_high": high,
                         "seeds": int(group["seeds"].max()), "seed_sd": spread,
                         "beyond_seeds": None if math.isnan(spread) else abs(median) > spread})
    out = pd.DataFrame(rows, columns=HEADLINE)
    out["_m"] = out["method"].map(METHODS.index)
    return out.sort_values(["student", "_m"], kind="stable")[HEADLINE].reset_index(drop=True)
