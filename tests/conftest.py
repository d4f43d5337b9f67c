"""Shared fixtures: an isolated hldx cache per session and the overrides of a seconds-long tiny run."""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["slurm_cluster"]

# Nothing here may reach a model hub or dataset host.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def hldx_cache(tmp_path_factory) -> str:
    """One cache for the session: the tokenizer, token streams and tiny teacher are built once."""
    path = str(tmp_path_factory.mktemp("hldx-cache"))
    os.environ["HLDX_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tracking_db(tmp_path_factory) -> str:
    """One sqlite MLflow store for the session (creating one takes seconds); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def tiny(hldx_cache, tracking_db, tmp_path, request) -> list[str]:
    """Overrides for a run of a few dozen CPU steps, tracked in an MLflow experiment of this test's own."""
    experiment = request.node.name.replace("[", "-").replace("]", "")
    return [
        "train.seq_len=32", "train.batch_size=4", "data.max_train_tokens=32768", "train.log_every=5", "budget.tokens=2048",
        "teacher.build.tokens=8192", "eval.val_sequences=8", "eval.tasks=[val]",
        f"tracking.uri={tracking_db}", f"tracking.experiment={experiment}", f"paths.runs={tmp_path}/runs",
    ]
