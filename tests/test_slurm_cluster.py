"""Smoke tests of the real SLURM test cluster (tests/slurm_cluster.py) through submitit: results, arrays, a
two-task torch.distributed rendezvous, preemption and requeue with resumption, cancellation, and a stage
submitted with the keys of hldx's launcher presets."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from slurm_cluster import SlurmCluster, wait_until

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # jobs cannot import this module: ship its code
TIMEOUT_MIN = 30  # submitit reads a USR2 as a time-out, not a preemption, when timeout_min is 10 or less


def executor(cluster: SlurmCluster, name: str, **params: object) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=cluster.submit_dir(name), cluster="slurm")
    ex.update_parameters(timeout_min=TIMEOUT_MIN, cpus_per_task=1, **params)
    return ex


def where_am_i(x: int) -> dict:
    """Runs in a job: x squared, and what SLURM and submitit tell the job about itself."""
    env = submitit.JobEnvironment()
    slurm = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    return {"square": x * x, "job_id": env.job_id, "rank": env.global_rank, "tasks": env.num_tasks,
            "host": env.hostname, "slurm": slurm}


def all_reduce_rank() -> dict:
    """Runs in each task of a job: joins torch.distributed (gloo) through the variables that submitit
    derives from SLURM's, and sums rank + 1 over the tasks."""
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group("gloo")
    total = torch.tensor([env.rank + 1.0])
    dist.all_reduce(total)
    dist.destroy_process_group()
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")
    return {"total": total.item(), **{k: os.environ[k] for k in names}}


def busy_interval(seconds: float) -> tuple[float, float]:
    """Runs in a job: sleeps; when it started and ended."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


class Counter(submitit.helpers.Checkpointable):
    """Counts to n, a step every 0.1 s, writing the count to `running`. On USR2 submitit pickles `self`
    (with its count) and requeues the job, which goes on from there; `starts` has (count, time) per start."""

    def __init__(self) -> None:
        self.count = 0
        self.starts: list[tuple[int, float]] = []

    def __call__(self, n: int, running: Path) -> Counter:
        self.starts.append((self.count, time.time()))
        while self.count < n:
            running.write_text(str(self.count))
            time.sleep(0.1)
            self.count += 1
        return self


def count_on_disk(n: int, state: Path) -> dict:
    """Counts to n, a step every 0.1 s, with its own checkpoint: on SIGTERM (sent by `scontrol requeue`,
    `scancel`, a time limit, the end of a preemption's grace time) it saves `state` and exits; a rerun of
    the job resumes from `state`."""
    saved = json.loads(state.read_text()) if state.exists() else {"count": 0, "starts": [], "signals": []}
    saved["starts"].append([saved["count"], time.time()])
    caught: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))  # replaces submitit's bypass
    while saved["count"] < n:
        if caught:
            saved["signals"].append(signal.Signals(caught[0]).name)
            state.write_text(json.dumps(saved))
            sys.exit(1)  # not a return: the requeued run, not this one, delivers the result
        time.sleep(0.1)
        saved["count"] += 1
        if saved["count"] == 1:
            state.write_text(json.dumps(saved))  # tells the test that the job runs, its handler in place
    return saved


def progress(path: Path) -> int:
    """The count that a job last wrote to `path` (0 before it wrote one)."""
    try:
        return int(path.read_text() or 0)
    except FileNotFoundError:
        return 0


def wait_for_runs(cluster: SlurmCluster, job_id: str, states: list[str]) -> None:
    """Wait until accounting holds `states`, one for each run of the job (a requeue starts a new run):
    the result file of a job comes a moment before its end."""

    def runs() -> list[str]:
        return cluster.run("sacct", "-n", "-X", "-D", "-j", job_id, "-o", "State").split()

    try:
        wait_until(lambda: runs() == states, 10, f"job {job_id} to be {states} in accounting")
    except TimeoutError as e:
        raise AssertionError(f"{e}; it is {runs()}") from None


def test_cluster_is_one_node_up_with_the_machines_cpus(slurm_cluster: SlurmCluster) -> None:
    print(f"\nSLURM cluster start-to-idle: {slurm_cluster.startup_s:.1f} s")
    assert slurm_cluster.node_state() in {"idle", "mixed", "allocated"}  # up; other tests may hold jobs
    nodes = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %c").splitlines()  # a line for each partition
    assert {tuple(line.split()) for line in nodes} == {(slurm_cluster.node, str(os.cpu_count()))}


def test_submitit_returns_result_and_job_environment(slurm_cluster: SlurmCluster) -> None:
    t0 = time.monotonic()
    job = executor(slurm_cluster, "result").submit(where_am_i, 7)
    out = job.result()
    print(f"\nsubmitit round trip: {time.monotonic() - t0:.1f} s")
    assert out["square"] == 49
    assert out["job_id"] == job.job_id == out["slurm"]["SLURM_JOB_ID"]
    assert (out["rank"], out["tasks"], out["host"]) == (0, 1, slurm_cluster.node)
    assert (out["slurm"]["SLURM_JOB_PARTITION"], out["slurm"]["SLURM_CPUS_PER_TASK"]) == ("debug", "1")
    wait_for_runs(slurm_cluster, job.job_id, ["COMPLETED"])


def test_job_array_runs_more_jobs_than_cores_at_once(slurm_cluster: SlurmCluster) -> None:
    jobs = executor(slurm_cluster, "array").map_array(busy_interval, [5.0] * 3)
    array_ids = {tuple(j.job_id.split("_")) for j in jobs}
    assert len({a for a, _ in array_ids}) == 1 and sorted(i for _, i in array_ids) == ["0", "1", "2"]
    intervals = [j.result() for j in jobs]
    assert max(s for s, _ in intervals) < min(e for _, e in intervals), f"not all at once: {intervals}"


def test_two_tasks_rendezvous_with_torch_distributed(slurm_cluster: SlurmCluster) -> None:
    job = executor(slurm_cluster, "ddp", tasks_per_node=2).submit(all_reduce_rank)
    tasks = job.results()
    assert [t["total"] for t in tasks] == [3.0, 3.0]
    assert [(t["RANK"], t["SLURM_PROCID"], t["LOCAL_RANK"]) for t in tasks] == [("0",) * 3, ("1",) * 3]
    shared = {(t["WORLD_SIZE"], t["SLURM_NTASKS"], t["MASTER_ADDR"]) for t in tasks}
    assert shared == {("2", "2", slurm_cluster.node)}
    assert len({t["MASTER_PORT"] for t in tasks}) == 1


def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    running = tmp_path / "running"
    job = executor(slurm_cluster, "preempted").submit(Counter(), 30, running)
    wait_until(lambda: progress(running) >= 5, 30, "the preemptible job to count to 5")
    t_preempt = time.time()
    urgent = executor(slurm_cluster, "urgent", slurm_partition="urgent").submit(busy_interval, 0.5)
    counter = job.result()
    _, urgent_end = urgent.result()
    (first, _), (resumed_at, t_resumed) = counter.starts  # exactly two starts: one preemption
    print(f"\npreemption to running again: {t_resumed - t_preempt:.1f} s (resumed at count {resumed_at})")
    assert counter.count == 30 and first == 0 and 5 <= resumed_at < 30
    assert urgent_end <= t_resumed, "the preempted job ran again before the urgent one ended"
    log = job.stderr() or ""
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log, log
    wait_for_runs(slurm_cluster, job.job_id, ["REQUEUED", "COMPLETED"])


def test_scontrol_requeue_resumes_from_own_checkpoint(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    job = executor(slurm_cluster, "requeued").submit(count_on_disk, 30, state)
    wait_until(state.exists, 30, "the job to run")
    t_requeue = time.time()
    slurm_cluster.run("scontrol", "requeue", job.job_id)
    out = job.result()
    (first, _), (resumed_at, t_resumed) = out["starts"]
    print(f"\nscontrol requeue to running again: {t_resumed - t_requeue:.1f} s (resumed at {resumed_at})")
    assert out["count"] == 30 and first == 0 and 0 < resumed_at < 30
    assert out["signals"] == ["SIGTERM"]
    assert t_resumed - t_requeue < 30, "the requeued job waited long: is AuthInfo cred_expire short?"
    wait_for_runs(slurm_cluster, job.job_id, ["REQUEUED", "COMPLETED"])


def test_scancel_makes_result_raise(slurm_cluster: SlurmCluster) -> None:
    job = executor(slurm_cluster, "cancelled").submit(busy_interval, 300.0)
    wait_until(lambda: slurm_cluster.job_state(job.job_id) == "RUNNING", 30, "the job to run")
    job._results_timeout_s = 2  # by default submitit waits 15 s for the result file of a finished job
    t0 = time.monotonic()
    job.cancel()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    print(f"\nscancel to result() raising: {time.monotonic() - t0:.1f} s")
    assert time.monotonic() - t0 < 30


def slurm_environment(_: object) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}


def test_a_stage_is_submitted_with_the_launcher_presets_keys(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """hldx.submit turns hydra/launcher=slurm_cpu and its overrides (a key the schema lacks among them) into the
    stage's sbatch options: a 2-task array here."""
    from hldx import config as C
    from hldx.stages import Stage
    from hldx.submit import executor

    launcher = C.compose(["hydra/launcher=slurm_cpu", f"hydra.launcher.timeout_min={TIMEOUT_MIN}",
                          "hydra.launcher.mem_gb=1", "hydra.launcher.partition=debug",
                          "+hydra.launcher.additional_parameters.comment=hldx-test"], with_hydra=True).hydra.launcher
    stage = Stage("cache", "test", slurm_environment, [0, 1])
    jobs = executor(launcher, tmp_path, stage, None).map_array(stage.fn, stage.tasks)
    envs = [job.result() for job in jobs]
    assert len({e["SLURM_ARRAY_JOB_ID"] for e in envs}) == 1 and [e["SLURM_ARRAY_TASK_ID"] for e in envs] == ["0", "1"]
    assert all(e["SLURM_MEM_PER_NODE"] == "1024" and e["SLURM_JOB_PARTITION"] == "debug" for e in envs)
    assert all(e["SLURM_JOB_NAME"] == "hldx-cache-test" for e in envs)
    assert "Comment=hldx-test" in slurm_cluster.run("scontrol", "show", "job", envs[0]["SLURM_JOB_ID"])
