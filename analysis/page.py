"""`python -m analysis.page`: a study's results page (docs/mini-study.md for `make mini`) from its MLflow runs.

The page leads with the answer, then the positive control (is the KD baseline worth comparing with?), what was
run (command, commit, wall time, machine: as the runs logged them), Table 1, the pointwise comparison per point,
the paper's figure kinds, the hidden path's fit, and what the study can and cannot show. Its figures are small
PNGs in a folder beside it (<page stem>/), so the page and its figures can live in git.
"""
from __future__ import annotations

import datetime as dt
import logging
import sys
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.compare import best, headline, pointwise, units
from analysis.control import SHARE, TIMES, control, hidden_fit, kd_vs_nll
from analysis.render import ANSWER, DEMO_NOTE, answer, demo_labels, make_figures, markdown_table
from analysis.runs import DEMO, EVAL_DATA, LOGITS, METRICS, ROW, read_mlflow, row
from hldx import cli


def _finished(client: MlflowClient, experiments: list[str], where: str) -> list:
    return client.search_runs(experiments, filter_string=f"attributes.status = 'FINISHED' and {where}",
                              max_results=5000)


def teachers(experiment: str, tracking_uri: str | None) -> pd.DataFrame:
    """The teachers the experiment's students read (their tag hldx.teacher), from whichever experiment of the store
    pre-trained them (a teacher is trained once and shared, so a later study finds it built), as rows of runs."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    keys = {r.data.tags["hldx.teacher"] for r in _finished(client, [exp.experiment_id], "tags.`hldx.role` = 'student'")
            if "hldx.teacher" in r.data.tags}
    every = [e.experiment_id for e in client.search_experiments()]
    found = [r for key in sorted(keys) for r in _finished(
        client, every, f"tags.`hldx.role` = 'teacher' and tags.`hldx.run_key` = '{key}'")[:1]]
    return pd.DataFrame([row(r) for r in found], columns=ROW)


def provenance(experiment: str, tracking_uri: str | None) -> dict[str, str]:
    """What the runs say of how they were made: wall time from the first run's start to the last one's end,
    their commits and machines (tags hldx.commit, hldx.machine)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in _finished(client, [exp.experiment_id], "tags.`hldx.role` != 'report'")
            if r.data.tags.get("hldx.role") in ("student", "teacher")]
    start = min(r.info.start_time for r in runs) / 1000
    end = max(r.info.end_time or 0 for r in runs) / 1000
    tags = lambda name: ", ".join(sorted({r.data.tags.get(name, "not logged") for r in runs}))  # noqa: E731
    return {"wall": f"{(end - start) / 60:.1f} minutes", "from": dt.datetime.fromtimestamp(start, dt.timezone.utc)
            .strftime("%Y-%m-%d %H:%M UTC"), "commit": tags("hldx.commit"), "machine": tags("hldx.machine")}


def per_point(runs: pd.DataFrame, points: pd.DataFrame, metric: str = "val_logppl") -> pd.DataFrame:
    """One row per shared point (and KD's teacher logits, where not all top-k): NLL and KD (seed means), KD's margin
    over NLL and the spread, then each HLD variant's improvement over KD (seed means; > 0: better than KD)."""
    table = kd_vs_nll(runs, metric)
    table["point"] = [f"lr={a:g}|tau={b:g}|alpha={c:g}" for a, b, c in zip(table["lr"], table["tau"], table["alpha"])]
    variants = units(points[points["metric"] == metric], "variant")
    variants = variants[variants["method"] != "nll"]
    wide = variants.assign(column=variants["method"].str.upper() + " " + variants["variant"]) \
        .pivot_table(index="point", columns="column", values="improvement").reset_index()
    out = table.merge(wide, on="point", how="left").drop(columns=["student", "point", "seeds"])
    if not out[LOGITS].astype(bool).any():  # every KD run reads the paper's top-k: no column to tell them apart
        out = out.drop(columns=[LOGITS])
    return out.rename(columns={"margin": "KD - NLL", "spread": "seed spread"})


def render(experiment: str, runs: pd.DataFrame, made: dict[str, str], figs: list[tuple[str, Path]],
           folder: str, command: str, seed: int) -> str:
    """The page's markdown."""
    c = control(runs)
    points = pointwise(runs)
    demo = (runs[EVAL_DATA] == DEMO).any()
    labels = demo_labels(METRICS) if demo else {}
    said = answer(headline(points, seed=seed), demo)
    counts = ", ".join(f"{m}: {n}" for m, n in runs.groupby("method", sort=False).size().items())
    parts = [f"# Results: the `{experiment}` study",
             f"*Written by `python -m analysis.page --experiment {experiment}` from the MLflow store; edit the code, "
             "not this page.*",
             "## The answer",
             f"- **The positive control {'holds' if c.holds else 'does not hold'}**: " + "; ".join(c.lines()[:3]) + ".",
             "\n".join(f"- {line}." for line in said) or "- No run paired with KD.",
             ANSWER,
             "## What was run",
             f"- Command: `{command}` ({len(runs)} finished runs: {counts}).",
             f"- Commit: {made['commit']}.",
             f"- Wall time: {made['wall']}, from the first run's start to the last run's end ({made['from']}; "
             "tokenizing before the teacher takes seconds).",
             f"- Machine: {made['machine']}.",
             "## The positive control: KD against NLL at every point",
             f"Seed means; `KD - NLL` is NLL's val_logppl minus KD's (> 0: KD is better); the seed spread is the "
             f"largest range over the seeds of NLL's value, of KD's, and of their seed-paired difference. The control "
             f"holds where the teacher is below every student, KD beats NLL at >= {SHARE:.0%} of the points, and at "
             f"its best point by more than {TIMES:g} x the spread there. HLD columns: each variant's improvement over "
             "KD at the point (seed means; > 0: better than KD).",
             "\n".join(f"- {line}" for line in c.lines()),
             markdown_table(per_point(runs, points)),
             "## Best vs best (Table 1 kind)",
             markdown_table(best(runs).rename(columns=labels).drop(columns=["student"]))]
    if demo:
        parts.append(DEMO_NOTE)
    parts += ["## Pointwise against KD (the paper's figure kinds)"]
    parts += [f"![{caption}]({folder}/{path.name})\n\n*{caption}*" for caption, path in figs]
    fit = hidden_fit(runs)
    parts += ["## The hidden path's fit",
              "HLDF: phase 1's held-out fit, the cosine of the regressor's output with the teacher's hidden state on "
              "the step after phase 1 (rows phase 1 never trains on), at its start and end; HLDC: the hidden loss "
              "(`hidden.loss`) at the first and last step. Means over the runs; `learned`: runs whose fit improved.",
              markdown_table(fit.drop(columns=["student"]))]
    baseline = ("with a KD baseline shown to work (the positive control above), so a tie or a loss of HLD here is "
                "not a broken distillation path" if c.holds else "but its KD baseline is NOT shown to work here (the "
                "positive control above fails), so it says nothing of HLD against a working KD")
    parts += ["## What this study can and cannot show",
              "It runs the paper's protocol end to end (one teacher and one cache, a shared grid, NLL per lr, paired "
              f"seeds, FLOPs-matched budgets, pointwise and best-vs-best comparisons, every figure kind) {baseline}. It "
              "cannot show the paper's result: a teacher of ~2M parameters and students of ~0.5M on 1.6M tokens of "
              "public-domain prose, ~100 optimizer steps a run, two seeds; the downstream columns are the demo's own "
              "tasks built from the corpus's held-out split, on which these students are near the chance rate. "
              "Scale, corpus (C4), teacher (3.4B) and the benchmarks are the paper's; run `+sweep=paper-123m` for "
              "them."]
    return "\n\n".join(parts) + "\n"


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m analysis.page", description=__doc__)
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the study")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or "
                        "sqlite:///mlflow.db)")
    parser.add_argument("--out", type=Path, required=True, help="the page (a .md file); its figures go to the "
                        "folder of its stem beside it")
    parser.add_argument("--command", default=None, help="the command that ran the study, as the page says it "
                        "(default: python -m hldx.run -m +sweep=EXPERIMENT)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = read_mlflow(args.experiment, args.tracking_uri)
    if not (runs["method"] == "teacher").any():  # pre-trained by an earlier study: found where it was logged
        runs = pd.concat([runs, teachers(args.experiment, args.tracking_uri)], ignore_index=True)
    folder = args.out.parent / args.out.stem
    folder.mkdir(parents=True, exist_ok=True)
    demo = (runs[EVAL_DATA] == DEMO).any()
    figs = make_figures(pointwise(runs), folder, demo_labels(METRICS) if demo else {})
    command = args.command or f"python -m hldx.run -m +sweep={args.experiment}"
    args.out.write_text(render(args.experiment, runs, provenance(args.experiment, args.tracking_uri), figs,
                               folder.name, command, args.seed))
    c = control(runs)
    print("\n".join(c.lines()))
    print(f"Page: {args.out} (figures in {folder}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
