"""The study as dependent stages (`python -m hldx.pipeline`): the stage graph and its sbatch plan, the stages in
order here, and on the real single-node SLURM cluster each stage a job (the cache an array of 2) waiting for
what it needs through --dependency=afterok, no distilled student starting before the last cache task ends,
and the same command again submitting nothing twice."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from slurm_cluster import wait_until
from test_mlflow_ui import server  # noqa: F401 - the `mlflow server` fixture

from hldx import config as C
from hldx import pipeline, study
from hldx.stages import stages

ROOT = Path(__file__).resolve().parent.parent
STUDY = ["-m", "method=nll,kd", "budget.tokens=4096", "cache.tasks=2"]


def test_dry_run_prints_the_stages_and_their_dependencies(tiny, tmp_path, capsys):
    tiny = tiny + [f"paths.cache={tmp_path}/cache"]  # no teacher yet: its stage is planned
    assert pipeline.main(["--dry-run", *tiny, *STUDY, "hydra/launcher=slurm_cpu"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines()[1:6]] == [
        ["tokenize", "1"], ["teacher", "1"], ["cache", "2"], ["student", "2"], ["report", "1"]]
    sbatch = [line for line in out.splitlines() if line.startswith("sbatch")]
    names = [line.split()[1].removeprefix("--job-name=") for line in sbatch]
    assert [n.split("-")[1] for n in names] == ["tokenize", "teacher", "cache", "student", "student", "report"]
    nll, kd = (C.run_key(C.compose(tiny + ["budget.tokens=4096", f"method={m}"])) for m in ("nll", "kd"))
    assert sbatch[1].endswith(f"--dependency=afterok:<{names[0]}>")                  # teacher after tokenize
    assert "array of 2" in sbatch[2] and sbatch[2].endswith(f"afterok:<{names[1]}>")  # cache after the teacher
    assert f"hldx-student-{nll}" in sbatch[3] and sbatch[3].endswith(f"afterok:<{names[0]}>")  # NLL: data only
    assert f"hldx-student-{kd}" in sbatch[4] and sbatch[4].endswith(f"afterok:<{names[2]}>")   # KD: the cache
    assert sbatch[5].endswith(f"--dependency=afterany:<{names[3]}>:<{names[4]}>")


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
        assert tokens in cache.tasks[0]  # its own teacher's cache
    by_seed = {}
    for s in students:
        by_seed.setdefault(tuple(o for o in s.tasks[0] if not o.startswith("seed=")), set()).add(s.after[0])
    assert all(len(waits) == 1 for waits in by_seed.values())  # seed 0 and seed 1 wait for the same cache


@pytest.mark.slow
def test_the_stages_run_in_order_here_and_a_finished_study_does_nothing(tiny, tmp_path):
    cmd = [sys.executable, "-m", "hldx.pipeline", *tiny, *STUDY, f"paths.cache={tmp_path}/cache"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    order = [line.split("pipeline: ")[1].split("-")[1] for line in done.stderr.splitlines()
             if "pipeline: hldx-" in line]
    assert order == ["tokenize", "teacher", "cache", "cache", "student", "student", "report"]
    assert (tmp_path / "reports" / C.compose(tiny).tracking.experiment / "report.md").exists()
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0 and "every run of the study has finished: nothing to do" in again.stdout


def _sacct(cluster, since: float) -> list[dict]:
    out = cluster.run("sacct", "--noheader", "--allocations", "--parsable2", "--starttime",
                      datetime.fromtimestamp(since - 5).strftime("%Y-%m-%dT%H:%M:%S"),
                      "--format=JobID,JobName%100,State,Start,End,Submit")
    keys = ["id", "name", "state", "start", "end", "submit"]
    return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if "|hldx-" in line]


@pytest.mark.slow
def test_the_study_on_slurm_as_dependent_jobs(slurm_cluster, server, hldx_cache, tmp_path):  # noqa: F811
    overrides = [o for o in STUDY if o != "-m"] + [
        "train.seq_len=32", "train.batch_size=4", "data.max_train_tokens=32768", "teacher.build.tokens=8192",
        "eval.val_sequences=8", "eval.tasks=[val]", f"tracking.uri={server}", "tracking.experiment=pipeline",
        f"paths.runs={tmp_path}/runs", f"paths.cache={tmp_path}/cache", "hydra/launcher=slurm_cpu",
        "hydra.launcher.timeout_min=60", f"hydra.sweep.dir={tmp_path}/multirun"]
    cmd = [sys.executable, "-m", "hldx.pipeline", *overrides]
    t0 = time.time()
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert first.returncode == 0, first.stderr[-3000:]
    assert sum("submitted as job" in line for line in first.stdout.splitlines()) == 6, first.stdout
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0 and "submitted as job" not in again.stdout, again.stdout  # nothing twice
    wait_until(lambda: "hldx-" not in slurm_cluster.run("squeue", "--noheader", "--format=%j"), 600,
               "the study's jobs to leave the queue", interval_s=1)
    wait_until(lambda: len(_sacct(slurm_cluster, t0)) == 7 and all(j["end"] != "Unknown" for j in _sacct(
        slurm_cluster, t0)), 30, "accounting to record the jobs' end")
    seconds = time.time() - t0
    jobs = _sacct(slurm_cluster, t0)
    print(f"\nthe pipeline on SLURM, {len(jobs)} jobs: submitted to all ended {seconds:.1f} s")
    for j in sorted(jobs, key=lambda j: j["start"]):
        print(f"  {j['id']:10} {j['name'][:36]:36} {j['state']:10} {j['start']} -> {j['end']}")
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    stage = {name: [j for j in jobs if j["name"].startswith(f"hldx-{name}")]
             for name in ("tokenize", "teacher", "cache", "student", "report")}
    assert [len(stage[n]) for n in stage] == [1, 1, 2, 2, 1]
    kd_key = C.run_key(C.compose([o for o in overrides if not o.startswith(("hydra", "method="))] + ["method=kd"]))
    (kd,) = [j for j in stage["student"] if j["name"].endswith(kd_key)]
    assert kd["start"] >= max(j["end"] for j in stage["cache"])       # no distilled student before the cache
    assert min(j["start"] for j in stage["cache"]) >= stage["teacher"][0]["end"]
    assert stage["report"][0]["start"] >= max(j["end"] for j in stage["student"])
    mlflow = MlflowClient(server)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("pipeline").experiment_id],
                              filter_string="tags.`hldx.role` = 'student'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "every run of the study has finished: nothing to do" in done.stdout, done.stdout
    # Side by side: the same study as one Hydra sweep on SLURM, its students building teacher and cache under
    # a file lock (a fresh cache and experiment, as the pipeline had), launch to end.
    sweep = ["-m", *[o.replace("pipeline", "lock-sweep").replace(f"{tmp_path}/", f"{tmp_path}/sweep-")
                     for o in overrides if not o.startswith("cache.tasks")]]
    t1 = time.time()
    lock = subprocess.run([sys.executable, "-m", "hldx.run", *sweep], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert lock.returncode == 0, lock.stderr[-3000:]
    print(f"the same study as one locking sweep: {time.time() - t1:.1f} s; as the pipeline: {seconds:.1f} s")
