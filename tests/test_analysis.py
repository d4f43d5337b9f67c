"""analysis/: runs from MLflow and CSV, pairing against KD, best-vs-best, summary statistics, the CLI."""
from __future__ import annotations

import csv
import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from analysis import report
from analysis.compare import SUMMARY, best, bootstrap_median_ci, headline, pointwise, sign_test, summary
from analysis.control import kd_vs_nll
from analysis.runs import COLUMNS, METRICS, read_csv, read_mlflow

TABLE3 = Path(__file__).parent / "fixtures" / "paper_table3_123m.csv"  # the paper's Table 3 (123M), as printed
TABLE4 = Path(__file__).parent / "fixtures" / "paper_table4_735m.csv"  # its Table 4 (735M), as printed


def log_run(client: MlflowClient, exp_id: str, method: str, lr: float, tau: float | None = None,
            alpha: float | None = None, gamma: float | None = None, p1: float | None = None,
            student: str = "tiny", metrics: dict[str, float] | None = None, status: str = "FINISHED",
            role: str = "student", seed: int = 0, hidden: str | None = None, logits: str | None = None) -> str:
    """A run with hldx's MLflow names (DESIGN.md §3): params, hldx.* tags, eval/* metrics."""
    hp = {"lr": lr, "tau": tau, "alpha": alpha, "gamma": gamma, "p1": p1}
    used = {k: v for k, v in hp.items() if v is not None}
    hp_key = "|".join(f"{k}={used[k]:g}" for k in ("lr", "tau", "alpha") if k in used)
    name = "|".join([method] + [f"{k}={v:g}" for k, v in used.items()] + [x for x in (hidden, logits) if x] +
                    ([f"seed={seed}"] if seed else []))
    tags = {"hldx.method": method, "hldx.student": student, "hldx.hp_key": hp_key,
            "hldx.run_key": f"{student}|{name}", "hldx.role": role}
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    params = [Param(k, str(v)) for k, v in {"method": method, "student": student, "seed": seed, **used}.items()]
    params += [Param("hidden", hidden)] if hidden else []
    params += [Param("logits", logits)] if logits else []
    client.log_batch(run_id, params=params,
                     metrics=[Metric(f"eval/{k}", v, 0, 0) for k, v in (metrics or {}).items()])
    client.set_terminated(run_id, status=status)
    return run_id


def scores(val: float, **others: float) -> dict[str, float]:
    """All seven metrics: val_logppl = val, the others 0.5 unless given."""
    return {m: others.get(m, 0.5) for m in METRICS} | {"val_logppl": val}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised MLflow sqlite store, made once (its schema migration takes seconds) and copied per test."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_exp(tmp_path, empty_store):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))
    return client, exp_id


def frame(rows: list[dict]) -> pd.DataFrame:
    """Runs in the CSV's columns, through the real CSV reader."""
    return pd.DataFrame(rows, columns=COLUMNS)


def via_csv(tmp_path: Path, rows: list[dict]) -> pd.DataFrame:
    path = tmp_path / "runs.csv"
    frame(rows).to_csv(path, index=False)
    return read_csv(path)


# --- reading runs -------------------------------------------------------------------------------------------

def test_read_mlflow_keeps_latest_finished_and_skips_report_runs(mlflow_exp):
    client, exp = mlflow_exp
    log_run(client, exp, "kd", 4e-4, 1.0, 0.7, metrics=scores(3.2))
    latest = log_run(client, exp, "kd", 4e-4, 1.0, 0.7, metrics=scores(3.1))  # same run_key, later
    log_run(client, exp, "hldf", 4e-4, 1.0, 0.7, p1=0.05, metrics=scores(3.0), status="FAILED")
    log_run(client, exp, "hldc", 4e-4, 1.0, 0.7, gamma=0.1, metrics={"val_logppl": 3.05})  # no downstream
    log_run(client, exp, "nll", 4e-4, metrics=scores(3.3))
    log_run(client, exp, "nll", 1e-3, metrics=scores(2.5), role="teacher")
    log_run(client, exp, "kd", 4e-4, 1.0, 0.7, metrics=scores(1.0), role="report")
    runs = read_mlflow("study", client.tracking_uri)
    assert sorted(runs["method"]) == ["hldc", "kd", "nll", "teacher"]
    kd = runs[runs["method"] == "kd"].iloc[0]
    assert (kd["run_id"], kd["val_logppl"], kd["lr"], kd["tau"], kd["alpha"]) == (latest, 3.1, 4e-4, 1.0, 0.7)
    assert math.isnan(kd["gamma"]) and math.isnan(kd["p1"])
    hldc = runs[runs["method"] == "hldc"].iloc[0]
    assert hldc["gamma"] == 0.1 and hldc["val_logppl"] == 3.05 and hldc[METRICS[1:]].isna().all()
    assert runs.loc[runs["method"] == "nll", ["tau", "alpha"]].isna().all(axis=None)


def test_read_mlflow_explains_missing_and_empty_experiments(mlflow_exp):
    client, exp = mlflow_exp
    with pytest.raises(ValueError, match="no experiment named 'nope'"):
        read_mlflow("nope", client.tracking_uri)
    with pytest.raises(ValueError, match="no FINISHED runs"):
        read_mlflow("study", client.tracking_uri)
    log_run(client, exp, "kd", 4e-4, 1.0, 0.7, metrics=scores(3.0), status="KILLED")
    with pytest.raises(ValueError, match=r"no FINISHED runs .*1 run"):
        read_mlflow("study", client.tracking_uri)


def test_read_csv_normalises_method_and_names_bad_input(tmp_path):
    runs = read_csv(TABLE3)
    assert len(runs) == 63 and set(runs["method"]) == {"nll", "kd", "hldc", "hldf"}
    assert runs.loc[runs["method"] == "nll", ["tau", "alpha", "gamma", "p1"]].isna().all(axis=None)
    bad = tmp_path / "bad.csv"
    bad.write_text("student,method,lr\ntiny,kd,0.1\n")
    with pytest.raises(ValueError, match="missing column.*'tau'"):
        read_csv(bad)
    pd.DataFrame([{**{c: "" for c in COLUMNS}, "method": "KD", "lr": "fast"}]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="column 'lr' holds a non-number 'fast'"):
        read_csv(bad)
    pd.DataFrame([{**{c: "" for c in COLUMNS}, "method": "dpo", "lr": "1"}]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['dpo'\]"):
        read_csv(bad)


# --- the paper's Table 3 (123M): outcomes the paper states in its text and Table 1 ----------------------------

def test_best_vs_best_on_table3_matches_table1():
    table = best(read_csv(TABLE3)).set_index("method")
    kd = table.loc["kd"]
    assert (kd["lr"], kd["tau"], kd["alpha"]) == (0.0016, 1.0, 0.7)
    # Table 1, 123M column of each row (HLDF's HellaSwag .626 and NLL's .644 there differ from Table 3's runs).
    expected = {"kd": [3.005, 2.984, .622, .321, .505, .433, .513],
                "hldc": [3.005, 2.938, .630, .323, .505, .423, .505],
                "hldf": [3.000, 2.875, None, .322, .519, .437, .507],
                "nll": [3.063, None, None, None, .529, .440, .527]}
    order = ["val_logppl", "wikitext_logppl", "hellaswag_err", "piqa_err", "arc_easy_err", "winogrande_err",
             "lambada_err"]  # Table 1's column order
    for method, values in expected.items():
        for metric, value in zip(order, values):
            if value is not None:
                assert table.loc[method, metric] == pytest.approx(value), (method, metric)
    random = table.loc["random", ["hellaswag_err", "piqa_err", "arc_easy_err", "winogrande_err", "lambada_err"]]
    assert random.tolist() == pytest.approx([0.75, 0.5, 0.75, 0.5, 1.0])  # Table 1's Random row
    assert math.isnan(table.loc["random", "val_logppl"])


def test_pointwise_on_table3_reproduces_the_papers_claims():
    points = pointwise(read_csv(TABLE3))
    stats = summary(points, n_boot=2000).set_index(["view", "method", "variant", "metric"])
    assert points["paired"].all()
    # The independent units: 12 points per HLD variant (both gammas, both p1) and per HLD method, 3 lr for NLL.
    assert stats["n"].to_dict() == {k: 3 if k[1] == "nll" else 12 for k in stats.index}
    for view, variant in [("variant", "p1=0.01"), ("variant", "p1=0.05"), ("point", "")]:
        hldf = stats.loc[(view, "hldf", variant, "val_logppl")]  # "modest but systematic improvement"
        assert hldf["improve"] >= 11 and hldf["ci_low"] > 0 and hldf["sign_p"] < 0.01, variant
    hldc = stats.loc[("point", "hldc", "", "val_logppl")]  # "HLDC matches KD" (to within 0.001)
    assert abs(hldc["median_improvement"]) <= 0.001 and hldc["improve"] == 0
    nll = stats.loc[("point", "nll", "", "val_logppl")]  # "roughly half of KD runs fail to beat NLL"
    assert (nll["improve"], nll["worsen"]) == (2, 1)
    for metric in METRICS[2:]:  # "downstream results show KD outperforming NLL on nearly all points"
        assert stats.loc[("point", "nll", "", metric), "worsen"] == 3, metric
    # Fig. 1's signs: HLDF's val log-ppl improvements mostly positive, HLDC's none.
    val = points[points["metric"] == "val_logppl"]
    assert (val.loc[val["method"] == "hldf", "improvement"] > 0).mean() > 0.9
    assert (val.loc[val["method"] == "hldc", "improvement"] > 0).sum() == 0
    # Two gammas and two p1 at each point: the per-variant and the per-point views differ, both are shown.
    headings = [part for part in report._views(summary(points, n_boot=200)) if part.startswith("###")]
    assert [h.split(" (")[0] for h in headings] == ["### Per variant", "### Per point"]


def test_the_headline_on_the_papers_tables_3_and_4_says_what_its_text_says():
    """The report's opening lines on the paper's runs of both students: HLDF beats KD on C4 log-perplexity ("a
    modest but systematic improvement": the interval above 0), HLDC is KD's equal there to within 0.001 (at 123M
    never ahead and 0.001 behind at the median, an interval below 0: "worse", by a tenth of HLDF's gain),
    downstream neither moves the mean error rate ("roughly centered around zero"), and KD beats NLL downstream
    at both sizes. One seed per run: no seed spread to compare against."""
    runs = pd.concat([read_csv(TABLE3), read_csv(TABLE4)], ignore_index=True)
    rows = headline(pointwise(runs), n_boot=2000).set_index(["student", "method", "family"])
    verdicts = {(student, method, family): "tied" for student in ("gemma3-123m", "gemma3-735m")
                for method in ("nll", "hldc", "hldf") for family in ("val", "downstream")}
    verdicts |= {(s, "hldf", "val"): "better" for s in ("gemma3-123m", "gemma3-735m")}
    verdicts |= {(s, "nll", "downstream"): "worse" for s in ("gemma3-123m", "gemma3-735m")}
    verdicts[("gemma3-123m", "hldc", "val")] = "worse"
    assert rows["verdict"].to_dict() == verdicts
    assert set(rows["n"]) == {3, 12} and (rows["seeds"] == 1).all() and rows["beyond_seeds"].isna().all()
    # The medians, from the CSVs by hand: a point's improvement averaged over its variants (and, downstream,
    # over the five error rates), the median over the points.
    for (student, method, family), row in rows.iterrows():
        table = [r for path in (TABLE3, TABLE4) for r in csv.DictReader(open(path)) if r["student"] == student]
        metrics = ["val_logppl"] if family == "val" else [f"{t}_err" for t in
                                                           ("hellaswag", "piqa", "arc_easy", "winogrande", "lambada")]
        score = {}
        for r in table:
            point = (r["lr"],) if method == "nll" else (r["lr"], r["tau"], r["alpha"])
            score.setdefault((r["method"], point[:1] if r["method"] == "KD" and method == "nll" else point),
                             []).append(np.mean([float(r[m]) for m in metrics]))
        units = [np.mean(score[("KD", point)]) - np.mean(values) for (m, point), values in score.items()
                 if m == method.upper()]
        assert row["median_improvement"] == pytest.approx(np.median(units)), (student, method, family)
        assert row["ci_low"] <= row["median_improvement"] <= row["ci_high"]
    lines = report.answer(rows.reset_index())
    assert len(lines) == 12 and lines[4].startswith("gemma3-123m HLDF vs KD, val_logppl: better, median +0.0090 [")
    assert lines[4].endswith("over 12 points; one seed: its spread unknown")


def test_the_point_is_the_unit_not_the_run(tmp_path):
    """8 points, each with two HLDF variants that both beat KD: 8 independent signs, sign_p = 2 / 2^8 = 0.0078
    (pooling the 16 runs would claim 2 / 2^16 = 3.1e-5)."""
    rows = []
    for i in range(8):
        point = {"student": "s", "lr": 1e-4 * (i + 1), "tau": 1.0, "alpha": 0.7}
        rows += [{**point, "method": "kd", **scores(3.0)}] + [
            {**point, "method": "hldf", "p1": p1, **scores(2.99 - 0.001 * i)} for p1 in (0.01, 0.05)]
    stats = summary(pointwise(via_csv(tmp_path, rows)), n_boot=200).set_index(["view", "method", "variant", "metric"])
    for unit in [("point", "hldf", ""), ("variant", "hldf", "p1=0.01"), ("variant", "hldf", "p1=0.05")]:
        row = stats.loc[(*unit, "val_logppl")]
        assert (row["n"], row["improve"]) == (8, 8) and row["sign_p"] == pytest.approx(2 / 2**8), unit
        assert 2 / 2**8 == pytest.approx(0.0078, abs=1e-4)


def test_seeds_pair_with_the_kd_run_of_their_seed_and_are_averaged(tmp_path):
    """Two seeds at one point: each HLDC seed against the KD run of its seed; the point counts once, its
    improvement the mean over seeds and their spread the between-seed standard deviation."""
    point = {"student": "s", "lr": 4e-4, "tau": 1.0, "alpha": 0.7}
    rows = [{**point, "method": "kd", "seed": 0, **scores(3.0)}, {**point, "method": "kd", "seed": 1, **scores(3.2)},
            {**point, "method": "hldc", "gamma": 0.1, "seed": 0, **scores(2.9)},
            {**point, "method": "hldc", "gamma": 0.1, "seed": 1, **scores(3.15)}]
    path = tmp_path / "runs.csv"
    pd.DataFrame(rows, columns=COLUMNS + ["seed"]).to_csv(path, index=False)
    points = pointwise(read_csv(path))
    val = points[points["metric"] == "val_logppl"].set_index("seed")
    assert val["improvement"].to_dict() == pytest.approx({0: 0.1, 1: 0.05})  # 3.0 - 2.9 and 3.2 - 3.15
    row = summary(points, n_boot=200).set_index(["view", "metric"]).loc[("point", "val_logppl")]
    assert (row["n"], row["seeds"]) == (1, 2) and row["median_improvement"] == pytest.approx(0.075)
    assert row["seed_sd"] == pytest.approx(np.std([0.1, 0.05], ddof=1))
    (line,) = headline(points, n_boot=200).query("family == 'val'").itertuples()
    assert (line.verdict, line.n, line.beyond_seeds) == ("better", 1, True)  # 0.075 beyond a spread of 0.035
    assert report.answer(headline(points, n_boot=200))[0].endswith(
        "(one point: no interval) over 1 point; beyond the seed spread (0.035)")


def test_hidden_paths_are_variants_beside_gamma_and_p1(mlflow_exp):
    """HLD runs with layer pairs (the param `hidden`, logged where the hidden path is not the paper's) are variants
    of their own beside gamma= / p1=, each compared with the KD run of its point and seed; runs logged without the
    param (every run before pairs existed) keep their variant."""
    client, exp = mlflow_exp
    for seed, shift in ((0, 0.0), (1, 0.2)):
        for method, hp, hidden, val in (("kd", {}, None, 3.0), ("hldc", {"gamma": 0.1}, None, 2.95),
                                        ("hldc", {"gamma": 0.1}, "pairs=[[1,2],[3,5]]", 3.1),
                                        ("hldf", {"p1": 0.05}, "pairs=[[3,5]]", 2.9)):
            log_run(client, exp, method, 4e-4, 1.0, 0.7, **hp, metrics=scores(val + shift), seed=seed, hidden=hidden)
    points = pointwise(read_mlflow("study", client.tracking_uri))
    val = points[points["metric"] == "val_logppl"]
    assert val.groupby("variant")["improvement"].mean().round(6).to_dict() == {
        "gamma=0.1": 0.05, "gamma=0.1|pairs=[[1,2],[3,5]]": -0.1, "p1=0.05|pairs=[[3,5]]": 0.1}
    assert val["paired"].all()
    stats = summary(points, n_boot=200).set_index(["view", "method", "variant", "metric"])
    assert stats.loc[("point", "hldc", "", "val_logppl"), "median_improvement"] == pytest.approx(-0.025)


def test_sampled_logits_are_a_variant_compared_with_the_kd_run_that_reads_them(mlflow_exp):
    """Runs from sampled teacher logits (the param `logits`, logged where they are not top-k) pair with the KD run
    of their point, seed and logits: an HLDC run from sampled logits with KD from sampled logits, NLL with each KD
    as a variant; the positive control has a row per KD logits."""
    client, exp = mlflow_exp
    sampled = "logits=sampled(12,[0.5,1,2])"
    for method, hp, logits, val in (("nll", {}, None, 3.3), ("kd", {"tau": 1.0, "alpha": 0.7}, None, 3.0),
                                    ("kd", {"tau": 1.0, "alpha": 0.7}, sampled, 2.8),
                                    ("hldc", {"tau": 1.0, "alpha": 0.7, "gamma": 0.1}, None, 2.95),
                                    ("hldc", {"tau": 1.0, "alpha": 0.7, "gamma": 0.1}, sampled, 2.9)):
        log_run(client, exp, method, 4e-4, **hp, metrics=scores(val), logits=logits)
    runs = read_mlflow("study", client.tracking_uri)
    val = pointwise(runs)
    val = val[val["metric"] == "val_logppl"]
    assert val["paired"].all()
    assert val.set_index(["method", "variant"])["improvement"].round(6).to_dict() == {
        ("hldc", "gamma=0.1"): 0.05, ("hldc", f"gamma=0.1|{sampled}"): -0.1,
        ("nll", ""): -0.3, ("nll", sampled): -0.5}
    table = kd_vs_nll(runs).set_index("logits")
    assert table["margin"].round(6).to_dict() == {"": 0.3, sampled: 0.5}


def test_ties_counted_from_the_printed_table():
    """Ties = cells printed identically for a run and its KD partner, counted here from the raw text."""
    with open(TABLE3) as fh:
        rows = list(csv.DictReader(fh))
    kd = {(r["lr"], r["tau"], r["alpha"]): r for r in rows if r["method"] == "KD"}
    stats = summary(pointwise(read_csv(TABLE3)), n_boot=200)
    stats = stats[stats["view"] == "variant"].groupby(["method", "metric"])[["tie", "improve"]].sum()
    for method, metric in itertools.product(["HLDC", "HLDF"], METRICS):
        runs = [r for r in rows if r["method"] == method]
        ties = sum(r[metric] == kd[r["lr"], r["tau"], r["alpha"]][metric] for r in runs)
        better = sum(float(r[metric]) < float(kd[r["lr"], r["tau"], r["alpha"]][metric]) for r in runs)
        assert stats.loc[(method.lower(), metric), ["tie", "improve"]].tolist() == [ties, better], (method, metric)
    assert stats.loc[("hldc", "val_logppl"), "tie"] > 0  # the table does have ties to count


# --- pairing and missing data -------------------------------------------------------------------------------

def test_pairing_rules_and_missing_data(tmp_path):
    point = {"student": "s", "lr": 4e-4, "tau": 1.0, "alpha": 0.7}
    runs = via_csv(tmp_path, [
        {**point, "method": "KD", **scores(3.0)},
        {**point, "alpha": 0.9, "method": "kd", **scores(3.1)},
        {**point, "method": "HLDF", "p1": 0.05, **scores(2.9, piqa_err=0.6)},
        {**point, "method": "hldc", "gamma": 0.1, "val_logppl": 3.0},  # downstream metrics missing
        {**point, "tau": 0.5, "method": "hldc", "gamma": 0.1, **scores(3.0)},  # no KD at tau=0.5
        {"student": "s", "lr": 4e-4, "method": "nll", **scores(3.05)},
        {"student": "s", "lr": 1e-3, "method": "nll", **scores(3.05)},  # no KD at this lr
    ])
    points = pointwise(runs)
    val = points[points["metric"] == "val_logppl"].set_index(["method", "lr", "tau", "alpha"])
    assert val.loc[("hldf", 4e-4, 1.0, 0.7), "improvement"] == pytest.approx(0.1)
    nll = points[(points["method"] == "nll") & (points["lr"] == 4e-4) & (points["metric"] == "val_logppl")]
    assert sorted(nll["alpha"]) == [0.7, 0.9] and nll["improvement"].tolist() == pytest.approx([-0.05, 0.05])
    unpaired = points[~points["paired"]]
    assert set(zip(unpaired["method"], unpaired["lr"])) == {("hldc", 4e-4), ("nll", 1e-3)}
    assert len(unpaired) == 2 * len(METRICS) and unpaired["kd_score"].isna().all()
    hldc = points[(points["method"] == "hldc") & points["paired"]].set_index("metric")
    assert hldc.loc["val_logppl", "improvement"] == 0.0 and hldc.loc[METRICS[1:], "improvement"].isna().all()
    stats = summary(points, n_boot=200)
    stats = stats[stats["view"] == "point"].set_index(["method", "metric"])
    assert stats.loc[("hldc", "val_logppl"), ["n", "tie"]].tolist() == [1, 1]
    assert ("hldc", "piqa_err") not in stats.index  # no unit: no row
    assert stats.loc[("hldf", "piqa_err"), ["improve", "worsen"]].tolist() == [0, 1]
    nll = stats.loc[("nll", "val_logppl")]  # once for its lr: against the mean of the two KD runs there
    assert nll["n"] == 1 and nll["median_improvement"] == pytest.approx(0.0, abs=1e-12)
    assert best(runs).set_index("method").loc["kd", "alpha"] == 0.7


def test_ties_survive_mlflow_at_logged_precision(mlflow_exp):
    client, exp = mlflow_exp
    f32 = float(np.float32(3.005))  # 3.0050001144..., as a float32 evaluation would log it
    log_run(client, exp, "kd", 4e-4, 1.0, 0.7, metrics=scores(f32))
    log_run(client, exp, "hldc", 4e-4, 1.0, 0.7, gamma=0.1, metrics=scores(f32))
    log_run(client, exp, "hldf", 4e-4, 1.0, 0.7, p1=0.05, metrics=scores(3.005))
    stats = summary(pointwise(read_mlflow("study", client.tracking_uri)), n_boot=200)
    stats = stats[stats["view"] == "point"].set_index(["method", "metric"])
    assert stats.loc[("hldc", "val_logppl"), ["tie", "improve", "worsen"]].tolist() == [1, 0, 0]
    assert stats.loc[("hldf", "val_logppl"), ["tie", "improve", "worsen"]].tolist() == [0, 1, 0]


# --- statistics against independent computations --------------------------------------------------------------

@pytest.mark.parametrize("improve,worsen", [(0, 0), (1, 0), (3, 3), (7, 2), (0, 9), (11, 1), (5, 8)])
def test_sign_test_matches_enumeration(improve, worsen):
    """p = share of all 2^n equally likely sign patterns at least as uneven as the observed one."""
    n = improve + worsen
    observed = abs(improve - worsen)
    extreme = sum(abs(2 * sum(signs) - n) >= observed for signs in itertools.product([0, 1], repeat=n))
    assert sign_test(improve, worsen) == pytest.approx(extreme / 2**n)


def test_bootstrap_ci_covers_the_true_median():
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(200):
        x_N = rng.normal(loc=2.0, scale=1.0, size=41)  # true median 2.0
        low, high = bootstrap_median_ci(x_N, seed=trial, n_boot=1000)
        assert low <= np.median(x_N) <= high
        hits += low <= 2.0 <= high
    assert 0.88 <= hits / 200 <= 0.99
    x_N = rng.normal(size=30)
    assert bootstrap_median_ci(x_N, seed=3) == bootstrap_median_ci(x_N, seed=3)
    assert bootstrap_median_ci(np.full(5, 0.25)) == (0.25, 0.25)


# --- the command line -----------------------------------------------------------------------------------------

def test_cli_writes_report_and_logs_summary_run(mlflow_exp, tmp_path, capsys):
    client, exp = mlflow_exp
    ids = {}
    for lr, val in [(4e-4, 3.1), (1.6e-3, 3.0)]:
        ids["kd", lr] = log_run(client, exp, "kd", lr, 1.0, 0.7, metrics=scores(val))
        ids["hldc", lr] = log_run(client, exp, "hldc", lr, 1.0, 0.7, gamma=0.1, metrics=scores(val + 0.01))
        ids["hldf", lr] = log_run(client, exp, "hldf", lr, 1.0, 0.7, p1=0.05, metrics=scores(val - 0.01, piqa_err=0.6))
        ids["nll", lr] = log_run(client, exp, "nll", lr, metrics=scores(val + 0.05))
    out = tmp_path / "report"
    args = ["--experiment", "study", "--tracking-uri", client.tracking_uri, "--out", str(out)]
    assert report.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    # It opens with the answer: a line per compared method and metric family; the tables are in report.md.
    assert printed[:7] == ["The answer (8 finished runs; improvement over KD, > 0: better):",
                           "  tiny NLL vs KD, val_logppl: worse, median -0.0500 [-0.0500, -0.0500] over 2 points; "
                           "one seed: its spread unknown",
                           "  tiny NLL vs KD, downstream (mean error of 5 tasks): tied, median +0.0000 [+0.0000, "
                           "+0.0000] over 2 points; one seed: its spread unknown",
                           "  tiny HLDC vs KD, val_logppl: worse, median -0.0100 [-0.0100, -0.0100] over 2 points; "
                           "one seed: its spread unknown",
                           "  tiny HLDC vs KD, downstream (mean error of 5 tasks): tied, median +0.0000 [+0.0000, "
                           "+0.0000] over 2 points; one seed: its spread unknown",
                           "  tiny HLDF vs KD, val_logppl: better, median +0.0100 [+0.0100, +0.0100] over 2 points; "
                           "one seed: its spread unknown",
                           "  tiny HLDF vs KD, downstream (mean error of 5 tasks): worse, median -0.0200 [-0.0200, "
                           "-0.0200] over 2 points; one seed: its spread unknown"], printed
    assert not any(line.startswith("|") for line in printed) and "summary run" in printed[-3]
    text = (out / "report.md").read_text()
    assert text.index("## The answer") < text.index("## Best vs best") and printed[6][2:] in text
    # Each point has one variant of each method: the per-variant view is the per-point view, shown once.
    assert "### Per variant" not in text and text.count("| tiny | hldf | p1=0.05 | val_logppl | 2 | 2 | 0 | 0 |") == 1
    assert pd.read_csv(out / "summary.csv").columns.tolist() == SUMMARY
    assert pd.read_csv(out / "best.csv").columns.tolist() == COLUMNS
    assert len(pd.read_csv(out / "pointwise.csv")) == 3 * 2 * len(METRICS)
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == ["fig1_val_logppl_hist.png", "fig2_downstream_hist_tiny.png",
                       "fig5_val_logppl_scatter.png", "fig6_downstream_scatter_tiny.png"]
    assert all(f"]({name})" in text for name in figures)
    [summary_run] = client.search_runs([exp], filter_string="tags.`hldx.role` = 'report'")
    logged = {a.path for a in client.list_artifacts(summary_run.info.run_id)}
    assert logged == {p.name for p in out.iterdir()}
    assert len(read_mlflow("study", client.tracking_uri)) == 8  # the summary run is not read back
    # Each compared run carries its comparison, KD's value minus its own, and its partner's id.
    for (method, lr), delta in {("hldf", 4e-4): 0.01, ("hldc", 4e-4): -0.01, ("nll", 1.6e-3): -0.05}.items():
        run = client.get_run(ids[method, lr])
        assert run.data.metrics["vs_kd/eval/val_logppl"] == pytest.approx(delta), method
        assert run.data.tags["hldx.kd_run"] == ids["kd", lr]
    assert "vs_kd/eval/val_logppl" not in client.get_run(ids["kd", 4e-4]).data.metrics
    assert "Pointwise against KD" in client.get_experiment(exp).tags["mlflow.note.content"]  # the experiment's note


def test_cli_exits_2_on_empty_experiment(mlflow_exp, tmp_path, capsys):
    """Bad input, as every entry point reports it: one line, exit status 2 (issue 11 made 1 into 2)."""
    client, _ = mlflow_exp
    assert report.main(["--experiment", "study", "--tracking-uri", client.tracking_uri,
                        "--out", str(tmp_path / "r")]) == 2
    assert "no FINISHED runs" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(COLUMNS) + "\n")
    assert report.main(["--runs-csv", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "no runs" in capsys.readouterr().err


def test_a_random_row_without_values_is_dropped_and_demo_columns_are_labelled(tmp_path, capsys):
    """Offline runs with val_logppl alone: no chance rate left to show; runs on the demo's tasks: (demo)."""
    rows = [{"student": "tiny", "method": m, "lr": 1e-3, "tau": t, "alpha": a, "val_logppl": v}
            for m, t, a, v in [("kd", 1, 0.7, 3.1), ("hldf", 1, 0.7, 3.0)]]
    frame([{**r, "p1": 0.05} for r in rows]).to_csv(tmp_path / "runs.csv", index=False)
    assert report.main(["--runs-csv", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "a")]) == 0
    assert list(pd.read_csv(tmp_path / "a" / "best.csv")["method"]) == ["kd", "hldf"]
    demo = [{**r, "p1": 0.05, **scores(r["val_logppl"]), "eval_data": "demo"} for r in rows]
    pd.DataFrame(demo, columns=[*COLUMNS, "eval_data"]).to_csv(tmp_path / "demo.csv", index=False)
    assert report.main(["--runs-csv", str(tmp_path / "demo.csv"), "--out", str(tmp_path / "b")]) == 0
    assert list(pd.read_csv(tmp_path / "b" / "best.csv")["method"]) == ["random", "kd", "hldf"]
    text = (tmp_path / "b" / "report.md").read_text()
    assert report.DEMO_NOTE in text and "| val_logppl | wikitext_logppl (demo) |" in text
    assert report.DEMO_NOTE in capsys.readouterr().out
