"""How a study's results are shown: markdown tables, the answer in words, the paper's figure kinds; shared by the
report (analysis.report) and a study's results page (analysis.page)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from analysis import figures
from analysis.compare import FAMILIES
from analysis.runs import METRICS

DOWNSTREAM = METRICS[1:]  # all but val_logppl
DEMO_NOTE = ("The columns marked (demo) are the demo's own tasks (python -m hldx.demotasks: items built from the "
             "embedded corpus's held-out split in each benchmark's file format), not the benchmarks of those names.")


def demo_labels(metrics: list[str]) -> dict[str, str]:
    """Each benchmark-named metric as the report shows it for runs evaluated on the demo's own tasks."""
    return {m: f"{m} (demo)" for m in metrics if m in DOWNSTREAM}


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def answer(lines: pd.DataFrame, demo: bool = False) -> list[str]:
    """The headline (analysis.compare.headline) in words: a line per compared method and metric family."""
    families = {"val": "val_logppl", "downstream": f"downstream (mean error of {len(FAMILIES['downstream'])} "
                f"{'demo ' if demo else ''}tasks)"}
    out = []
    for row in lines.itertuples():
        interval = f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]" if row.n > 1 else "(one point: no interval)"
        spread = "one seed: its spread unknown" if row.seeds < 2 else \
            f"{'beyond' if row.beyond_seeds else 'within'} the seed spread ({row.seed_sd:.2g})"
        out.append(f"{row.student} {row.method.upper()} vs KD, {families[row.family]}: {row.verdict}, median "
                   f"{row.median_improvement:+.4f} {interval} over {row.n} point{'s' if row.n > 1 else ''}; {spread}")
    return out


ANSWER = ("Each method against KD at shared (lr, tau, alpha), improvement = KD's score - its own (> 0: better), "
          "seeds and variants averaged within a point: the median over the points, its 95% bootstrap interval "
          "(better or worse: the interval excludes 0), against the seed spread (the between-seed standard "
          "deviation of a point's improvement).")


def markdown_table(df: pd.DataFrame, bold: pd.DataFrame | None = None) -> str:
    """A GitHub-flavoured markdown table; cells where `bold` is True are bold."""
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for i, row in df.iterrows():
        cells = [_cell(v) for v in row]
        if bold is not None:
            cells = [f"**{c}**" if bold.at[i, col] else c for c, col in zip(cells, df.columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "student"


def make_figures(points: pd.DataFrame, out: Path, labels: dict[str, str] | None = None) -> list[tuple[str, Path]]:
    """The paper's figure kinds as PNGs in `out`, as (caption, path) in reading order; `labels`: the metrics'
    shown names."""
    labels = labels or {}
    made, points = [], points.assign(metric=points["metric"].replace(labels))
    downstream = [labels.get(m, m) for m in DOWNSTREAM]
    if points["improvement"].notna().any():
        val = points[points["metric"] == "val_logppl"]
        if val.loc[val["method"] != "nll", "improvement"].notna().any():  # the histograms show HLDC and HLDF
            made.append(("Fig. 1 kind: val log-ppl improvement over KD, per student",
                         figures.histograms(val, "student", "Val log-ppl: improvement over KD",
                                            out / "fig1_val_logppl_hist.png")))
        for student, group in points[points["metric"].isin(downstream)].groupby("student", sort=False):
            if group.loc[group["method"] != "nll", "improvement"].notna().any():
                made.append((f"Figs. 2/4 kind: downstream improvement over KD, {student}",
                             figures.histograms(group, "metric", f"{student}: improvement over KD",
                                                out / f"fig2_downstream_hist_{_slug(student)}.png")))
        if val["improvement"].notna().any():
            made.append(("Fig. 5 kind: val log-ppl, KD (x) vs compared method (y), per student",
                         figures.scatters(val, "student", "Val log-ppl at shared hyperparameters",
                                          out / "fig5_val_logppl_scatter.png")))
        for student, group in points[points["metric"].isin(downstream)].groupby("student", sort=False):
            if group["improvement"].notna().any():
                made.append((f"Figs. 6/7 kind: downstream, KD (x) vs compared method (y), {student}",
                             figures.scatters(group, "metric", f"{student}: scores at shared hyperparameters",
                                              out / f"fig6_downstream_scatter_{_slug(student)}.png")))
    return made
