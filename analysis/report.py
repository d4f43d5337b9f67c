"""`python -m analysis.report`: the study's tables and figures from an MLflow experiment (or a CSV of runs),
written to a folder and logged back to MLflow as the artifacts of a summary run (tag hldx.role=report)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from analysis.compare import best, headline, pointwise, summary
from analysis.render import ANSWER, DEMO_NOTE, answer, demo_labels, make_figures, markdown_table
from analysis.runs import DEMO, EVAL_DATA, HPARAMS, METRICS, RUN_ID, read_csv, read_mlflow
from hldx import cli
from hldx.errors import BadInput

VIEW = "hldx-pointwise"  # the MLflow UI's shared view of the runs table (experiment tag mlflow.sharedViewState.VIEW)


def _best_per_student(table: pd.DataFrame) -> pd.DataFrame:
    """True where a student's run has the lowest value of a metric among that student's methods (Table 1)."""
    bold = pd.DataFrame(False, index=table.index, columns=table.columns)
    students = ~table["method"].isin(["random", "teacher"])
    for m in [m for m in METRICS if m in table]:
        low = table[students].groupby("student")[m].transform("min")
        bold.loc[low.index, m] = table.loc[low.index, m] == low
    return bold


def render(source: str, runs: pd.DataFrame, best_df: pd.DataFrame, points: pd.DataFrame,
           summary_df: pd.DataFrame, figs: list[tuple[str, Path]], select_on: str, absent: list[str],
           said: list[str]) -> str:
    """report.md: the answer (`said`), then tables and figures in reading order."""
    counts = ", ".join(f"{m}: {n}" for m, n in runs.groupby("method", sort=False).size().items())
    parts = [f"# Report: {source}", f"{len(runs)} finished runs ({counts}).", "## The answer", ANSWER,
             "\n".join(f"- {line}" for line in said) or "No method could be compared with KD.",
             "All metrics are lower-is-better; improvement = KD's score - the method's score (> 0: better "
             "than KD)."]
    if absent:
        parts.append(_absent(absent))
    if (runs[EVAL_DATA] == DEMO).any():
        parts.append(DEMO_NOTE)
    parts += ["## Best vs best (Table 1 kind)",
             f"Per (student, method) the run with the lowest {select_on} (selected on that split"
             f"{', as the paper does' if select_on == 'val_logppl' else ''}; `--select-on` chooses); bold: best "
             "of a student.",
             markdown_table(best_df, _best_per_student(best_df)),
             "## Pointwise against KD at shared (lr, tau, alpha)",
             "HLDC/HLDF runs pair with the KD run of their point and seed; NLL with the KD runs of its lr and "
             "seed, compared once per lr against their mean. The statistics count independent units only: "
             "seeds are averaged within a unit (seeds, seed_sd: their number and between-seed standard "
             "deviation), and the sign test and the bootstrap run over the units. Ties (equal as logged) are "
             "neither improvements nor losses; median with a 95% bootstrap interval; two-sided exact sign test "
             "over the non-tied units.",
             *_views(summary_df)]
    parts += [f"![{caption}]({path.name})\n\n*{caption}*" for caption, path in figs]
    if not figs:
        parts.append("No paired points: no figures (a compared run needs a KD run at its point).")
    unpaired = points.loc[~points["paired"], ["student", "method", *HPARAMS, RUN_ID]]
    if len(unpaired):
        parts += ["## Unpaired runs", "No KD run at their point; listed in pointwise.csv with empty KD columns.",
                  markdown_table(unpaired.drop_duplicates().reset_index(drop=True))]
    parts += ["## Files", "`best.csv` (Table 1), `pointwise.csv` (one row per compared run, KD partner and metric), "
              "`summary.csv` (the table above).",
              "## Browsing pointwise in the MLflow UI",
              "Open the experiment's runs table, choose *Group by* and the tag `hldx.hp_key`: each group is one "
              "shared (lr, tau, alpha) point with its KD, HLDC and HLDF runs; NLL runs group by `lr=...` alone."]
    return "\n\n".join(parts) + "\n"


def _absent(metrics: list[str]) -> str:
    return (f"Left out: {', '.join(metrics)}: no run has them (their evaluations were skipped, see each run's "
            "hldx.eval_skipped.* tags; `python -m hldx.evaluate` adds them later).")


def _view(summary_df: pd.DataFrame, view: str) -> pd.DataFrame:
    return summary_df[summary_df["view"] == view].drop(columns="view").reset_index(drop=True)


def _views(summary_df: pd.DataFrame) -> list[str]:
    """The pointwise views' headings and tables; the per-variant one alone where every point has a single
    variant of each method (the per-point view then repeats it line for line)."""
    variant, point = _view(summary_df, "variant"), _view(summary_df, "point")
    if variant.drop(columns="variant").equals(point.drop(columns="variant")):
        return ["### Per point (unit: a point; each has one variant of each method, so the per-variant view is "
                "the same)", markdown_table(variant)]
    return ["### Per variant (unit: a point, for each gamma of HLDC and each p1 of HLDF apart, and each hidden path "
            "that is not the paper's: pairs=..., weights=..., adapter=...)",
            markdown_table(variant), "### Per point (unit: a point, its variants averaged)", markdown_table(point)]


def log_report(out: Path, experiment: str, tracking_uri: str | None, note: str,
               metrics: list[str]) -> tuple[str, str]:
    """Log `out` as the artifacts of a new summary run (tag hldx.role=report), `note` as the experiment's
    description (MLflow's note) and the runs table's shared view VIEW (`view_state`); returns (experiment_id,
    run_id)."""
    client = MlflowClient(tracking_uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(exp_id, run_name="report", tags={"hldx.role": "report", "mlflow.note.content": note})
    client.log_artifacts(run.info.run_id, str(out))
    client.set_terminated(run.info.run_id)
    client.set_experiment_tag(exp_id, "mlflow.note.content", note)
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW}", json.dumps(view_state(metrics)))
    return exp_id, run.info.run_id


def view_state(metrics: list[str]) -> dict:
    """The MLflow UI's runs-table state (as its Share button saves it, MLflow 3.x): the columns vs_kd/eval/val_logppl
    and eval/<metric>, the method and role tags, sorted by vs_kd/eval/val_logppl (best first)."""
    column = "metrics.`{}`".format
    columns = [column("vs_kd/eval/val_logppl"), *(column(f"eval/{m}") for m in metrics),
               "tags.`hldx.method`", "tags.`hldx.role`", "tags.`hldx.hp_key`", "params.`seed`"]
    return {"selectedColumns": columns, "orderByKey": column("vs_kd/eval/val_logppl"), "orderByAsc": False,
            "searchFilter": "tags.`hldx.role` != 'report'"}


def log_vs_kd(points: pd.DataFrame, tracking_uri: str | None) -> int:
    """Into every paired run: vs_kd/eval/<metric> (KD's value minus its own; NLL: against the mean of its KD
    runs) and the tag hldx.kd_run. Returns how many runs were written."""
    client = MlflowClient(tracking_uri)
    paired = points[points["paired"] & (points[RUN_ID] != "")].dropna(subset=["improvement"])
    now = int(time.time() * 1000)
    for run_id, group in paired.groupby(RUN_ID, sort=False):
        vs = group.groupby("metric", sort=False)["improvement"].mean()
        client.log_batch(run_id, metrics=[Metric(f"vs_kd/eval/{m}", float(v), now, 0) for m, v in vs.items()],
                         tags=[RunTag("hldx.kd_run", ",".join(sorted(set(group["kd_run_id"]))))])
    return paired[RUN_ID].nunique()


def _mlflow_command() -> str:
    """mlflow's command beside this Python (a virtual environment's, e.g. .venv/bin/mlflow), else `mlflow`."""
    beside = Path(sys.executable).parent / "mlflow"
    return os.path.relpath(beside) if beside.is_file() else "mlflow"


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m analysis.report", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", help="MLflow experiment of the study")
    src.add_argument("--runs-csv", type=Path, help="CSV of runs in analysis.runs.COLUMNS instead of MLflow")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or "
                        "sqlite:///mlflow.db)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSVs, figures and report.md")
    parser.add_argument("--no-log", action="store_true", help="do not log the report back to MLflow")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--select-on", default="val_logppl", choices=METRICS,
                        help="the metric best-vs-best selects each method's run on (default, as the paper: "
                        "val_logppl); the table reports every metric of that run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    if args.runs_csv and not args.runs_csv.is_file():
        raise BadInput(f"--runs-csv {args.runs_csv} is invalid: expected a CSV file of runs")
    runs = read_csv(args.runs_csv) if args.runs_csv else read_mlflow(args.experiment, args.tracking_uri)
    args.out.mkdir(parents=True, exist_ok=True)
    absent = [m for m in METRICS if runs[m].isna().all()]
    if args.select_on in absent:
        raise BadInput(f"--select-on {args.select_on} is invalid: no run has that metric")
    best_df, points = best(runs, args.select_on).drop(columns=absent), pointwise(runs)
    if best_df.loc[best_df["method"] == "random", [m for m in METRICS if m in best_df]].isna().all(axis=None):
        best_df = best_df[best_df["method"] != "random"].reset_index(drop=True)  # no chance rate left to show
    points = points[~points["metric"].isin(absent)].reset_index(drop=True)
    summary_df = summary(points, seed=args.seed)
    demo = (runs[EVAL_DATA] == DEMO).any()
    said = answer(headline(points, seed=args.seed), demo)
    best_df.to_csv(args.out / "best.csv", index=False)
    points.to_csv(args.out / "pointwise.csv", index=False)
    summary_df.to_csv(args.out / "summary.csv", index=False)
    labels = demo_labels(METRICS) if demo else {}  # shown: tables, figures; the CSVs keep the metric names
    shown_best, shown_summary = best_df.rename(columns=labels), summary_df.replace({"metric": labels})
    figs = make_figures(points, args.out, labels)
    source = f"experiment {args.experiment}" if args.experiment else f"{args.runs_csv}"
    (args.out / "report.md").write_text(render(source, runs, shown_best, points, shown_summary, figs,
                                               args.select_on, absent, said))
    print(f"The answer ({len(runs)} finished runs; improvement over KD, > 0: better):")
    print("\n".join(f"  {line}" for line in said) or "  no method could be compared with KD")
    if absent:
        print(_absent(absent))
    if demo:
        print(DEMO_NOTE)
    unpaired = len(points.loc[~points["paired"], ["student", "method", *HPARAMS, RUN_ID]].drop_duplicates())
    if unpaired:
        print(f"{unpaired} run(s) without a KD partner: see report.md")
    print(f"Done in {time.perf_counter() - start:.1f} s\n")
    print(f"Report:  {args.out / 'report.md'} (tables: best.csv, pointwise.csv, summary.csv)")
    if figs:
        print(f"Figures: {', '.join(str(path) for _, path in figs)}")
    if args.experiment and not args.no_log:
        note = (f"{DEMO_NOTE}\n\n" if demo else "") + "The answer\n\n" + "\n".join(f"- {line}" for line in said) + \
            f"\n\nBest vs best\n\n{markdown_table(shown_best)}\n\nPointwise against KD\n\n{markdown_table(shown_summary)}"
        shown = [m for m in METRICS if m not in absent]
        exp_id, run_id = log_report(args.out, args.experiment, args.tracking_uri, note, shown)
        written = log_vs_kd(points, args.tracking_uri)
        uri = args.tracking_uri or mlflow.get_tracking_uri()
        view = f"#/experiments/{exp_id}/runs?viewStateShareKey={VIEW}"
        print(f"MLflow:  experiment {args.experiment!r} ({len(runs)} runs, vs_kd/eval/* in {written}; summary run "
              f"'report' {run_id})")
        if uri.startswith("http"):
            print(f"         open {uri}/{view}")
        else:
            print(f"         {_mlflow_command()} ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{view}")
        print("         (the runs table with vs_kd/eval/val_logppl and eval/* as columns, best first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
