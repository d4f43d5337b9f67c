"""`make demo` in small: the demo sweep on a reduced grid trains against one teacher and one cache, and its
report has a value in every one of the seven metric columns, labelled as the demo's own tasks."""
from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from analysis import report
from analysis.runs import METRICS
from hldx.config import compose
from hldx.demotasks import write

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_report_has_all_seven_metrics_from_one_teacher_and_one_cache(tmp_path, capsys):
    tasks, uri = tmp_path / "tasks", f"sqlite:///{tmp_path}/mlflow.db"
    write(compose([]), tasks)
    grid = ["+sweep=demo", "method=nll,kd", "alpha=0.9", "seed=0,1",  # the demo's grid, reduced
            "train.seq_len=32", "train.batch_size=4", "data.max_train_tokens=32768", "budget.tokens=2048",
            "teacher.build.tokens=8192", "eval.val_sequences=4", "eval.wikitext_sequences=4", "eval.limit=4",
            f"eval.local_dir={tasks}", f"tracking.uri={uri}", f"paths.runs={tmp_path}/runs",
            f"hydra.sweep.dir={tmp_path}/m", "hydra.sweeper.report=false"]  # its report: below
    env = {**os.environ, "HLDX_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "hldx.run", "-m", *grid], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    # A quiet terminal: a line per stage and per run (its headline metric), the sweep's state at the end; what
    # the jobs write (lm-eval's, transformers' and datasets' lines and warnings, progress bars) is in their logs.
    lines = done.stdout.splitlines()
    print(f"\nthe sweep's terminal, {len(lines)} lines:\n" + done.stdout)
    assert [line.split()[2] for line in lines if line.startswith("done   stage ")] == ["tokenize", "teacher", "cache"]
    runs = [line for line in lines if line.startswith("done   ") and "|" in line.split()[1]]
    assert len(runs) == 4 and all(re.search(r"  val_logppl=\d+\.\d{4}  \(\d:\d\d\)  \[", r) for r in runs), runs
    assert lines[-1].startswith(f"sweep {tmp_path}/m: 7/7 done, 0 failed | ") and len(lines) <= 11, lines
    assert not any(word in done.stdout for word in ("lm_eval", "WARNING", "it/s", "Loading weights", "step/s"))
    logs = "".join(p.read_text() for p in (tmp_path / "m").glob("*/run.log"))
    assert "[lm_eval.evaluator][INFO]" in logs and "Passed an already-initialized model" in logs
    assert "step/s" in logs and "Running loglikelihood requests" in logs
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 1  # seeds 0 and 1 share one teacher ...
    assert len(list((tmp_path / "cache" / "teacher_cache").iterdir())) == 1  # ... and one cache

    out = tmp_path / "report"
    assert report.main(["--experiment", "demo", "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    best = pd.read_csv(out / "best.csv")
    assert list(best["method"]) == ["random", "teacher", "nll", "kd"]
    assert best.loc[best["method"] != "random", METRICS].notna().all(axis=None)  # a value in every column
    text = (out / "report.md").read_text()
    assert report.DEMO_NOTE in text and "| hellaswag_err (demo) |" in text  # labelled as the demo's own tasks
    assert "viewStateShareKey=hldx-pointwise" in printed.splitlines()[-2]  # the last lines: where everything is


def test_on_a_terminal_the_sweeps_line_is_redrawn_in_place():
    """On a terminal (a pseudo-terminal here) the live line is redrawn every second, its clock running, and each
    job's line is printed above it; the last state stays as a line of its own."""
    leader, follower = pty.openpty()
    code = ("import time; from hldx.progress import SweepLine\n"
            "line = SweepLine(2, 'sweep s'); line.started('kd|lr=1e-3'); time.sleep(1.3)\n"
            "line.ended_job('kd|lr=1e-3', 'val_logppl=6.5000'); line.close()")
    job = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=follower, stderr=follower)
    os.close(follower)
    out = b""
    while chunk := _read(leader):
        out += chunk
    assert job.wait(30) == 0, out
    text = out.decode()
    drawn = [part for part in text.split("\r\x1b[K") if part.startswith("sweep s: 0/2 done, 0 failed | 0:0")]
    assert {part.split(" elapsed")[0][-4:] for part in drawn} >= {"0:00", "0:01"}, text  # its clock runs
    assert all(part.endswith(" | running kd|lr=1e-3") for part in drawn) and "\n" not in "".join(drawn)
    assert "\r\x1b[Kdone   kd|lr=1e-3  val_logppl=6.5000  (0:01)\r\n" in text
    assert text.endswith("\r\x1b[Ksweep s: 1/2 done, 0 failed | 0:01 elapsed, ETA 0:01\r\n"), text


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the other end closed
        return b""
