"""What goes wrong in one run stays in that run: a diverged run fails in one line and is not run again, a
sweep runs every job it can and names each failure, a checkpoint survives a crash at any instant of its save,
and two sweeps that grow one teacher cache to different extents at once both finish."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from hldx import config as C
from hldx import status
from hldx.budget import plan_run
from hldx.checkpoint import Checkpoint
from hldx.job import FAILED, execute

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hldx.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def runs_of(tiny: list[str]) -> list:
    cfg = C.compose(tiny)
    mlflow = MlflowClient(cfg.tracking.uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    return mlflow.search_runs([experiment.experiment_id]) if experiment else []


def test_a_diverged_run_fails_in_one_line_and_is_not_run_again(tiny, tmp_path):
    job = tiny + ["method=nll", "lr=1e30", "train.ckpt_every=1"]
    first = run(job, tmp_path)
    lines = first.stderr.strip().splitlines()
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr[-3000:]
    assert lines[-1].startswith("python -m hldx.run: diverged at step 2 (phase 1 of 1 (nll)): grad_norm=nan")
    assert "at lr=1e+30" in lines[-1]
    (mlrun,) = runs_of(tiny)
    assert mlrun.info.status == "FAILED" and mlrun.data.tags["hldx.failure"].startswith("diverged at step 2")
    run_dir = Path(C.compose(job).paths.runs) / C.run_key(C.compose(job))
    assert Checkpoint.load(run_dir).step == 1  # the checkpoint at step 1; none of the diverged weights
    again = run(job, tmp_path)  # refused at once, saying why and how to retry
    assert again.returncode == 1 and "in an earlier attempt and is not run again" in again.stderr
    assert f"delete {run_dir / FAILED}" in again.stderr and len(runs_of(tiny)) == 1


def test_a_sweep_runs_every_job_and_names_each_failure(tiny, tmp_path, capsys):
    """A sweep with a diverged job runs the other, names the failure as it ends and at the end; hldx.status then
    reads the study back: its table, the failed job's line (its cause, its log), exit status 1, 3 or 0."""
    sweep = run(["-m", *tiny, "method=nll", "lr=1e30,4e-4", f"hydra.sweep.dir={tmp_path}/sweep",
                 "hydra.sweeper.report=false"], tmp_path)
    assert sweep.returncode == 1 and "Traceback" not in sweep.stderr + sweep.stdout, sweep.stderr[-3000:]
    lines = sweep.stderr.strip().splitlines()
    assert lines[-2] == "1 of 3 jobs and stages failed or did not run; the others ran:"  # tokenize and 2 jobs
    assert "lr=1e+30" in lines[-1] and ": diverged at step 2" in lines[-1]
    assert lines[-1].endswith(f"(log: {tmp_path}/sweep/0/run.log)")
    shown = sweep.stdout.splitlines()  # the terminal: a line per job as it ends, the sweep's state
    assert shown[-3].startswith("FAILED nll|lr=1e30  diverged at step 2") and shown[-2].startswith("done   nll|lr=4e-4")
    assert shown[-1].startswith(f"sweep {tmp_path}/sweep: 2/3 done, 1 failed | ")
    assert {(r.data.params["lr"], r.info.status) for r in runs_of(tiny)} == {("1e+30", "FAILED"),
                                                                               ("0.0004", "FINISHED")}
    # What hldx.status reads of it: from MLflow and the run directories, no state of its own.
    study = ["-m", *tiny, "method=nll", "hydra.sweeper.report=false"]
    assert status.main([*study, "lr=1e30,4e-4"]) == 1  # one failed
    table = capsys.readouterr().out.splitlines()
    assert stage_counts(table) == {"tokenize": [1, 0, 0, 0, 0], "student nll": [1, 0, 0, 1, 0],  # finished, running,
                                   "eval": [1, 0, 0, 0, 1]}, table                               # pending, failed, not launched
    assert table[5] == "failed (1):" and table[6].startswith("  lr=1e+30: diverged at step 2 (phase 1 of 1 (nll))")
    assert table[6].endswith(f"at lr=1e+30 (log: {tmp_path}/sweep/0/run.log)")
    assert status.main([*study, "lr=4e-4,1e-3"]) == 3  # one never launched: still to run
    assert stage_counts(capsys.readouterr().out.splitlines())["student nll"] == [1, 0, 0, 0, 1]
    assert status.main([*study, "lr=4e-4"]) == 0  # every job of it finished
    assert capsys.readouterr().out.splitlines()[-1] == "time left: none"


def stage_counts(lines: list[str]) -> dict[str, list[int]]:
    """hldx.status's table: {row: [finished, running, pending, failed, not launched]}."""
    rows = {}
    for line in lines[lines.index(next(l for l in lines if l.startswith("stage "))) + 1:]:
        *name, counts = line.rsplit(None, 5)[0], line.split()[-5:]
        if not all(c.isdigit() for c in counts):
            break
        rows[name[0].strip()] = [int(c) for c in counts]
    return rows


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run_dir / "final").glob("*.safetensors"))))


class _Crash(Exception):
    pass


def test_a_crash_at_any_instant_of_a_checkpoint_save_resumes_exactly(tiny, tmp_path, monkeypatch):
    """The on-disk states a save can leave at each of its instants (and the previous layout's window between
    its two renames), built from real checkpoints; each, resumed, ends bitwise on the uninterrupted weights."""
    job = tiny + ["method=nll", "budget.tokens=4096", "train.ckpt_every=3"]
    reference = tmp_path / "reference"
    execute(C.compose(job + [f"paths.runs={reference}"]))
    key = C.run_key(C.compose(job))
    save, stop_at = Checkpoint.save, {}

    def save_then_crash(state, run_dir, write_state=None):
        save(state, run_dir, write_state)
        if state.step >= stop_at["step"]:
            raise _Crash

    killed = tmp_path / "killed"
    monkeypatch.setattr(Checkpoint, "save", save_then_crash)
    kept = {}
    for step in (3, 6):  # a run stopped right after its checkpoint at step 3, then (resumed) at step 6
        stop_at["step"] = step
        with pytest.raises(_Crash):
            execute(C.compose(job + [f"paths.runs={killed}"]))
        kept[step] = tmp_path / f"ckpt-{step}"
        shutil.copytree(killed / key / "ckpt" / f"p0-s{step:012d}", kept[step])
    monkeypatch.setattr(Checkpoint, "save", save)
    assert sorted(p.name for p in (killed / key / "ckpt").iterdir()) == [f"p0-s{6:012d}"]  # older ones removed

    def state(name: str, build) -> None:
        run_dir = tmp_path / name / key
        shutil.copytree(killed / key, run_dir)
        shutil.rmtree(run_dir / "ckpt")
        build(run_dir)
        assert Checkpoint.load(run_dir).step == 6, name
        execute(C.compose(job + [f"paths.runs={tmp_path / name}", f"tracking.experiment={name}"]))
        a, b = _weights(reference / key), _weights(run_dir)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def put(run_dir: Path, step: int, name: str, without: str | None = None) -> None:
        shutil.copytree(kept[step], run_dir / name)
        if without:
            shutil.rmtree(run_dir / name / without) if (run_dir / name / without).is_dir() else \
                (run_dir / name / without).unlink()

    # Mid-write of the next one (its dcp/ there, its state.json not yet): the one before serves.
    state("writing", lambda d: (put(d, 6, "ckpt/p0-s000000000006"), put(d, 6, "ckpt/.tmp-p0-s000000000009",
                                                                        without="state.json")))
    # The new one renamed into place, the old one not yet removed, or removed in part (its dcp/ gone first).
    state("renamed", lambda d: (put(d, 3, "ckpt/p0-s000000000003"), put(d, 6, "ckpt/p0-s000000000006")))
    state("removing", lambda d: (put(d, 3, "ckpt/p0-s000000000003", without="dcp"),
                                 put(d, 6, "ckpt/p0-s000000000006")))
    # The previous layout: ckpt/ itself, or only ckpt.old/ (a crash between its two renames).
    state("legacy", lambda d: put(d, 6, "ckpt"))
    state("legacy-between-renames", lambda d: (put(d, 6, "ckpt.old"), put(d, 3, "ckpt.tmp", without="state.json")))
    assert plan_run(C.compose(job)).phases[0].steps > 6


@pytest.mark.slow
def test_two_sweeps_grow_one_cache_to_different_extents_at_once(tiny, tmp_path):
    """KD and HLDF sweeps of different budgets, started together on one HLDX cache (the shared teacher is
    pre-trained by the first and waited for by the other): both finish."""
    jobs = {"short": ["method=kd", "budget.tokens=2048,3072"], "long": ["method=hldf,kd", "budget.tokens=6144"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "hldx.run", "-m", *tiny, *extra,
                                     f"tracking.uri=sqlite:///{tmp_path}/{name}.db", f"paths.runs={tmp_path}/{name}",
                                     f"hydra.sweep.dir={tmp_path}/sweep-{name}", "hydra.sweeper.report=false"],
                                    cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, extra in jobs.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        assert len(re.findall(r"\] - (kd|hldf)\|\S+ finished: val_logppl=", out)) == 2, out[-4000:]


def test_a_run_whose_tracking_store_was_replaced_logs_into_a_new_run(tiny, tmp_path):
    """mlflow.db deleted (or tracking.uri changed) while paths.runs keeps the run: the checkpoint's MLflow run is
    not in the new store, so the run is logged as a new one there instead of failing."""
    job = tiny + ["method=nll"]
    execute(C.compose(job))
    again = job + [f"tracking.uri=sqlite:///{tmp_path}/new.db"]
    metrics = execute(C.compose(again))
    (run,) = runs_of(again)
    assert run.info.status == "FINISHED" and run.data.metrics["eval/val_logppl"] == metrics["eval/val_logppl"]
