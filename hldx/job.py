"""One job of a study: every check before any work, the on-demand teacher, then train -> evaluate -> log.

`check` is the one function the entry points call before they do anything: each subsystem checks its own
keys, and every stage of the job is planned (the on-demand teacher's pre-training included), so a bad value
or a budget too small for one step fails in seconds, before a teacher is trained or a cache is built.
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch.distributed as dist
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from hldx import budget, data, evaluation, models, order, teacher, tracking
from hldx import config as C
from hldx.budget import RunPlan, parallel_mode, plan_run
from hldx.device import device_of, join, ranks, world
from hldx.errors import ConfigError, RunFailed
from hldx.store import task_shards
from hldx.train import Checkpoint, Trainer

log = logging.getLogger("hldx")
TRAINED, EVALUATED = "trained", "evaluated"  # hldx.state: trained, not yet evaluated (MLflow: SCHEDULED); done
FAILED = "failed.txt"  # in a run's directory: why it cannot succeed as configured (it diverged)


def check(cfg: DictConfig, launch: bool = True, ranks: int | None = None) -> RunPlan:
    """Every check of a job, and its plan: the config's types and ranges and the keys that must agree, each
    subsystem's keys, the plan of each stage it runs (the on-demand teacher's pre-training included), its
    memory per rank on `ranks` GPUs (plan.ranks, else 1); with `launch`, also what must exist to run it (the
    teacher checkpoint, the tracking server)."""
    C.check(cfg)
    data.check(cfg)
    teacher.check(cfg, launch)
    evaluation.check(cfg)
    plan = plan_run(cfg)
    if cfg.method.name in C.DISTILLED and not OmegaConf.is_missing(cfg.teacher, "ckpt") and not cfg.teacher.ckpt:
        try:
            budget.plan_run(teacher.teacher_config(cfg))  # the on-demand teacher's own run
        except ConfigError as err:
            raise ConfigError(f"the on-demand teacher (teacher.build.tokens={cfg.teacher.build.tokens}, "
                              f"teacher.build.lr={cfg.teacher.build.lr}): {err}") from None
    if cfg.train.device != "cpu":  # a GPU job, or one that will be where there is a GPU
        budget.check_memory(cfg, ranks or cfg.plan.ranks or 1)
    if launch:
        check_inputs(cfg)
        check_epochs(cfg, plan)
        if cfg.eval.mode == "full" and (missing := evaluation.unreadable(cfg)):
            raise ConfigError("eval=full needs every task's data, and it cannot be read for " + "; ".join(
                f"{task} (fix: {fix})" for task, fix in missing.items()) + "; or pass eval=quick")
        tracking.check(cfg)
    return plan


def check_inputs(cfg: DictConfig) -> None:
    """Every path a job reads that must exist before it starts (data.path and teacher.ckpt have their own checks):
    eval.local_dir (where a task of eval.tasks reads it), plan.bench, the directory of a sqlite tracking store and
    of cache.dir (hldx creates the store and the cache, not where they live: a mistyped one would silently start
    a study afresh)."""
    reads = cfg.eval.local_dir is not None and any(task != "val" for task in cfg.eval.tasks)  # val: the corpus's
    if reads and not Path(cfg.eval.local_dir).expanduser().is_dir():
        raise ConfigError(f"eval.local_dir={cfg.eval.local_dir} is invalid: expected an existing directory of the "
                          f"tasks' JSONL files (python -m hldx.demotasks DIR writes the demo's), or eval.local_dir=null")
    if cfg.plan.bench:
        budget.throughput(cfg)  # reads it
    where = [("tracking.uri", cfg.tracking.uri, Path(cfg.tracking.uri.removeprefix("sqlite:///")).parent)
             ] if cfg.tracking.uri.startswith("sqlite:///") else []
    if cfg.cache.dir and cfg.method.name in C.DISTILLED and cfg.teacher.source == "cache":
        where.append(("cache.dir", cfg.cache.dir, Path(cfg.cache.dir).expanduser().parent))
    for key, value, parent in where:
        if not parent.expanduser().is_dir():
            raise ConfigError(f"{key}={value} is invalid: its directory {parent} does not exist (hldx creates "
                              f"what {key} names, not the directory it lies in): create it, or fix {key}")


def epochs(cfg: DictConfig, plan: RunPlan, rows: int | None = None) -> int | None:
    """How many passes over the training order the job makes (None: the order's size is not known yet);
    `rows`: the order's size, else what hldx.data knows or estimates of it."""
    if rows is None:
        tokens, _ = data.train_tokens(cfg)
        rows = None if tokens is None else tokens // cfg.train.seq_len
    return None if not rows else order.epochs(budget.rows_read(cfg, plan)["all"], rows)


def check_epochs(cfg: DictConfig, plan: RunPlan, rows: int | None = None) -> None:
    """Refuse a job that reads past the end of the training order more often than data.max_epochs allows."""
    passes = epochs(cfg, plan, rows)
    if passes is not None and passes > cfg.data.max_epochs:
        read = budget.rows_read(cfg, plan)["all"] * cfg.train.seq_len
        raise ConfigError(f"data.max_epochs={cfg.data.max_epochs} is invalid for this job: it reads {read:.4g} "
                          f"tokens, {passes} passes over the training data (data={cfg.data.name}): allow them "
                          f"with data.max_epochs={passes}, or give it more data or a smaller budget")


def ensure_teacher(cfg: DictConfig) -> None:
    """Pre-train the on-demand teacher once (file-locked: parallel jobs wait for the first one; the ranks of a
    job that has joined its process group train it together)."""
    path = teacher.teacher_path(cfg)
    if cfg.teacher.ckpt or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rank, size = world()
    # Inside a job's process group its ranks train the teacher together, rank 0 holding the lock.
    with FileLock(str(path.parent / "build.lock")) if rank == 0 else nullcontext():
        missing = [not path.exists()]
        if size > 1:
            dist.broadcast_object_list(missing)
        if missing[0]:
            log.info("pre-training the %s teacher once (shared by every run): %s", cfg.teacher.model.name, path)
            execute(teacher.teacher_config(cfg), role="teacher", run_dir=path.parent)


def finished(cfg: DictConfig, key: str, run_dir: Path | None = None) -> str | None:
    """The MLflow run id of this run if it finished: FINISHED in MLflow and its final checkpoint on disk."""
    run_id = tracking.finished_run(cfg, key)
    return run_id if run_id and (Path(run_dir or Path(cfg.paths.runs) / key) / "final").exists() else None


def execute(cfg: DictConfig, role: str = "student", run_dir: Path | None = None,
            evaluate: bool = True) -> dict[str, float]:
    """Train and evaluate one run; returns its evaluation metrics ({} if it had already finished). Without
    `evaluate` (the stage graph's student job) it stops trained: weights in final/, its MLflow run SCHEDULED
    and tagged hldx.state=trained, for `evaluate_trained` (the eval stage) to finish."""
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
    if (failed := run_dir / FAILED).exists():  # it would diverge again, step for step
        raise RunFailed(f"{C.run_name(cfg)} {failed.read_text().strip()} in an earlier attempt and is not run "
                        f"again: change its hyperparameters, or delete {failed} to retry it")
    tokenizer = data.tokenizer_for(cfg)
    rows = order.training_rows(cfg, data.prepare(cfg, "train", tokenizer))
    check_epochs(cfg, plan, rows.count)
    source = None
    if cfg.method.name in C.DISTILLED:
        ensure_teacher(cfg)
        source = teacher.teacher_source(cfg, tokenizer, rows, plan, device_of(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = Checkpoint.load(run_dir)
    if resume is not None:
        resume.check_ranks(run_dir, size)  # before its MLflow run is touched
    tracker = tracking.Tracker(cfg, plan.run_key, role, run_id=resume.tracking_run_id if resume else None) \
        if rank == 0 else None
    with _failing(tracker, run_dir if rank == 0 else None):
        batches = order.Batches(rows, cfg.train.batch_size, rank, size)
        trainer = Trainer(cfg, plan, batches, source, run_dir, tokenizer, tracker.log if tracker else None,
                          tracker.run_id if tracker else None)
        trainer.fit()  # the weights are in final/
        if tracker is None:
            return {}
        tokenizer.save_pretrained(final)
        if not evaluate:
            tracker.tag(**{"hldx.ckpt": str(final.resolve()), "hldx.state": TRAINED})
            tracker.finish("SCHEDULED")
            log.info("%s trained: %s | its evaluation is a stage of its own (MLflow run %s: SCHEDULED, "
                     "hldx.state=%s)", C.run_name(cfg), final, tracker.run_id, TRAINED)
            return {}
        return _evaluate(cfg, tokenizer, final, tracker, plan, role)


def evaluate_trained(cfg: DictConfig) -> dict[str, float]:
    """The eval stage: evaluate a trained run's final weights (one process) and finish its MLflow run; {} if
    it had finished already."""
    plan = plan_run(cfg)
    run_dir = Path(cfg.paths.runs) / plan.run_key
    final = run_dir / "final"
    if done := finished(cfg, plan.run_key):
        log.info("%s already finished (MLflow run %s): nothing to evaluate", C.run_name(cfg), done)
        return {}
    if not final.exists():
        raise ConfigError(f"{C.run_name(cfg)} has not been trained: {final} does not exist (its student job "
                          f"runs first)")
    tracker = tracking.Tracker(cfg, plan.run_key, "student")
    with _failing(tracker, None):
        return _evaluate(cfg, data.tokenizer_for(cfg), final, tracker, plan, "student")


def _evaluate(cfg: DictConfig, tokenizer, final: Path, tracker: tracking.Tracker, plan: RunPlan,
              role: str) -> dict[str, float]:
    """Evaluate the run's final weights, log it (with vs_kd/* for a student), finish its MLflow run."""
    model = models.load_model(str(final)).to(device_of(cfg))
    result = evaluation.evaluate(model.eval(), tokenizer, cfg)
    metrics = result.metrics
    tracker.log(metrics, sum(p.steps for p in plan.phases))
    tracker.tag(**{"hldx.ckpt": str(final.resolve()), "hldx.state": EVALUATED}, **result.tags())
    if role == "student":
        tracker.compare_with_kd(cfg, metrics)
    tracker.finish()
    shown = ", ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in metrics.items())
    log.info("%s finished: %s | checkpoint %s | MLflow run %s at %s", C.run_name(cfg), shown, final,
             tracker.run_id, cfg.tracking.uri)
    return metrics


@contextmanager
def _failing(tracker: tracking.Tracker | None, run_dir: Path | None):
    """On an error: a diverged run is recorded in run_dir/failed.txt and tagged hldx.failure; the MLflow run
    ends FAILED (KILLED when interrupted); the error goes on."""
    try:
        yield
    except BaseException as err:
        if isinstance(err, RunFailed) and run_dir is not None:
            (run_dir / FAILED).write_text(str(err) + "\n")
        if tracker is not None:
            if isinstance(err, RunFailed):
                tracker.tag(**{"hldx.failure": str(err)})
            tracker.finish("KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise


def run(cfg: DictConfig, evaluate: bool = True) -> dict[str, float]:
    """A job as `python -m hldx.run` runs it, on the ranks this process was started among: every check, the
    on-demand teacher (before the ranks join: one process pre-trains it, the others wait for its lock), the
    process group, then train -> evaluate -> log (without `evaluate`: train, for the eval stage)."""
    check(cfg, ranks=ranks())
    device_of(cfg)  # here, not in check (a CPU login node checks GPU jobs): train.device=cuda without a GPU
    if cfg.method.name in C.DISTILLED:
        ensure_teacher(cfg)
    join(cfg, alone=parallel_mode(cfg, 1) != "none")
    return execute(cfg, evaluate=evaluate)


def build_cache_share(cfg: DictConfig, extents: dict[str, int] | None = None) -> str:
    """Build this worker's share of the teacher cache of cfg's job, the shards of cache.task of cache.tasks
    (SLURM array tasks), split again over the job's ranks; what it did, in one line. `extents`: the parts and rows
    to build (a study's cache stage: every part its jobs read, each to its longest job's), else the job's own."""
    plan = check(cfg)
    device_of(cfg)
    ensure_teacher(cfg)
    join(cfg, alone=False)
    rank, size = world()
    tokenizer = data.tokenizer_for(cfg)
    rows = order.training_rows(cfg, data.prepare(cfg, "train", tokenizer))
    spec = teacher.cache_spec(cfg, tokenizer, rows, plan)
    if extents is not None:
        spec = dataclasses.replace(spec, extents=extents)
    shards = task_shards(spec, cfg.cache.task * size + rank, cfg.cache.tasks * size)
    complete = teacher.build_cache(cfg, spec, rows, device_of(cfg), shards)
    return (f"{'complete' if complete else 'partial'} (shards {shards.start}..{shards.stop - 1} of this worker "
            f"built): {teacher.cache_dir(cfg, spec)}, " + ", ".join(
                f"{part} for rows [0, {n})" for part, n in spec.extents.items()))
