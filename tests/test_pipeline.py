"""A sweep as its study's stage graph (`python -m hldx.run -m`): the graph and its sbatch plan, the stages in order
here, a trained run evaluated as a stage of its own, and on the real single-node SLURM cluster each stage a job
(the cache an array of 2) waiting for what it needs: one teacher and one cache for both seeds, a cancelled cache
task cancelling the students that need it, the relaunch building only what is missing, the same command again
submitting nothing."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from slurm_cluster import wait_until
from test_failures import stage_counts
from test_mlflow_ui import server  # noqa: F401 - the `mlflow server` fixture

from hldx import config as C
from hldx import job, status, study
from hldx.stages import stages

ROOT = Path(__file__).resolve().parent.parent
STUDY = ["method=nll,kd", "budget.tokens=4096", "cache.tasks=2"]


def hldx_run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """python -m hldx.run -m ARGS, its stderr and stdout together in .stdout, in order."""
    return subprocess.run([sys.executable, "-m", "hldx.run", "-m", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_dry_run_prints_the_stages_and_their_dependencies(tiny, tmp_path):
    tiny = tiny + [f"paths.cache={tmp_path}/cache"]  # no teacher yet: its stage is planned
    done = hldx_run([*tiny, *STUDY, "hydra/launcher=slurm_cpu", "hydra.sweeper.dry_run=true",
                     f"hydra.sweep.dir={tmp_path}/m"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    out = done.stdout
    rows = out.splitlines()[out.splitlines().index(next(l for l in out.splitlines() if l.startswith("stage "))):]
    assert [line.split()[:2] for line in rows[1:7]] == [
        ["tokenize", "1"], ["teacher", "1"], ["cache", "2"], ["student", "2"], ["eval", "2"], ["report", "1"]]
    sbatch = [line for line in out.splitlines() if line.startswith("sbatch")]
    names = [line.split()[1].removeprefix("--job-name=") for line in sbatch]
    assert [n.split("-")[1] for n in names] == ["tokenize", "teacher", "cache", "student", "student", "eval", "eval",
                                                "report"]
    nll, kd = (C.run_key(C.compose(tiny + ["budget.tokens=4096", f"method={m}"])) for m in ("nll", "kd"))
    assert sbatch[1].endswith(f"--dependency=afterok:<{names[0]}>")                  # teacher after tokenize
    assert "array of 2" in sbatch[2] and sbatch[2].endswith(f"afterok:<{names[1]}>")  # cache after the teacher
    assert f"hldx-student-{nll}" in sbatch[3] and sbatch[3].endswith(f"afterok:<{names[0]}>")  # NLL: data only
    assert f"hldx-student-{kd}" in sbatch[4] and sbatch[4].endswith(f"afterok:<{names[2]}>")   # KD: the cache
    assert sbatch[5].endswith(f"afterok:<hldx-student-{nll}>") and sbatch[6].endswith(f"afterok:<hldx-student-{kd}>")
    assert sbatch[7].endswith(f"--dependency=afterany:<{names[5]}>:<{names[6]}>")   # the report, after the evals
    assert not (tmp_path / "cache" / "teachers").exists()  # nothing ran


def test_one_teacher_and_one_cache_per_distinct_teacher_whatever_the_seeds(tiny, tmp_path):
    """Seeds and methods share their teacher and its cache; two build recipes make two of each, and each
    student waits for its own teacher's cache."""
    tiny = tiny + [f"paths.cache={tmp_path}/cache"]
    graph = stages(study.plan_jobs(study.expand_sweep(
        tiny + ["method=kd,hldf", "seed=0,1", "teacher.build.tokens=8192,16384"]))[0])
    assert [s.name for s in graph].count("teacher") == 2 and [s.name for s in graph].count("cache") == 2
    cache_of = {s.key: s for s in graph if s.name == "cache"}
    students = [s for s in graph if s.name == "student"]
    assert len(students) == 8
    for s in students:
        (wait,) = s.after
        tokens = next(o for o in s.tasks[0] if o.startswith("teacher.build.tokens="))
        cache = cache_of[wait.removeprefix("hldx-cache-")]
        overrides, extents = cache.tasks[0]
        assert tokens in overrides and set(extents) == {"topk", "hidden"}  # its own teacher's cache, every part
    by_seed = {}
    for s in students:
        by_seed.setdefault(tuple(o for o in s.tasks[0] if not o.startswith("seed=")), set()).add(s.after[0])
    assert all(len(waits) == 1 for waits in by_seed.values())  # seed 0 and seed 1 wait for the same cache


@pytest.mark.slow
def test_the_stages_run_in_order_here_and_a_finished_study_does_nothing(tiny, tmp_path):
    args = [*tiny, *STUDY, f"paths.cache={tmp_path}/cache", f"hydra.sweep.dir={tmp_path}/m"]
    done = hldx_run(args + ["--verbose"], tmp_path, timeout=900)  # all the stages and jobs write, on the terminal
    assert done.returncode == 0, done.stdout[-3000:]
    order = [line.split("stage hldx-")[1].split("-")[0] if "stage hldx-" in line else "student"
             for line in done.stdout.splitlines() if "stage hldx-" in line or "] - nll|" in line or "] - kd|" in line]
    assert order == ["tokenize", "teacher", "cache", "cache", "student", "student", "report"], done.stdout[-3000:]
    assert (tmp_path / "reports" / C.compose(tiny).tracking.experiment / "report.md").exists()
    again = hldx_run(args, tmp_path)
    assert again.returncode == 0 and "every run of the sweep has finished: nothing to do" in again.stdout


def test_a_trained_run_is_evaluated_as_a_stage_without_training_again(tiny):
    """The student stage stops trained (MLflow SCHEDULED, hldx.state=trained, never FINISHED); the graph then
    holds its evaluation alone, which finishes the same MLflow run without a training step."""
    cfg = C.compose(tiny + ["method=nll"])
    assert job.run(cfg, evaluate=False) == {}
    mlflow = MlflowClient(cfg.tracking.uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "SCHEDULED" and run.data.tags["hldx.state"] == "trained"
    assert "eval/val_logppl" not in run.data.metrics
    steps = len(mlflow.get_metric_history(run.info.run_id, "train/loss"))
    graph = stages(study.launch_plan([tiny + ["method=nll"]]))
    assert [s.name for s in graph] == ["tokenize", "eval", "report"] and graph[1].after == []
    metrics = graph[1].fn(graph[1].tasks[0])
    run = mlflow.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["hldx.state"] == "evaluated"
    assert run.data.metrics["eval/val_logppl"] == metrics["eval/val_logppl"]
    assert len(mlflow.get_metric_history(run.info.run_id, "train/loss")) == steps  # no step trained again
    assert study.launch_plan([tiny + ["method=nll"]]) == []


def _sacct(cluster, ids: list[str]) -> list[dict]:
    """Each job (each array task) of these SLURM job ids: id, name, state, start, end (never started: None)."""
    out = cluster.run("sacct", "--noheader", "--allocations", "--parsable2", f"--jobs={','.join(ids)}",
                      "--format=JobID,JobName%100,State,Start,End")
    keys = ["id", "name", "state", "start", "end"]
    return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if "|hldx-" in line]


def _stage(jobs: list[dict], name: str) -> list[dict]:
    return [j for j in jobs if j["name"].startswith(f"hldx-{name}-")]


def _drained(cluster, launch: subprocess.CompletedProcess, count: int) -> list[dict]:
    """The jobs this launch submitted, once none is queued and accounting has recorded all `count` ended."""
    ids = [line.split("submitted as job ")[1].split()[0].rstrip(",") for line in launch.stdout.splitlines()
           if ": submitted as job " in line]
    wait_until(lambda: "hldx-" not in cluster.run("squeue", "--noheader", "--format=%j"), 600,
               "the study's jobs to leave the queue", interval_s=1)
    try:
        wait_until(lambda: len(jobs := _sacct(cluster, ids)) == count and all(j["end"] != "Unknown" for j in jobs),
                   30, "accounting to record the jobs' end")
    except TimeoutError as err:
        raise AssertionError(f"{err}: {_sacct(cluster, ids)}") from None
    return _sacct(cluster, ids)


def _timeline(jobs: list[dict]) -> str:
    return "\n".join(f"  {j['id']:6} {j['name'][:36]:36} {j['state']:14} {j['start']} -> {j['end']}"
                     for j in sorted(jobs, key=lambda j: (j["start"], int(j["id"].split("_")[0]))))


@pytest.mark.slow
def test_the_study_on_slurm_as_dependent_jobs(slurm_cluster, server, hldx_cache, tmp_path, capsys):  # noqa: F811
    """The demo's grid (reduced to KD) through the mission's command: one teacher and one cache for both seeds. A
    cache task cancelled at once cancels the KD students and their evaluations (--kill-on-invalid-dep); the
    relaunch submits only the cache, the KD students, their evaluations and the report, and the cache task
    that had completed builds nothing again; then every run is FINISHED and the command submits nothing.
    hldx.status, given the same overrides, follows it from SLURM's queue and accounting and MLflow: jobs pending
    and running, the cancelled cache task and what it cancelled, a job that ran out of time (under the report
    stage's name, a minute's limit, submitted beside the study: none of its own stages runs for a minute), the
    relaunch superseding all of them, the study finished."""
    args = ["+sweep=demo", "method=kd", "budget.tokens=4096", "cache.tasks=2", "alpha=0.9", "seed=0,1",
            "train.seq_len=32", "train.batch_size=4",
            "data.max_train_tokens=32768", "teacher.build.tokens=8192", "eval.val_sequences=8", "eval.tasks=[val]",
            f"tracking.uri={server}", "tracking.experiment=pipeline", f"paths.runs={tmp_path}/runs",
            f"paths.cache={tmp_path}/cache", "cache.rows_per_shard=32", "hydra/launcher=slurm_cpu",
            "hydra.launcher.timeout_min=60",
            f"hydra.sweep.dir={tmp_path}/multirun"]
    def show(text: str) -> None:  # on the terminal (-s), not into what capsys reads of hldx.status
        with capsys.disabled():
            print(text)

    t0 = time.time()
    report = f"hldx-report-{C.digest('pipeline')}"  # the study's report stage: out of time after a minute
    slurm_cluster.run("sbatch", f"--job-name={report}", "--time=1", f"--output={tmp_path}/%j.out", "--wrap=sleep 600")
    first = hldx_run(args + ["hydra.sweeper.report=false"], tmp_path)  # the relaunch's report runs last
    assert first.returncode == 0, first.stdout[-3000:]
    submitted = [line for line in first.stdout.splitlines() if ": submitted as job " in line]
    assert len(submitted) == 7, first.stdout  # tokenize, teacher, cache (2 tasks), 2 students, 2 evals
    (cache_line,) = [line for line in submitted if line.startswith("hldx-cache-")]
    array = cache_line.split("submitted as job ")[1].split()[0]
    slurm_cluster.run("scancel", f"{array}_1")  # pending behind the teacher: it never runs
    again = hldx_run(args + ["hydra.sweeper.report=false"], tmp_path)
    assert again.returncode == 0 and ": submitted as job" not in again.stdout, again.stdout  # nothing twice
    assert status.main(["-m", *args, "hydra.sweeper.report=false"]) == 1  # running, waiting, one task cancelled
    shown = capsys.readouterr().out.splitlines()
    show("\nhldx.status while the study runs:\n" + "\n".join(shown))
    counts = stage_counts(shown)
    assert sum(n[1] + n[2] for n in counts.values()) >= 1 and counts["eval"][0] == 0, shown  # running or pending
    assert f"  hldx-cache-{cache_line.split('-')[2].split(':')[0]} task 1: CANCELLED before it started (scancel)" \
        in "\n".join(shown)
    jobs = _drained(slurm_cluster, first, 7)  # the cancelled task never ran: SLURM's accounting has no record of it
    show(f"\nthe demo study on SLURM, a cache task cancelled: {len(jobs)} jobs, {time.time() - t0:.1f} s\n"
         + _timeline(jobs))
    kd = [line.split(":")[0].removeprefix("hldx-student-") for line in submitted
          if line.startswith("hldx-student-") and line.endswith(f"afterok:{array}")]  # the students of the cache
    assert len(kd) == 2
    assert [len(_stage(jobs, n)) for n in ("tokenize", "teacher", "cache", "student", "eval", "report")] == \
        [1, 1, 1, 2, 2, 0]
    for name, end in {j["name"]: j["state"] for j in jobs}.items():
        cancelled = any(key in name for key in kd)  # the KD students and their evaluations
        assert end.startswith("CANCELLED") if cancelled else end == "COMPLETED", (name, end)
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "teacher_cache").rglob("*.bin")}
    assert shards  # task 0's
    t = time.monotonic()
    assert status.main(["-m", *args]) == 1
    shown = capsys.readouterr().out.splitlines()
    show(f"hldx.status after it, {time.monotonic() - t:.1f} s:\n" + "\n".join(shown))
    assert stage_counts(shown) == {"tokenize": [1, 0, 0, 0, 0], "teacher": [1, 0, 0, 0, 0], "cache": [1, 0, 0, 1, 0],
                                   "student kd": [0, 0, 0, 2, 0], "eval": [0, 0, 0, 2, 0], "report": [0, 0, 0, 1, 0]}
    failed = shown[shown.index("failed (6):") + 1:][:6]
    cache = failed[0].split()[0]
    assert failed[0] == f"  {cache} task 1: CANCELLED before it started (scancel)"
    for line in failed[1:3]:  # the students, by their overrides, and the evaluations, each with its log
        assert re.fullmatch(rf"  seed=[01]: CANCELLED before it started: {cache} did not complete \(log: "
                            rf"{tmp_path}/multirun/.submitit/(\d+)/\1_0_log.err\)", line), line
    assert all(re.match(r"  seed=[01]: CANCELLED before it started: hldx-student-\w+ did not complete", line)
               for line in failed[3:5]), failed
    assert failed[5].startswith(f"  {report}: TIMEOUT: it reached its time limit")

    t1 = time.time()
    relaunch = hldx_run(args, tmp_path)
    assert relaunch.returncode == 0, relaunch.stdout[-3000:]
    resubmitted = sorted(line.split("-")[1] for line in relaunch.stdout.splitlines() if ": submitted as job " in line)
    assert resubmitted == ["cache", "eval", "eval", "report", "student", "student"], relaunch.stdout
    assert status.main(["-m", *args]) == 3  # the relaunch's jobs supersede the failed ones: all to run
    counts = stage_counts(capsys.readouterr().out.splitlines())
    assert counts["student kd"][1] + counts["student kd"][2] == 2 and counts["report"] == [0, 0, 1, 0, 0]
    jobs = _drained(slurm_cluster, relaunch, 7)
    show(f"the relaunch: {len(jobs)} jobs, {time.time() - t1:.1f} s\n" + _timeline(jobs))
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in shards.items())  # task 0's shards, untouched
    cache, students, evals = _stage(jobs, "cache"), _stage(jobs, "student"), _stage(jobs, "eval")
    assert min(j["start"] for j in students) >= max(j["end"] for j in cache)  # nothing trains on a partial cache
    for student in students:
        (ev,) = [j for j in evals if j["name"].split("-")[-1] == student["name"].split("-")[-1]]
        assert ev["start"] >= student["end"]
    assert _stage(jobs, "report")[0]["start"] >= max(j["end"] for j in evals)
    mlflow = MlflowClient(server)
    experiment = mlflow.get_experiment_by_name("pipeline").experiment_id
    runs = mlflow.search_runs([experiment], filter_string="tags.`hldx.role` = 'student'")
    assert sorted((r.info.status, r.data.tags["hldx.state"]) for r in runs) == [("FINISHED", "evaluated")] * 2
    assert all("eval/val_logppl" in r.data.metrics for r in runs)
    assert len(mlflow.search_runs([experiment], filter_string="tags.`hldx.role` = 'teacher'")) == 1
    done = hldx_run(args, tmp_path)
    assert "every run of the sweep has finished: nothing to do" in done.stdout, done.stdout
    assert status.main(["-m", *args]) == 0
    shown = capsys.readouterr().out.splitlines()
    show("hldx.status at the end:\n" + "\n".join(shown))
    assert all(n[1:] == [0, 0, 0, 0] for n in stage_counts(shown).values()) and shown[-1] == "time left: none"
