"""DDP on CPU (gloo): two ranks with B/2 sequences each follow the loss curve of one rank with B sequences.

The two ranks are real processes started by torchrun, through `python -m hldx.run` as a user starts them.
Their KD run needs a teacher that no other test builds (a budget of its own) and a fresh MLflow store, so it
also shows that the ranks pre-train the teacher once and create the store once, without a deadlock.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from slurm_cluster import free_port
from test_distributed import curve

from hldx import config as C
from hldx.job import execute

ROOT = Path(__file__).resolve().parent.parent


def final_weights(runs: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(runs.glob("*/final/*.safetensors"))))


def test_two_ranks_with_half_batches_follow_the_one_rank_loss_curve(tiny, tmp_path):
    overrides = [o for o in tiny if not o.startswith(("paths.runs=", "tracking.uri="))] + [
        "method=kd", "budget.tokens=4096", "train.log_every=2", "teacher.build.tokens=4096"]
    two = [f"paths.runs={tmp_path}/two", f"tracking.uri=sqlite:///{tmp_path}/two.db", f"hydra.run.dir={tmp_path}/out"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "hldx.run"]
    done = subprocess.run(torchrun + overrides + two, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    one = [f"paths.runs={tmp_path}/one", f"tracking.uri=sqlite:///{tmp_path}/one.db"]
    execute(C.compose(overrides + one))

    experiment = C.compose(overrides).tracking.experiment
    curve_two, curve_one = curve(f"sqlite:///{tmp_path}/two.db", experiment), \
        curve(f"sqlite:///{tmp_path}/one.db", experiment)
    assert [s for s, _ in curve_two] == [s for s, _ in curve_one] == list(range(2, 33, 2))
    assert [v for _, v in curve_two] == pytest.approx([v for _, v in curve_one], rel=1e-5)
    assert curve_one[-1][1] < curve_one[0][1] - 0.3  # it learnt: the curves compared are not flat
    a, b = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
    # The ranks pre-trained their teacher once, one process while the other waited, before they joined.
    mlflow = MlflowClient(f"sqlite:///{tmp_path}/two.db")
    teachers = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                  filter_string="tags.`hldx.role` = 'teacher'")
    assert len(teachers) == 1 and teachers[0].info.status == "FINISHED"
