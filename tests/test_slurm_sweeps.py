"""Sweeps at cluster scale: `python -m hldx.run -m ... hydra/launcher=slurm_cpu` on the real single-node SLURM
cluster (tests/slurm_cluster.py), every job logging to a real `mlflow server` on loopback.

One sweep of 4 jobs, 2 distinct runs (KD ignores gamma), submitted as its stage graph (tokenize, the teacher, its
cache, the students, their evaluations, the report); each student a 2-rank FSDP2 job (two SLURM tasks, gloo).
Once both train, `scontrol requeue` interrupts the first (SIGTERM: it checkpoints and exits, SLURM requeues it)
and `scancel --signal=USR2` the second (SLURM's warning before a time limit or a preemption: it checkpoints and
submitit requeues it, under the same job id: its evaluation keeps waiting). Both resume into their MLflow run,
every step logged once; the first must end with the weights of an uninterrupted 2-rank DDP run (torchrun),
bitwise: both engines, on SLURM and off it, are exact. The same command again submits nothing.
Apart: a student on two SLURM nodes (a two-node cluster on this machine, one task each) ends with one rank's
weights; 16 processes logging at once to one server lose no run and no metric.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from slurm_cluster import SlurmCluster, free_port, wait_until
from test_data import c4_shards
from test_mlflow_ui import server  # noqa: F401 - the `mlflow server` fixture

from hldx import config as C
from hldx import tracking
from hldx.checkpoint import Checkpoint
from hldx.job import execute

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TINY = ["train.seq_len=32", "train.batch_size=4", "data.max_train_tokens=32768", "teacher.build.tokens=8192",
        "eval.val_sequences=8", "eval.tasks=[val]", "method=kd", "budget.tokens=8192", "train.ckpt_every=4",
        "train.log_every=5"]  # 64 steps; a checkpoint every 4
GRID = ["tau=0.5,1", "gamma=0.1,0.05"]
SLURM = ["hydra/launcher=slurm_cpu", "hydra.launcher.tasks_per_node=2", "train.parallel=fsdp",
         "hydra.sweeper.report=false"]
EXPERIMENT = "slurm-sweep"


@dataclass
class Sweep:
    root: Path
    log: str
    keys: list[str]       # run_key of job 0 (requeued) and job 1 (signalled)
    jobs: list[str]       # their students' SLURM job ids
    requeued_at: float
    reference: Path       # the uninterrupted run of job 0


def sweep_cmd(uri: str, root: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "hldx.run", "-m", *SLURM, *TINY, *GRID, f"tracking.uri={uri}",
            f"tracking.experiment={EXPERIMENT}", f"paths.runs={root}/runs", f"hydra.sweep.dir={root}/{name}"]


def job_runs(cluster: SlurmCluster, job: str | None = None) -> list[tuple[str, str]]:
    """(job id, state) of every run (a requeue starts a new one) of the job, or of all jobs."""
    out = cluster.run("sacct", "-n", "-X", "-D", "-P", "-o", "JobID,State", *(["-j", job] if job else []))
    return [tuple(line.split("|")) for line in out.splitlines()]


def student_runs(uri: str) -> list:
    mlflow = MlflowClient(uri)
    return mlflow.search_runs([mlflow.get_experiment_by_name(EXPERIMENT).experiment_id],
                              filter_string="tags.`hldx.role` = 'student'")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run_dir / "final").glob("*.safetensors"))))


@pytest.fixture(scope="module")
def slurm_sweep(server, slurm_cluster, hldx_cache, tmp_path_factory) -> Sweep:  # noqa: F811 - server: the fixture
    """The sweep, its two jobs interrupted once they train; and an uninterrupted 2-rank run of the first."""
    root = tmp_path_factory.mktemp("slurm-sweep")
    keys = [C.run_key(C.compose(TINY + [tau])) for tau in ("tau=0.5", "tau=1")]
    ckpts = [root / "runs" / key for key in keys]
    t0 = time.time()
    sweep = subprocess.Popen(sweep_cmd(server, root, "multirun"), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "hldx.run", *TINY, "tau=0.5",
                f"paths.runs={root}/reference", f"tracking.uri=sqlite:///{root}/reference.db",
                f"hydra.run.dir={root}/reference-out"]
    reference = subprocess.Popen(torchrun, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})  # as slurm_cpu gives each rank
    try:
        log, _ = sweep.communicate(timeout=120)  # it returns once the stages are submitted
        assert sweep.returncode == 0, log[-5000:]
        submitted = dict(re.findall(r"(hldx-\S+): submitted as job (\d+)", log))
        jobs = [submitted[f"hldx-student-{key}"] for key in keys]
        wait_until(lambda: all(Checkpoint.load(c) for c in ckpts), 300, "both students to train")
        requeued_at = time.time()
        slurm_cluster.run("scontrol", "requeue", jobs[0])
        slurm_cluster.run("scancel", "--signal=USR2", jobs[1])
        assert not any((root / "runs" / key / "final").exists() for key in keys), "a job ended before its signal"
        wait_until(lambda: "hldx-" not in slurm_cluster.run("squeue", "--noheader", "--format=%j"), 300,
                   "the study's jobs to leave the queue", interval_s=1)
        seconds = time.time() - t0
        _, errors = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
    assert reference.returncode == 0, errors[-5000:]
    wait_until(lambda: all({s for _, s in job_runs(slurm_cluster, j)} <= {"REQUEUED", "COMPLETED"} for j in jobs),
               30, "accounting to record the jobs' end")
    print(f"\nsweep on SLURM, 2 students of 2 ranks, both interrupted once: launch to all evaluated {seconds:.1f} s")
    return Sweep(root, log, keys, jobs, requeued_at, root / "reference" / keys[0])


def test_sweep_launches_each_distinct_run_once_as_a_two_rank_job(slurm_sweep, slurm_cluster, server):  # noqa: F811
    assert "sweep: 4 job(s), 2 distinct, 0 finished already: launching 2" in slurm_sweep.log
    stages = [line.split("-")[1] for line in slurm_sweep.log.splitlines() if ": submitted as job" in line]
    assert stages[-4:] == ["student", "student", "eval", "eval"]  # after tokenize, [teacher,] cache; no report
    runs = student_runs(server)
    assert sorted(r.info.run_name for r in runs) == ["kd|lr=4e-4|tau=0.5|alpha=0.7", "kd|lr=4e-4|tau=1|alpha=0.7"]
    assert {r.info.status for r in runs} == {"FINISHED"} and "eval/val_logppl" in runs[0].data.metrics
    # Each student ran as two SLURM tasks (the logs of ranks 0 and 1); that they trained as one 2-rank job
    # shows in the requeued job's weights: bitwise those of a 2-rank torchrun run.
    logs = slurm_sweep.root / "multirun" / ".submitit"
    for job in slurm_sweep.jobs:
        assert sorted(p.name for p in (logs / job).glob("*_log.out")) == [f"{job}_0_log.out", f"{job}_1_log.out"]
    # The tiny teacher was built once, by its own stage, and shared through HLDX_CACHE by both students.
    mlflow = MlflowClient(server)
    every = [e.experiment_id for e in mlflow.search_experiments()]
    assert len(mlflow.search_runs(every, filter_string="tags.`hldx.role` = 'teacher'")) <= 1


@pytest.mark.parametrize("index, how", [(0, "scontrol requeue"), (1, "SIGUSR2, submitit requeues")])
def test_interrupted_job_resumes_into_its_mlflow_run(slurm_sweep, slurm_cluster, server, index, how):  # noqa: F811
    job, key = slurm_sweep.jobs[index], slurm_sweep.keys[index]
    assert [s for _, s in job_runs(slurm_cluster, job)] == ["REQUEUED", "COMPLETED"]
    (run,) = [r for r in student_runs(server) if r.data.tags["hldx.run_key"] == key]
    history = MlflowClient(server).get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [*range(5, 64, 5), 64]  # every step once: none lost, none twice
    logs = slurm_sweep.root / "multirun" / ".submitit" / job
    out = "".join((logs / f"{job}_0_log.{ext}").read_text() for ext in ("out", "err"))  # rank 0's
    assert f"resuming MLflow run {run.info.run_id}" in out
    if index == 1:
        assert "Caught signal SIGUSR2" in out and f"Requeued job {job}" in out, out[-3000:]
    resumed = min(m.timestamp for m in history if m.timestamp > 1000 * slurm_sweep.requeued_at + 2000) / 1000
    print(f"\n{how}: the resumed job's first logged step {resumed - slurm_sweep.requeued_at:.1f} s later")


def test_requeued_job_ends_with_the_uninterrupted_runs_weights(slurm_sweep):
    a = final_weights(slurm_sweep.root / "runs" / slurm_sweep.keys[0])
    b = final_weights(slurm_sweep.reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_sweep_again_launches_nothing(slurm_sweep, slurm_cluster, server):  # noqa: F811
    before_jobs, before_runs = job_runs(slurm_cluster), {r.info.run_id for r in student_runs(server)}
    t0 = time.monotonic()
    cmd = sweep_cmd(server, slurm_sweep.root, "multirun-again")
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(f"\nthe same sweep again, all finished: {time.monotonic() - t0:.1f} s")
    assert again.returncode == 0, again.stderr[-5000:]
    assert "sweep: 4 job(s), 2 distinct, 2 finished already: launching 0" in again.stdout + again.stderr
    assert "every run of the sweep has finished: nothing to do" in again.stdout
    assert job_runs(slurm_cluster) == before_jobs
    assert {r.info.run_id for r in student_runs(server)} == before_runs


def test_a_two_node_job_ends_with_one_ranks_weights(slurm_two_nodes, tmp_path):
    """On C4-layout files tokenized by a SLURM array (data.tasks=2, then their join and the training order): the
    stream one process makes, byte for byte and digest. Then 2 nodes x 1 task through hydra.launcher.nodes=2:
    an FSDP2 student, its ranks meeting from SLURM's environment, ends with the weights of one process at the
    whole batch, bit for bit; each task's log names its node."""
    docs = [json.loads(line)["text"] for line in gzip.open(ROOT / "hldx" / "corpus" / "train.jsonl.gz", "rt")]
    c4_shards(tmp_path / "c4", docs[:400], docs[400:440])
    job = ["train.seq_len=32", "train.batch_size=4", "data=c4", f"data.path={tmp_path / 'c4'}",
           "data.max_train_tokens=32768", "eval.val_sequences=8", "eval.tasks=[val]", "method=nll",
           "budget.tokens=4096", "train.log_every=8"]
    args = [*job, "data.tasks=2", "train.parallel=fsdp", "hydra/launcher=slurm_cpu", "hydra.launcher.nodes=2",
            "hydra.launcher.tasks_per_node=1", f"tracking.uri=sqlite:///{tmp_path}/two.db",
            f"paths.runs={tmp_path}/two", f"paths.cache={tmp_path}/cache-array", f"hydra.sweep.dir={tmp_path}/m",
            "hydra.sweeper.report=false"]
    env = {**os.environ, **slurm_two_nodes.env, "OMP_NUM_THREADS": "1"}
    launch = subprocess.run([sys.executable, "-m", "hldx.run", "-m", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert launch.returncode == 0, launch.stderr[-3000:]
    submitted = dict(re.findall(r"(hldx-\S+): submitted as job (\d+)", launch.stdout))
    assert [name.split("-")[1] for name in submitted] == ["tokenize", "order", "student", "eval"]
    assert re.search(r"hldx-tokenize-\S+: submitted as job \d+ \(2 tasks\)", launch.stdout), launch.stdout
    wait_until(lambda: "hldx-" not in slurm_two_nodes.run("squeue", "--noheader", "--format=%j"), 300,
               "the jobs to leave the queue", interval_s=1)
    key = C.run_key(C.compose(job))
    student = submitted[f"hldx-student-{key}"]
    wait_until(lambda: slurm_two_nodes.run("sacct", "-n", "-X", "-P", "-j", student, "-o", "State") == "COMPLETED", 30,
               "accounting to record the student's end")
    nodes = slurm_two_nodes.run("sacct", "-n", "-X", "-P", "-j", student, "-o", "NNodes,NodeList")
    logs = [(tmp_path / "m" / ".submitit" / student / f"{student}_{task}_log.{ext}").read_text()
            for task in (0, 1) for ext in ("out", "err")]
    shown = [line for text in logs for line in text.splitlines() if "Starting with JobEnvironment" in line
             or "] - rank " in line]  # submitit's, then hldx's: which node each rank is on
    print(f"\nthe two-node student (job {student}, nodes {nodes}):\n" + "\n".join(shown))
    assert nodes == "2|localhost,vm".replace("vm", slurm_two_nodes.node)
    assert any("node=0(2)" in line for line in shown) and any("node=1(2)" in line for line in shown)
    joined = {line.split(" on node ")[1] for line in shown if " joined (gloo" in line}
    assert joined == {"localhost", slurm_two_nodes.node}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: a matmul's sums in the same order
    try:
        execute(C.compose(job + ["train.micro_batch_size=2", f"paths.runs={tmp_path}/one",
                                 f"tracking.uri=sqlite:///{tmp_path}/one.db"]))
    finally:
        torch.set_num_threads(threads)
    a, b = final_weights(tmp_path / "two" / key), final_weights(tmp_path / "one" / key)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (array,) = [p.parent / "tokens.bin" for p in (tmp_path / "cache-array" / "streams").glob("*/meta.json")
                if json.loads(p.read_text())["split"] == "train"]
    one = Path(C.compose(job).paths.cache) / "streams" / array.parent.name / "tokens.bin"
    assert one.read_bytes() == array.read_bytes()  # the same digest (its directory's name), the same bytes
    print(f"stream {array.parent.name}: {len(array.read_bytes()) // 2} tokens from 2 array tasks, as from one process")


N_JOBS, N_LOGS = 16, 20
NAMES = ("train/loss", "train/loss_nll", "train/loss_kd", "train/lr", "train/tokens", "train/flops",
         "perf/tokens_per_s", "train/phase")


def log_a_run(cfg, i: int, start) -> None:
    """One job's tracking: a new run (params, tags), N_LOGS batches of the training metrics, a tag, the end."""
    start.wait()  # all at once, the experiment not created yet
    tracker = tracking.Tracker(cfg, f"job-{i:02d}")
    for step in range(1, N_LOGS + 1):
        tracker.log({name: 1000 * i + step + k / 8 for k, name in enumerate(NAMES)}, step)
    tracker.tag(**{"hldx.ckpt": f"runs/job-{i:02d}/final"})
    tracker.finish()


def test_sixteen_concurrent_jobs_lose_no_run_and_no_metric(server):  # noqa: F811
    cfg = C.compose([f"tracking.uri={server}", "tracking.experiment=concurrent"])
    fork = multiprocessing.get_context("fork")  # 16 processes without 16 imports of mlflow
    start = fork.Barrier(N_JOBS)
    jobs = [fork.Process(target=log_a_run, args=(cfg, i, start)) for i in range(N_JOBS)]
    t0 = time.monotonic()
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    print(f"\n{N_JOBS} processes x {N_LOGS} metric batches to one mlflow server: {time.monotonic() - t0:.1f} s")
    assert [job.exitcode for job in jobs] == [0] * N_JOBS
    mlflow = MlflowClient(server)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("concurrent").experiment_id], max_results=100)
    assert sorted(r.data.tags["hldx.run_key"] for r in runs) == [f"job-{i:02d}" for i in range(N_JOBS)]
    for run in runs:
        i = int(run.data.tags["hldx.run_key"][4:])
        assert run.info.status == "FINISHED" and run.data.tags["hldx.ckpt"] == f"runs/job-{i:02d}/final"
        assert run.data.params["cfg.tracking.experiment"] == "concurrent"
        for k, name in enumerate(NAMES):
            history = sorted((m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, name))
            assert history == [(s, 1000 * i + s + k / 8) for s in range(1, N_LOGS + 1)], (run.info.run_name, name)
