"""Is a study's KD baseline worth comparing with? Its positive control, and the hidden path's fit.

The paper's null result is credible because its KD beats NLL ("a prerequisite not always met in the HLD
literature"). Per shared point (lr, tau, alpha): NLL at that lr and KD, each averaged over seeds, their margin
(NLL - KD: > 0 where KD is better) and the point's between-seed spread: the largest range over the seeds of
NLL's value, of KD's, and of their seed-paired difference. The control holds where the teacher is below every
student, KD beats NLL at `SHARE` of the points, and at its best point by more than `TIMES` the spread there.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis.runs import FIT, HIDDEN, LOGITS, SEED

POINT = ["student", "lr", "tau", "alpha"]
SHARE = 0.75   # of the points where KD must beat NLL
TIMES = 2.0    # the best point's margin, in between-seed spreads


def _range(x: pd.Series) -> float:
    return float(x.max() - x.min())


def kd_vs_nll(runs: pd.DataFrame, metric: str = "val_logppl") -> pd.DataFrame:
    """One row per KD point (and teacher logits, where KD reads several: logits=sampled(...), "" for top-k): nll,
    kd (seed means), margin = nll - kd, spread, seeds (paired seeds)."""
    kd = runs.loc[runs["method"] == "kd", POINT + [LOGITS, SEED, metric]].rename(columns={metric: "kd"})
    nll = runs.loc[runs["method"] == "nll", ["student", "lr", SEED, metric]].rename(columns={metric: "nll"})
    both = kd.merge(nll, on=["student", "lr", SEED]).dropna(subset=["kd", "nll"])
    rows = []
    for key, g in both.groupby(POINT + [LOGITS], sort=True):
        rows.append(dict(zip(POINT + [LOGITS], key), nll=g["nll"].mean(), kd=g["kd"].mean(),
                         margin=g["nll"].mean() - g["kd"].mean(),
                         spread=max(_range(g["nll"]), _range(g["kd"]), _range(g["nll"] - g["kd"])),
                         seeds=len(g)))
    return pd.DataFrame(rows, columns=POINT + [LOGITS, "nll", "kd", "margin", "spread", "seeds"])


@dataclass(frozen=True)
class Control:
    points: int
    kd_better: int
    best: dict            # the point with the largest margin: its row of kd_vs_nll
    teacher: float        # the teacher's value (NaN: no teacher run)
    best_student: float   # the lowest value of any student run

    @property
    def share(self) -> float:
        return self.kd_better / self.points if self.points else 0.0

    @property
    def holds(self) -> bool:
        return (self.points > 0 and self.teacher < self.best_student and self.share >= SHARE
                and self.best["margin"] > TIMES * self.best["spread"])

    def lines(self) -> list[str]:
        """The control in words, each claim beside its numbers."""
        b = self.best
        point = f"lr={b['lr']:g}, tau={b['tau']:g}, alpha={b['alpha']:g}" + (
            f", {b[LOGITS]}" if b.get(LOGITS) else "") if self.points else "-"
        return [f"teacher {self.teacher:.3f} against the best student {self.best_student:.3f} "
                f"({'below' if self.teacher < self.best_student else 'NOT below'} every student)",
                f"KD beats NLL at {self.kd_better} of {self.points} points ({self.share:.0%}; needed: "
                f"{SHARE:.0%})",
                f"best point ({point}): KD {b.get('kd', float('nan')):.3f} against NLL {b.get('nll', float('nan')):.3f},"
                f" a margin of {b.get('margin', float('nan')):.3f} = {b.get('margin', 0) / b['spread'] if b.get('spread') else float('inf'):.1f}"
                f" x the between-seed spread {b.get('spread', float('nan')):.3f} (needed: > {TIMES:g} x)",
                f"the positive control {'holds' if self.holds else 'does NOT hold'}"]


def control(runs: pd.DataFrame, metric: str = "val_logppl") -> Control:
    """The positive control of the runs (students and, where logged, the teacher) on `metric`."""
    table = kd_vs_nll(runs, metric)
    students = runs.loc[runs["method"].isin(["nll", "kd", "hldc", "hldf"]), metric]
    teacher = runs.loc[runs["method"] == "teacher", metric]
    best = table.loc[table["margin"].idxmax()].to_dict() if len(table) else {}
    return Control(len(table), int((table["margin"] > 0).sum()), best,
                   float(teacher.min()) if len(teacher) else float("nan"), float(students.min()))


def hidden_fit(runs: pd.DataFrame) -> pd.DataFrame:
    """The hidden path's fit per (student, method, variant: gamma= or p1=, and the hidden path and the teacher's
    logits where they are not the paper's), over its runs: HLDF phase 1's held-out cosine and HLDC's loss_emb at
    start and end (means; with several layer pairs, over the pairs as the loss weighs them), and how many runs
    learned (cosine up, loss_emb down)."""
    rows = []
    for (student, method), g in runs[runs["method"].isin(["hldc", "hldf"])].groupby(["student", "method"]):
        start, end = ("cosine_start", "cosine_end") if method == "hldf" else ("loss_emb_start", "loss_emb_end")
        variant = "p1" if method == "hldf" else "gamma"
        for (value, path, logits), v in g.groupby([variant, HIDDEN, LOGITS]):
            v = v.dropna(subset=[start, end])
            learned = (v[end] > v[start]) if method == "hldf" else (v[end] < v[start])
            rows.append({"student": student, "method": method, "variant": "|".join(
                             [f"{variant}={value:g}"] + [x for x in (path, logits) if x]),
                         "measure": start.removesuffix("_start"), "runs": len(v), "start": v[start].mean(),
                         "end": v[end].mean(), "learned": int(learned.sum())})
    return pd.DataFrame(rows, columns=["student", "method", "variant", "measure", "runs", "start", "end", "learned"])


__all__ = ["FIT", "Control", "control", "hidden_fit", "kd_vs_nll"]
