"""DDP and FSDP2 on CPU (gloo), in real processes started by torchrun: two ranks with B/2 sequences each follow
the loss curve of one rank with B for every method and phase; a two-rank run killed with SIGKILL inside
HLDF's phase 1, at its boundary and inside phase 2 ends, run again each time with the same command, with the
uninterrupted run's weights bit for bit; a checkpoint is not resumed on another number of ranks."""
from __future__ import annotations

import json
from dataclasses import asdict
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from slurm_cluster import free_port

from hldx import config as C
from hldx.budget import plan_run
from hldx.checkpoint import Checkpoint
from hldx.errors import ConfigError
from hldx.job import execute

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
METHODS = {"nll": [], "kd": [], "hldc": ["gamma=1"], "hldf": ["p1=0.3"]}


def torchrun(args: list[str], ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]


def env() -> dict:
    """The tests' environment (HLDX_CACHE: the session's cache) with one thread per rank."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def curve(uri: str, experiment: str) -> list[tuple[int, float]]:
    """(step, train/loss) of the one student run of the experiment."""
    mlflow = MlflowClient(uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id],
                                filter_string="tags.`hldx.role` = 'student'")
    assert run.info.status == "FINISHED"
    return sorted((m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, "train/loss"))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run_dir / "final").glob("*.safetensors"))))


@pytest.fixture
def base(tiny):
    return [o for o in tiny if not o.startswith(("paths.runs=", "tracking.uri=", "tracking.experiment="))] + [
        "budget.tokens=4096", "train.log_every=2"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_at_half_the_batch_follow_one_rank(base, tmp_path, mode):
    """One rank at B = 4 in micro-batches of 2 against two ranks at 2: the same sums of the same products
    (gradients averaged by exact halving; the clipping norm summed in float64), so DDP and FSDP2 end with the
    one rank's weights bit for bit; the logged curves differ only in the order the steps' losses are summed."""
    jobs = {m: base + extra + [f"method={m}", f"tracking.experiment={m}"] for m, extra in METHODS.items()}
    two = [job + [f"train.parallel={mode}", f"paths.runs={tmp_path}/two", f"tracking.uri=sqlite:///{tmp_path}/two.db"]
           for job in jobs.values()]
    (tmp_path / "jobs.json").write_text(json.dumps(two))
    done = subprocess.run(torchrun(["tests/rank_jobs.py", str(tmp_path / "jobs.json")]), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): a matmul's sums in the same order
    try:
        for job in jobs.values():
            execute(C.compose(job + ["train.micro_batch_size=2", f"paths.runs={tmp_path}/one",
                                     f"tracking.uri=sqlite:///{tmp_path}/one.db"]))
    finally:
        torch.set_num_threads(threads)
    for method in jobs:
        a, b = curve(f"sqlite:///{tmp_path}/two.db", method), curve(f"sqlite:///{tmp_path}/one.db", method)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) > 8, method
        assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-6, abs=0), method
        assert b[-1][1] < max(v for _, v in b) - 0.1, method  # it learnt: the curves compared are not flat
        key = C.run_key(C.compose(jobs[method]))  # the engine and the micro-batch are not part of it
        a, b = weights(tmp_path / "two" / key), weights(tmp_path / "one" / key)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method


def _kill_tree(pid: int) -> None:
    """SIGSTOP, then SIGKILL, the process and every descendant: torchrun starts its ranks in sessions of their
    own, so killing its process group alone would leave them training (as a node failure would not)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # it ended on its own
        return
    for signal in ("suspend", "kill"):
        for proc in tree:
            try:
                getattr(proc, signal)()
            except psutil.NoSuchProcess:
                pass
    psutil.wait_procs(tree, timeout=30)


def _state(run_dir: Path) -> dict | None:
    found = Checkpoint.load(run_dir)
    return None if found is None else asdict(found)


def _until(run: list[str], run_dir: Path, wanted, timeout: float = 300) -> dict:
    """Start `run`; once its newest checkpoint says `wanted(state)`, SIGKILL it and its ranks; return the
    checkpoint it left."""
    proc = subprocess.Popen(run, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while True:
            if (seen := _state(run_dir)) is not None and wanted(seen):
                break
            assert proc.poll() is None, f"the run ended first: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.01)
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    return _state(run_dir)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigkilled_two_rank_hldf_resumes_to_the_same_weights(base, tmp_path, mode):
    job = base + ["method=hldf", "p1=0.3", "train.ckpt_every=2", f"train.parallel={mode}",
                  f"tracking.uri=sqlite:///{tmp_path}/m.db", "tracking.experiment=killed"]
    key = C.run_key(C.compose(job))
    p1 = plan_run(C.compose(job)).phases[0].steps
    reference = torchrun(["-m", "hldx.run", *job, f"paths.runs={tmp_path}/reference",
                          f"hydra.run.dir={tmp_path}/out-ref"])
    done = subprocess.run(reference, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run = torchrun(["-m", "hldx.run", *job, f"paths.runs={tmp_path}/killed", f"hydra.run.dir={tmp_path}/out"])
    state = tmp_path / "killed" / key
    left = [_until(run, state, lambda s: s["phase"] == 0 and s["step"] >= 2),          # inside phase 1
            _until(run, state, lambda s: s["phase"] == 1),                              # at its end
            _until(run, state, lambda s: s["phase"] == 1 and s["step"] >= 2)]           # inside phase 2
    assert left[0]["phase"] == 0 and 0 < left[0]["step"] < p1 and left[0]["ranks"] == 2
    assert left[1]["phase"] == 1 and left[2]["phase"] == 1 and left[2]["step"] >= 2
    # Resumed on one rank instead of two: refused, naming both counts, the checkpoint left as it was.
    with pytest.raises(ConfigError, match="written by a job of 2 rank\\(s\\) and this one has 1"):
        execute(C.compose(job + [f"paths.runs={tmp_path}/killed", "train.parallel=none"]))
    assert _state(state) == left[2]
    done = subprocess.run(run, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    a, b = weights(tmp_path / "reference" / key), weights(tmp_path / "killed" / key)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
