"""analysis/control.py: the positive control (KD against NLL per point, beside the seed spread) and the hidden
path's fit, against counts made by hand from the paper's Table 3 and a small study written out here."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.control import control, hidden_fit, kd_vs_nll
from analysis.runs import COLUMNS, HIDDEN, LOGITS, read_csv

TABLE3 = Path(__file__).parent / "fixtures" / "paper_table3_123m.csv"


def test_the_papers_123m_kd_beats_nll_at_5_of_12_points_so_its_control_fails_this_bar():
    """By hand from Table 3: KD < NLL at lr=4e-4 (tau=1: 3.036, 3.045 < 3.071) and lr=1.6e-3 (3.031, 3.005,
    3.014 < 3.063), nowhere at 1e-4: 5 of 12; the best margin is 3.063 - 3.005 at (1.6e-3, 1, 0.7)."""
    runs = read_csv(TABLE3)
    table = kd_vs_nll(runs)
    assert len(table) == 12 and (table["margin"] > 0).sum() == 5
    c = control(runs)
    assert (c.points, c.kd_better) == (12, 5)
    assert (c.best["lr"], c.best["tau"], c.best["alpha"]) == (0.0016, 1.0, 0.7)
    assert c.best["margin"] == pytest.approx(3.063 - 3.005)
    assert c.best["spread"] == 0  # one seed
    assert not c.holds  # 42% < 75% (no teacher row either)


def _runs(rows: list[tuple]) -> pd.DataFrame:
    cols = ["method", "lr", "tau", "alpha", "seed", "val_logppl"]
    df = pd.DataFrame(rows, columns=cols).assign(student="tiny", **{HIDDEN: "", LOGITS: ""})
    for c in COLUMNS:
        if c not in df:
            df[c] = float("nan")
    return df


def test_the_spread_is_the_largest_seed_range_of_nll_kd_and_their_difference():
    runs = _runs([("nll", 1e-3, None, None, 0, 6.0), ("nll", 1e-3, None, None, 1, 6.1),
                  ("kd", 1e-3, 1.0, 0.9, 0, 5.7), ("kd", 1e-3, 1.0, 0.9, 1, 5.9),   # margins 0.3 and 0.2
                  ("kd", 1e-3, 0.5, 0.9, 0, 6.2), ("kd", 1e-3, 0.5, 0.9, 1, 6.2),
                  ("teacher", 3e-3, None, None, 0, 4.0)])
    table = kd_vs_nll(runs).set_index("tau")
    assert table.loc[1.0, "margin"] == pytest.approx(6.05 - 5.8)
    assert table.loc[1.0, "spread"] == pytest.approx(0.2)        # KD's range (NLL 0.1, difference 0.1)
    assert table.loc[0.5, "spread"] == pytest.approx(0.1)        # NLL's range and the difference's
    c = control(runs)
    assert (c.kd_better, c.points, c.teacher, c.best_student) == (1, 2, 4.0, 5.7)
    assert not c.holds  # 50% of the points; the best margin 0.25 < 2 x 0.2
    better = control(runs.assign(val_logppl=runs["val_logppl"].where(runs["tau"] != 0.5, 5.95)))
    assert better.kd_better == 2 and not better.holds  # 100%, but 0.25 is not > 0.4
    clear = runs.copy()
    clear.loc[(clear["method"] == "kd") & (clear["tau"] == 1.0), "val_logppl"] = [5.7, 5.75]
    clear.loc[(clear["method"] == "kd") & (clear["tau"] == 0.5), "val_logppl"] = 5.95
    c = control(clear)
    assert c.best["margin"] == pytest.approx(0.325) and c.best["spread"] == pytest.approx(0.1) and c.holds
    assert control(clear.assign(val_logppl=clear["val_logppl"].where(clear["method"] != "teacher", 5.8))).holds is False


def test_hidden_fit_counts_the_runs_whose_hidden_path_learned():
    runs = _runs([("hldf", 1e-3, 1.0, 0.9, 0, 6.0), ("hldf", 1e-3, 1.0, 0.9, 1, 6.0),
                  ("hldc", 1e-3, 1.0, 0.9, 0, 6.0), ("hldf", 1e-3, 1.0, 0.9, 0, 6.0)])
    runs["p1"], runs["gamma"] = [0.1, 0.1, None, 0.1], [None, None, 0.5, None]
    runs[HIDDEN] = ["", "", "", "pairs=[[1,2],[3,5]]"]  # another hidden path: a variant of its own
    runs["cosine_start"], runs["cosine_end"] = [0.1, 0.2, None, 0.3], [0.6, 0.1, None, 0.7]
    runs["loss_emb_start"], runs["loss_emb_end"] = [None, None, 0.02, None], [None, None, 0.01, None]
    fit = hidden_fit(runs).set_index("method")
    assert fit.loc["hldf", ["variant", "runs", "learned"]].values.tolist() == [
        ["p1=0.1", 2, 1], ["p1=0.1|pairs=[[1,2],[3,5]]", 1, 1]]
    fit = fit[~fit["variant"].str.contains("pairs")]
    assert fit.loc["hldf", "start"] == pytest.approx(0.15) and fit.loc["hldf", "end"] == pytest.approx(0.35)
    assert fit.loc["hldc", ["variant", "measure", "learned"]].tolist() == ["gamma=0.5", "loss_emb", 1]
