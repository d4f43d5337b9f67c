"""`make mini` in small: the mini study's own path (its tasks, the sweep two jobs at a time, the results page) on a
cut-down grid (one point, two seeds, tiny budgets) ends with the page, its figures and the hidden path's fit."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from analysis.runs import read_mlflow

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_mini_on_one_point_writes_the_page_and_its_figures(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cut = ["lr=1e-2", "tau=1", "alpha=0.9",  # one point of the grid; its gammas, p1s and seeds stay
           "train.seq_len=32", "train.batch_size=4", "data.max_train_tokens=32768", "budget.tokens=4096",
           "teacher.build.tokens=8192", "eval.val_sequences=4", "eval.wikitext_sequences=4", "eval.limit=4",
           f"paths.runs={tmp_path}/runs", f"hydra.sweep.dir={tmp_path}/m", "hydra.sweeper.report=false"]
    page = tmp_path / "docs" / "mini-study.md"
    env = {**os.environ, "HLDX_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(["make", "mini", f"MINI={' '.join(cut)}", f"MINI_PAGE={page}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # The sweep's terminal, two jobs at a time (joblib): a line per stage and run, the sweep's state at the end.
    shown = [line for line in done.stdout.splitlines() if line.startswith(("done   ", "FAILED ", f"sweep {tmp_path}"))]
    assert len(shown) == 3 + 12 + 1 and shown[-1].startswith(f"sweep {tmp_path}/m: 15/15 done, 0 failed"), shown
    runs = read_mlflow("mini", uri)
    assert runs.groupby("method").size().to_dict() == {"nll": 2, "kd": 2, "hldc": 4, "hldf": 4, "teacher": 1}
    text = page.read_text()
    for section in ("## The answer", "## The positive control", "## What was run", "## Best vs best",
                    "## The hidden path's fit", "## What this study can and cannot show"):
        assert section in text, section
    figures = sorted(p.name for p in (page.parent / "mini-study").iterdir())
    assert figures == ["fig1_val_logppl_hist.png", "fig2_downstream_hist_tiny.png", "fig5_val_logppl_scatter.png",
                       "fig6_downstream_scatter_tiny.png"]
    assert all(f"(mini-study/{name})" in text for name in figures)  # linked from the page, relative to it
    assert "Command: `make mini`" in text and "KD beats NLL at" in text
    assert "| lr | tau | alpha | nll | kd | KD - NLL | seed spread | HLDC gamma=0.05 |" in text  # top-k alone: no logits
    hldf, hldc = runs[runs["method"] == "hldf"], runs[runs["method"] == "hldc"]
    assert hldf[["cosine_start", "cosine_end"]].notna().all(axis=None)  # every HLDF run logs phase 1's fit
    assert hldc[["loss_emb_start", "loss_emb_end"]].notna().all(axis=None)  # every HLDC run its hidden loss


def test_the_page_finds_a_teacher_pre_trained_by_another_study(tmp_path):
    """A teacher is trained once and shared: a later study's students name it (tag hldx.teacher, its run key) and
    the page finds its run in whichever experiment pre-trained it."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from analysis.page import teachers

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    earlier, mini = client.create_experiment("demo"), client.create_experiment("mini")
    for exp, key, val in ((earlier, "t-used", 4.5), (earlier, "t-other", 3.0)):
        run = client.create_run(exp, tags={"hldx.role": "teacher", "hldx.run_key": key, "hldx.method": "nll"})
        client.log_batch(run.info.run_id, metrics=[Metric("eval/val_logppl", val, 0, 0)])
        client.set_terminated(run.info.run_id)
    student = client.create_run(mini, tags={"hldx.role": "student", "hldx.teacher": "t-used"})
    client.set_terminated(student.info.run_id)
    found = teachers("mini", f"sqlite:///{tmp_path}/mlflow.db")
    assert found["method"].tolist() == ["teacher"] and found["val_logppl"].tolist() == [4.5]
