"""Every entry point answers a bad value with one line on stderr naming the key and what is allowed, exit
status 2 and no traceback, before any work; a bug keeps its traceback."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hldx import cli, job, study
from hldx import config as C
from hldx.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# (command, the text that must name the key, what was given and what is allowed)
BAD = [
    (["hldx.run", "train.precision=fp8"], "train.precision=fp8 is invalid: expected one of auto, bf16, fp32"),
    (["hldx.run", "seed=abc"], "seed=abc is invalid: expected an integer"),
    (["hldx.run", "teacher.source=bogus"], "teacher.source=bogus is invalid: expected cache or online"),
    (["hldx.run", "method=fitnet"], "method=fitnet is invalid: expected one of hldc, hldf, kd, nll"),
    (["hldx.run", "train.sequence_length=64"], "train.sequence_length=64 is invalid: there is no such key in train"),
    (["hldx.run", "-m", "method=nll,kd", "train.grad_clip=-1"], "train.grad_clip=-1 is invalid: expected a number > 0"),
    (["hldx.run", "-m", "lr=1e-3", "train.betas=[0.9]"], "train.betas=[0.9] is invalid: expected two numbers"),
    (["hldx.plan", "-m", "train.warmup_steps=-10"], "train.warmup_steps=-10 is invalid: expected an integer >= 0"),
    (["hldx.cache", "build", "train.final_lr_fraction=2"], "train.final_lr_fraction=2 is invalid: expected a number in [0, 1]"),
    (["hldx.cache", "verify", "dir=/no/such/cache"], "dir=/no/such/cache is invalid: expected the directory"),
    (["hldx.evaluate", "ckpt=/no/such/ckpt"], "ckpt=/no/such/ckpt is invalid: expected a saved checkpoint"),
    (["hldx.evaluate", "ckpt=/no/such/ckpt", "train.weight_decay=-1"], "train.weight_decay=-1 is invalid"),
    (["hldx.bench", "bench.methods=[nll,fast]"], "bench.methods=['nll', 'fast'] is invalid: expected a non-empty list"),
    (["analysis.report", "--runs-csv", "/no/such.csv", "--out", "/tmp/x"], "--runs-csv /no/such.csv is invalid"),
    (["analysis.report", "--out"], "argument --out: expected one argument"),
    (["hldx.run", "-m", "data=c4", "data.tasks=2", "hydra/launcher=slurm_cpu", "hydra.sweeper.dry_run=true"],
     "data.tasks=2 is invalid for data.path=allenai/c4: tokenizing in parts needs local files"),
    (["hldx.run", "method=hldc", "hidden.pairs=[[2,3],[2,3]]"],
     "hidden.pairs=[[2,3],[2,3]] is invalid: expected distinct pairs ([2,3] is given twice)"),
    (["hldx.plan", "-m", "method=hldf", "hidden.adapter=identity"], "hidden.adapter=identity is invalid: expected linear"),
    (["hldx.run", "cache.logits=bogus"], "cache.logits=bogus is invalid: expected topk or sampled"),
    (["hldx.plan", "-m", "cache.logits=sampled", "cache.draws=0"], "cache.draws=0 is invalid: expected an integer >= 1"),
    (["hldx.run", "eval.local_dir=/no/such/dir"],  # eval=quick used to train, then skip every task
     "eval.local_dir=/no/such/dir is invalid: expected an existing directory of the tasks' JSONL files"),
    (["hldx.evaluate", "ckpt=/no/such/ckpt", "eval.local_dir=/no/such/dir"],
     "eval.local_dir=/no/such/dir is invalid: expected an existing directory"),
    (["hldx.run", "-m", "method=nll,kd", "plan.bench=/no/such/bench.json"],  # read by the stage graph
     "plan.bench=/no/such/bench.json is not a readable hldx.bench result"),
]


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """python -m ARGS with a cache, runs folder and MLflow store of its own under tmp."""
    tmp.mkdir(parents=True, exist_ok=True)
    own = [f"paths.runs={tmp}/runs", f"tracking.uri=sqlite:///{tmp}/m.db"] if args[0] == "hldx.run" else []
    return subprocess.run([sys.executable, "-m", *args, *own], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HLDX_CACHE": str(tmp / "cache")}, timeout=180)


@pytest.mark.slow
def test_every_entry_point_reports_a_bad_value_in_one_line(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda i: _run(BAD[i][0], tmp_path / str(i)), range(len(BAD))))
    for i, ((args, message), result) in enumerate(zip(BAD, done)):
        head, *jobs = result.stderr.strip().splitlines()
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr, args
        assert head.startswith(f"python -m {args[0]}: error: "), (args, result.stderr)
        if "-m" in args and "method=nll,kd" in args:  # a sweep: its jobs counted, each cause once with an example
            assert head.endswith("2 invalid job(s) in the sweep; nothing was launched:"), result.stderr
            assert len(jobs) == 1 and message in jobs[0] and jobs[0].endswith("(2 jobs, e.g. method=nll)"), jobs
        else:
            assert jobs == [] and message in head, (args, result.stderr)
        assert not (tmp_path / str(i) / "runs").exists() and not (tmp_path / str(i) / "m.db").exists()


@pytest.mark.parametrize("given, message", [
    ("eval.local_dir=/no/such/dir", "eval.local_dir=/no/such/dir is invalid: expected an existing directory"),
    ("teacher.ckpt=/no/such/teacher", "teacher.ckpt=/no/such/teacher holds no checkpoint (config.json missing)"),
    ("data.path=/no/such/corpus", "data.path=/no/such/corpus is invalid: expected a readable directory"),
    ("plan.bench=/no/such/bench.json", "plan.bench=/no/such/bench.json is not a readable hldx.bench result"),
    ("tracking.uri=sqlite:////no/such/dir/m.db",  # MLflow makes the file, not its directory: after tokenizing
     "tracking.uri=sqlite:////no/such/dir/m.db is invalid: its directory /no/such/dir does not exist"),
    ("cache.dir=/no/such/dir/cache", "cache.dir=/no/such/dir/cache is invalid: its directory /no/such/dir does not"),
])
def test_a_path_that_must_exist_is_checked_before_any_work(given, message, tmp_path):
    """hldx.job.check, which every job passes before it reads, tokenizes or trains anything (a sweep's jobs
    before any is launched: hldx.study.plan_jobs), refuses each path that names what must already exist."""
    cfg = C.compose(["method=kd", f"paths.cache={tmp_path}/cache", given])
    with pytest.raises(ConfigError) as err:
        job.check(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()  # nothing built: not even the tokenizer
    with pytest.raises(ConfigError, match=re.escape(message)):
        study.launch_plan([["method=kd", f"paths.cache={tmp_path}/cache", given]])


def test_a_budget_too_small_fails_before_the_teacher_is_trained(tmp_path):
    """budget.tokens=10 used to pre-train the on-demand teacher for minutes before saying so."""
    result = _run(["hldx.run", "budget.tokens=10"], tmp_path)
    assert result.returncode == 2 and "too small for one optimizer step" in result.stderr
    assert not (tmp_path / "cache" / "teachers").exists() and not (tmp_path / "cache" / "streams").exists()


def test_a_bug_keeps_its_traceback(capsys):
    @cli.command
    def broken(argv=None) -> int:
        raise ZeroDivisionError("a bug")

    @cli.command
    def mistaken(argv=None) -> int:
        raise ConfigError("lr=-1 is invalid: expected a number > 0")

    with pytest.raises(ZeroDivisionError):
        broken()
    assert mistaken() == 2
    assert capsys.readouterr().err.endswith("error: lr=-1 is invalid: expected a number > 0\n")
