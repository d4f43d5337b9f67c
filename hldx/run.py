"""Train (and evaluate) one run or a sweep: config -> validate -> plan -> train -> evaluate -> log.

    python -m hldx.run                                   # one tiny KD student on the embedded corpus
    python -m hldx.run -m method=nll,kd lr=1e-4,4e-4     # a sweep (Hydra multirun), validated up front
    python -m hldx.run --help                            # every config group and key

A run that already FINISHED (same hldx.run_key in the MLflow experiment) is skipped; an interrupted one
resumes from its last checkpoint under paths.runs/<run_key>/ and continues its MLflow run.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import transformers
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hldx import config as C
from hldx import data, tracking
from hldx.plan import plan_run, plan_sweep
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


def execute(cfg: DictConfig, role: str = "student", run_dir: Path | None = None) -> dict[str, float]:
    """Train and evaluate one run; returns its evaluation metrics ({} if it had already finished)."""
    plan = plan_run(cfg)
    run_dir = Path(run_dir or Path(cfg.paths.runs) / plan.run_key)
    final = run_dir / "final"
    finished = tracking.finished_run(cfg, plan.run_key)
    if finished and final.exists():
        log.info("%s already finished (run_key %s, MLflow run %s): skipped", C.run_name(cfg), plan.run_key, finished)
        return {}
    tokenizer = data.tokenizer_for(cfg)
    stream = data.prepare(cfg, "train", tokenizer)
    teacher = None
    if cfg.method.name in C.DISTILLED:
        ensure_teacher(cfg)
        teacher = teacher_source(cfg, tokenizer, stream, device_of(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    rank, size = world()
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
        from hldx.evaluate import evaluate_model

        metrics = evaluate_model(model.eval(), tokenizer, cfg)
        tracker.log(metrics, sum(p.steps for p in plan.phases))
        tracker.tag(**{"hldx.ckpt": str(final.resolve())})
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
    C.validate(cfg)
    C.warn_unused(cfg, list(HydraConfig.get().overrides.task))
    _join_ranks(cfg)
    metrics = execute(cfg)
    return metrics.get("eval/val_logppl")


def _check_sweep(argv: list[str]) -> None:
    """Every job of a sweep is composed, validated and planned before the first one starts."""
    overrides = [a for a in argv if not a.startswith("-") and "=" in a and not a.startswith("hydra")]
    _, errors = plan_sweep(overrides)
    if errors:
        sys.exit(f"{len(errors)} invalid job(s) in the sweep; nothing was launched:\n" + "\n".join(errors))


if __name__ == "__main__":
    if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        _check_sweep(sys.argv[1:])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()
    main()
