"""Sweeps without a cluster: the study grids in sweeps/ (+sweep=NAME), what hldx's sweeper launches (each
distinct run once, nothing finished, every bad job named first), the checks at launch, and GPU-hours."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from slurm_cluster import free_port

from hldx import config as C
from hldx import status
from hldx.budget import flops_per_token
from hldx.plan import main
from hldx.study import expand_sweep, launch_plan, plan_sweep

ROOT = Path(__file__).resolve().parent.parent
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


@pytest.mark.parametrize("name, student, ot, p1", [("paper-123m", "gemma3-123m", 54, [0.01, 0.05]),
                                                    ("paper-735m", "gemma3-735m", 12, [0.01, 0.04])])
def test_paper_sweeps_spell_table_2(name, student, ot, p1):
    jobs = expand_sweep([f"+sweep={name}"])
    assert len(jobs) == 4 * 3 * 2 * 2 * 2 * 2  # method x lr x tau x alpha x gamma x p1, as Hydra expands it
    runs, errors = plan_sweep([f"+sweep={name}"])
    assert not errors
    assert {m: sum(r.method == m for r in runs) for m in C.METHODS} == {"nll": 3, "kd": 12, "hldc": 24, "hldf": 24}
    assert {r.student for r in runs} == {student}
    assert sorted({r.hp["lr"] for r in runs}) == [1e-4, 4e-4, 1.6e-3]
    assert sorted({r.hp["p1"] for r in runs if r.method == "hldf"}) == p1
    cfg = C.compose([f"+sweep={name}"])
    assert (cfg.budget.ot, cfg.budget.accounting, cfg.train.batch_size, cfg.teacher.model.name) == (
        ot, "paper", 512, "gemma3-3.4b")
    assert cfg.tracking.experiment == name


def test_command_line_overrides_win_over_the_sweep_config():
    jobs = expand_sweep(["+sweep=demo", "lr=1e-3", "method=kd,hldf"])
    assert len(jobs) == 2 * 2 * 2  # method x alpha x seed: lr is fixed, method narrowed
    assert all("lr=0.001" in job and "+sweep=demo" in job for job in jobs)
    runs, errors = plan_sweep(["+sweep=demo"])
    assert not errors and len(runs) == 2 + 4 + 4 + 4
    assert C.compose(["+sweep=demo"]).tracking.experiment == "demo"


def test_plan_states_gpu_hours_at_the_assumed_throughput(tmp_path, capsys):
    out = tmp_path / "made" / "plan.json"  # its directory made before any work
    grid = ["method=nll,hldf", "lr=4e-4", "tau=1", "alpha=0.7", "p1=0.05"]
    assert main(["-m", "+sweep=paper-123m", *grid, f"plan.json={out}"]) == 0
    plan = json.loads(out.read_text())
    nll, hldf = plan["jobs"]
    # NLL at 40% of 989 TFLOP/s on the real FLOPs per token: 6N + 6dV plus attention (the exact accounting).
    exact = flops_per_token(C.compose(["+sweep=paper-123m", "method=hldf", "budget.accounting=exact"]))
    seconds = nll["phases"][0]["tokens"] * exact["data"] / (0.4 * 989e12)
    assert nll["gpu_hours"] == pytest.approx(seconds / 3600)
    assert 60 < nll["gpu_hours"] < 70  # 108B tokens of a 121M model: ~64 GPU-hours
    hours = sum(p["tokens"] * exact[p["name"]] for p in hldf["phases"]) / (0.4 * 989e12) / 3600
    assert hldf["gpu_hours"] == pytest.approx(hours)
    assert plan["gpu_hours"] == pytest.approx(nll["gpu_hours"] + hldf["gpu_hours"])
    printed = capsys.readouterr().out
    assert f"total: {plan['gpu_hours']:.4g} GPU-hours" in printed and "40% MFU of 989 TFLOP/s" in printed


def test_plan_takes_the_throughput_hldx_bench_measured(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    rates = {"nll": 4e5, "kd": 3e5, "hldc": 2.5e5, "ht": 8e5}
    bench.write_text(json.dumps({"device": "NVIDIA H100", "student": "gemma3-123m", "tokens_per_s": rates}))
    out = tmp_path / "plan.json"
    assert main(["+sweep=paper-123m", "method=hldf", "lr=4e-4", "tau=1", "alpha=0.7", "p1=0.05",
                 f"plan.bench={bench}", f"plan.json={out}"]) == 0
    (job,) = json.loads(out.read_text())["jobs"]
    ht, kd = job["phases"]
    assert job["gpu_hours"] == pytest.approx((ht["tokens"] / 8e5 + kd["tokens"] / 3e5) / 3600)
    assert "measured by hldx.bench on NVIDIA H100" in capsys.readouterr().out
    assert main(["+sweep=paper-735m", "method=nll", "lr=4e-4", f"plan.bench={bench}"]) == 2
    assert "measured student gemma3-123m" in capsys.readouterr().err


def check_sweep(jobs: list[list[str]], launcher: str = "") -> list[list[str]]:
    """The overrides of the jobs left to launch."""
    return [job for job, _, _ in launch_plan(jobs, launcher)]


def test_every_bad_job_is_named_before_anything_launches():
    jobs = expand_sweep(["+sweep=paper-123m", "method=nll,kd", "lr=4e-4,-1", "tau=1", "alpha=0.7", "gamma=0.1",
                         "p1=0.05", "tracking=local"])
    with pytest.raises(C.ConfigError) as err:
        check_sweep(jobs)
    lines = str(err.value).splitlines()
    assert lines[0] == "3 invalid job(s) in the sweep; nothing was launched:"  # each cause once, with its jobs
    assert lines[1].startswith("  lr=-1 is invalid: expected a number > 0") and lines[1].endswith(
        "(2 jobs, e.g. method=nll lr=-1)")
    assert lines[2].startswith("  teacher.ckpt is not set") and lines[2].endswith("(job: method=kd lr=0.0004)")
    assert len(lines) == 3
    with pytest.raises(C.ConfigError, match="teacher.ckpt=/no/teacher holds no checkpoint"):
        check_sweep(expand_sweep(["+sweep=paper-123m", "method=kd", "lr=4e-4", "tau=1", "alpha=0.7",
                                  "teacher.ckpt=/no/teacher", "tracking=local"]))


def test_a_refused_sweep_counts_the_distinct_jobs_of_each_cause():
    """The paper's grid at one lr with a teacher directory that holds no checkpoint: 64 jobs, 48 of them distilled
    but 20 distinct (KD ignores gamma and p1, HLDC p1, HLDF gamma); the refusal says the cause once, for those
    20 (on the whole grid it used to say it 144 times, once a job)."""
    with pytest.raises(C.ConfigError) as err:
        check_sweep(expand_sweep(["+sweep=paper-123m", "lr=1e-4", "teacher.ckpt=/no/teacher", "tracking=local"]))
    head, cause = str(err.value).splitlines()
    assert head == "20 invalid job(s) in the sweep; nothing was launched:"
    assert cause.startswith("  teacher.ckpt=/no/teacher holds no checkpoint") and "(20 jobs, e.g. method=kd " in cause


def test_missing_sbatch_is_named_at_launch(tiny, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(C.ConfigError, match="sbatch is not on PATH"):
        check_sweep(expand_sweep(tiny + ["method=nll"]), SLURM_LAUNCHER)
    assert check_sweep(expand_sweep(tiny + ["method=nll"])) != []  # the local launcher needs none
    assert status.main(["-m", *tiny, "method=nll", "hydra/launcher=slurm_cpu"]) == 2  # nor does hldx.status here
    assert "hydra/launcher submits to SLURM, but squeue or sacct is not on PATH" in capsys.readouterr().err


@pytest.mark.parametrize("server", ["closed", "mute"])
def test_tracking_server_that_does_not_answer_fails_within_seconds(tiny, server):
    with socket.socket() as mute:  # accepts connections, never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        uri = f"http://127.0.0.1:{mute.getsockname()[1] if server == 'mute' else free_port()}"
        t0 = time.monotonic()
        with pytest.raises(C.ConfigError, match=f"tracking.uri={uri} does not answer"):
            check_sweep(expand_sweep(tiny + ["method=nll", f"tracking.uri={uri}"]))
    assert time.monotonic() - t0 < 20  # MLflow's own client would retry for minutes


def test_sweep_runs_each_distinct_job_once_then_skips_it_until_it_fails(tiny, tmp_path):
    grid = [*tiny, "method=nll", "tau=0.5,1", "alpha=0.7,0.9"]  # NLL ignores tau and alpha: 4 jobs, 1 run
    cmd = [sys.executable, "-m", "hldx.run", "-m", *grid, f"hydra.sweep.dir={tmp_path}/m", "hydra.sweeper.report=false"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sweep: 4 job(s), 1 distinct, 0 finished already: launching 1" in done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.is_dir()) == ["0", "stages"]  # one job's output
    jobs = expand_sweep(grid)
    assert check_sweep(jobs) == []  # FINISHED in MLflow, its final checkpoint on disk
    cfg = C.compose(jobs[0])
    mlflow = MlflowClient(cfg.tracking.uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                filter_string=f"tags.`hldx.run_key` = '{C.run_key(cfg)}'")
    mlflow.set_terminated(run.info.run_id, "FAILED")
    assert check_sweep(jobs) == jobs[:1]  # a failed run is launched again (and resumes from its checkpoint)
