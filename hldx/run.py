"""Train (and evaluate) one run or a sweep: config -> validate -> plan -> train -> evaluate -> log.

    python -m hldx.run                                   # one tiny KD student on the embedded corpus
    python -m hldx.run -m method=nll,kd lr=1e-4,4e-4     # a sweep (Hydra multirun), validated up front
    python -m hldx.run -m +sweep=demo                    # a study's grid from sweeps/
    python -m hldx.run -m +sweep=demo hydra/launcher=slurm_cpu   # ... as SLURM jobs (conf/hydra/launcher/)
    python -m hldx.run --help                            # every config group and key

A run that already FINISHED (same hldx.run_key in the MLflow experiment) is skipped; an interrupted one
resumes from its last checkpoint under paths.runs/<run_key>/ and continues its MLflow run. A sweep launches
each distinct run once (hydra/sweeper=hldx: check_sweep), so the same command, run again, finishes a study.
"""
from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from pathlib import Path

import hydra
import torch.distributed as dist
import transformers
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hldx import config as C
from hldx import data, tracking
from hldx.evaluate import evaluate
from hldx.plan import plan_jobs, plan_run
from hldx.teacher import teacher_config, teacher_path, teacher_source
from hldx.train import Checkpoint, Trainer, device_of, init_distributed, world

log = logging.getLogger("hldx")


def ensure_teacher(cfg: DictConfig) -> None:
    """Pre-train the on-demand teacher once (file-locked: parallel jobs wait for the first one)."""
    path = teacher_path(cfg)
    if cfg.teacher.ckpt or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / "build.lock")):
        if not path.exists():
            log.info("pre-training the %s teacher once (shared by every run): %s", cfg.teacher.model.name, path)
            execute(teacher_config(cfg), role="teacher", run_dir=path.parent)


def finished(cfg: DictConfig, key: str, run_dir: Path | None = None) -> str | None:
    """The MLflow run id of this run if it finished: FINISHED in MLflow and its final checkpoint on disk."""
    run_id = tracking.finished_run(cfg, key)
    return run_id if run_id and (Path(run_dir or Path(cfg.paths.runs) / key) / "final").exists() else None


def execute(cfg: DictConfig, role: str = "student", run_dir: Path | None = None) -> dict[str, float]:
    """Train and evaluate one run; returns its evaluation metrics ({} if it had already finished)."""
    plan = plan_run(cfg)
    run_dir = Path(run_dir or Path(cfg.paths.runs) / plan.run_key)
    final = run_dir / "final"
    rank, size = world()
    done = [finished(cfg, plan.run_key, run_dir) if rank == 0 else None]  # rank 0 alone asks MLflow ...
    if size > 1:
        dist.broadcast_object_list(done)  # ... and tells the others
    if done[0]:
        log.info("%s already finished (run_key %s, MLflow run %s): skipped", C.run_name(cfg), plan.run_key, done[0])
        return {}
    tokenizer = data.tokenizer_for(cfg)
    stream = data.prepare(cfg, "train", tokenizer)
    teacher = None
    if cfg.method.name in C.DISTILLED:
        ensure_teacher(cfg)
        teacher = teacher_source(cfg, tokenizer, stream, device_of(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = Checkpoint.load(run_dir)
    tracker = tracking.Tracker(cfg, plan.run_key, role, run_id=resume.tracking_run_id if resume else None) \
        if rank == 0 else None
    try:
        batches = data.Batches(stream, cfg.train.seq_len, cfg.train.batch_size, cfg.seed, rank, size)
        trainer = Trainer(cfg, plan, batches, teacher, run_dir, tokenizer, tracker.log if tracker else None,
                          tracker.run_id if tracker else None)
        model = trainer.fit()
        if tracker is None:
            return {}
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        evaluation = evaluate(model.eval(), tokenizer, cfg)
        metrics = evaluation.metrics
        tracker.log(metrics, sum(p.steps for p in plan.phases))
        tracker.tag(**{"hldx.ckpt": str(final.resolve())}, **evaluation.tags())
    except BaseException as err:
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    tracker.finish()
    shown = ", ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in metrics.items())
    log.info("%s finished: %s | checkpoint %s | MLflow run %s at %s", C.run_name(cfg), shown, final,
             tracker.run_id, cfg.tracking.uri)
    return metrics


def _join_ranks(cfg: DictConfig) -> None:
    """Several SLURM tasks form one job: export torch's rendezvous variables from SLURM's, then join."""
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    init_distributed(device_of(cfg))


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # here, not under __main__: SLURM jobs start here
    transformers.utils.logging.disable_progress_bar()
    C.validate(cfg)
    C.warn_unused(cfg, list(HydraConfig.get().overrides.task))
    if problem := _unreachable(cfg.tracking.uri):
        raise C.ConfigError(problem)
    if cfg.method.name in C.DISTILLED:
        ensure_teacher(cfg)  # before the ranks join: one process pre-trains it, the others wait for its lock
    _join_ranks(cfg)
    metrics = execute(cfg)
    return metrics.get("eval/val_logppl")


def _unreachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an http(s) tracking server does not answer its health check within seconds; None if it does (or
    the URI is not a server). MLflow's client would otherwise retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return None
    except (OSError, ValueError) as err:
        return (f"tracking.uri={uri} does not answer ({getattr(err, 'reason', err)}): start the server "
                f"(mlflow server --host HOST --port PORT) or point tracking.uri at a running one")


def check_sweep(jobs: list[list[str]], launcher: str = "") -> list[list[str]]:
    """The jobs of a sweep left to launch, one per run_key, before anything is launched.

    Every job is composed, validated and planned; bad jobs, a distilled job without its teacher, a SLURM
    launcher (`launcher`: hydra.launcher._target_) without `sbatch` on PATH and a tracking server that does
    not answer raise ConfigError naming each of them. Of jobs with the same run_key only the first is kept;
    a finished run is skipped, a failed or interrupted one is kept (it resumes from its checkpoint).
    """
    planned, errors = plan_jobs(jobs)
    for job, cfg, _ in planned:
        if cfg.method.name not in C.DISTILLED:
            continue
        if OmegaConf.is_missing(cfg.teacher, "ckpt"):
            errors.append(f"  {' '.join(job)}: teacher.ckpt is not set: pass teacher.ckpt=DIR (the teacher, "
                          f"pre-trained with python -m hldx.run method=nll student={cfg.teacher.model.name})")
        elif cfg.teacher.ckpt and not (Path(cfg.teacher.ckpt).expanduser() / "config.json").exists():
            errors.append(f"  {' '.join(job)}: teacher.ckpt={cfg.teacher.ckpt} holds no checkpoint (config.json "
                          f"missing): point it at the teacher's saved model directory")
    problems = []
    if launcher.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
        problems.append("  hydra/launcher submits to SLURM, but sbatch is not on PATH: launch from a SLURM "
                        "login node, or leave hydra/launcher out to run the jobs here")
    problems += [f"  {why}" for uri in sorted({cfg.tracking.uri for _, cfg, _ in planned})
                 if (why := _unreachable(uri))]
    if errors or problems:
        head = f"{len(errors)} invalid job(s) in the sweep; " if errors else ""
        raise C.ConfigError(f"{head}nothing was launched:\n" + "\n".join(errors + problems))
    todo = [(job, cfg) for job, cfg, run in planned if not finished(cfg, run.run_key)]
    log.info("sweep: %d job(s), %d distinct, %d finished already: launching %d", len(jobs), len(planned),
             len(planned) - len(todo), len(todo))
    for job, cfg in todo:
        log.info("  %s", C.run_name(cfg))
    return [job for job, _ in todo]


if __name__ == "__main__":
    main()
