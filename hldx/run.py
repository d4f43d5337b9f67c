"""Train (and evaluate) one run, or run a study: config -> checks -> plan -> train -> evaluate -> log.

    python -m hldx.run                                   # one tiny KD student on the embedded corpus
    python -m hldx.run -m method=nll,kd lr=1e-4,4e-4     # a sweep (Hydra multirun), checked up front
    python -m hldx.run -m +sweep=demo                    # a study's grid from sweeps/
    python -m hldx.run -m +sweep=demo hydra/launcher=slurm_cpu   # ... its stages as SLURM jobs
    python -m hldx.run -m +sweep=demo hydra/launcher=slurm_cpu hydra.sweeper.dry_run=true   # the sbatch plan
    python -m hldx.run --help                            # every config group and key

A run that already FINISHED (same hldx.run_key in the MLflow experiment) is skipped; an interrupted one
resumes from its last checkpoint under paths.runs/<run_key>/ and continues its MLflow run. A sweep runs as
its stage graph (hydra/sweeper=hldx): tokenize -> teacher -> cache (one per distinct teacher, whatever the
seeds) -> students -> evaluations -> report, here in order, or on SLURM as dependent jobs (the command
returns once they are submitted); each distinct run once, so the same command, run again, finishes a study.
A bad value anywhere ends with one line naming the key, and exit status 2.
"""
from __future__ import annotations

import os

import hydra
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hldx import config as C
from hldx import cli, job


@hydra.main(config_path="../conf", config_name="config", version_base=None)
@cli.task
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # here, not under __main__: SLURM jobs start here
    transformers.utils.logging.disable_progress_bar()
    C.warn_unused(cfg, list(HydraConfig.get().overrides.task))
    return job.run(cfg).get("eval/val_logppl")  # every key and every stage's plan checked before any work


if __name__ == "__main__":
    cli.run(main)
