"""The stage graph of a study: tokenize (with data.tasks > 1: an array over blocks of files, then their join and
the training order) -> teacher -> cache -> students -> evaluations -> report, each stage what it runs, what it
waits for, its GPU-hours and its bytes on disk (hldx.submit runs it here or submits it to SLURM; hldx.plan
prints it)."""
from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from hldx import data, job, order, study, teacher
from hldx import config as C
from hldx.budget import cache_parts, cache_storage, flops_per_token, gpu_hours, plan_run, throughput
from hldx.models import count_parameters

CPU_STAGES = ("tokenize", "order", "report")  # no accelerator needed
ONE_PROCESS = ("tokenize", "order", "eval", "report")  # one task on one node (eval: on the students' device)


def _compose(job_overrides: list[str]):
    """A stage's config; in a SLURM job (no logging set up yet) hldx's INFO lines go to the job's log, as under
    Hydra."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    return C.compose(job_overrides)


def tokenize(job_overrides: list[str]) -> str:
    """The tokenize stage: the train stream tokenized and its training order laid down (both cached)."""
    cfg = _compose(job_overrides)
    rows = order.training_rows(cfg, data.prepare(cfg, "train", data.tokenizer_for(cfg)))
    return f"training order {rows.digest}: {rows.count} rows of {cfg.train.seq_len} tokens"


def tokenize_part(task: tuple[list[str], int]) -> str:
    """A task of the tokenize array (data.tasks > 1): the train split's i-th block of files tokenized."""
    job_overrides, i = task
    cfg = _compose(job_overrides)
    return str(data.prepare_part(cfg, data.tokenizer_for(cfg), i))


def pretrain_teacher(job_overrides: list[str]) -> str:
    cfg = _compose(job_overrides)
    job.ensure_teacher(cfg)
    return str(teacher.teacher_path(cfg))


def build_cache(task: tuple[list[str], dict[str, int]]) -> str:
    """A task of the cache stage: its share of every part the study's jobs read, each to its longest job's rows."""
    job_overrides, extents = task
    return job.build_cache_share(_compose(job_overrides), extents)


class Train:
    """The student stage: `python -m hldx.run`'s job, up to trained (its evaluation is the next stage).
    Preempted or timed out on SLURM (SIGUSR2) it checkpoints and submitit requeues it (submitit calls
    `checkpoint`); it resumes from its checkpoint."""

    def __call__(self, job_overrides: list[str]) -> dict[str, float]:
        return job.run(_compose(job_overrides), evaluate=False)

    def checkpoint(self, job_overrides: list[str]):
        import submitit

        return submitit.helpers.DelayedSubmission(self, job_overrides)


train = Train()


def evaluate(job_overrides: list[str]) -> dict[str, float]:
    """The eval stage: a trained student's evaluation, logged into its MLflow run, which it finishes."""
    return job.evaluate_trained(_compose(job_overrides))


def report(command: list[str]) -> int:
    return subprocess.run(command, check=True).returncode


@dataclass
class Stage:
    """One job (or job array: several `tasks`) of the study: what it runs and what it waits for."""
    name: str                                   # tokenize, order, teacher, cache, student, eval, report
    key: str                                    # with the name, the SLURM job name: hldx-<name>-<key>
    fn: object
    tasks: list = field(default_factory=list)   # one argument of fn per task
    after: list[str] = field(default_factory=list)  # job names this one waits for
    ok: bool = True                             # afterok (else afterany: the report runs whatever happened)
    gpu_hours: float = 0.0                      # at plan.mfu of plan.peak_flops (or plan.bench's rates)
    disk_bytes: float = 0.0                     # what it writes that stays

    @property
    def job_name(self) -> str:
        return f"hldx-{self.name}-{self.key}"


def stages(planned: list[study.Planned], whole: bool = False) -> list[Stage]:
    """The stage graph of the study's jobs left to run (planned: distinct, not finished), in submission order;
    `whole`: of every job given, whatever is done already (hldx.status: the study as it was launched)."""
    if not planned:
        return []
    first = planned[0][1]
    overrides = planned[0][0]
    data_key = C.digest([OmegaConf.to_container(first.data, resolve=True), first.train.seq_len, first.paths.cache])
    tokens, _ = data.train_tokens(first)
    ids_bytes = 2 * (tokens or 0)  # uint16 ids
    graph = [Stage("tokenize", data_key, tokenize, [overrides], disk_bytes=ids_bytes)]
    if first.data.tasks > 1:  # an array over blocks of files, then their join and the training order
        parts = Stage("tokenize", data_key, tokenize_part, [(overrides, i) for i in range(first.data.tasks)],
                      disk_bytes=ids_bytes)
        graph = [parts, Stage("order", data_key, tokenize, [overrides], [parts.job_name], disk_bytes=ids_bytes)]
    data_ready = graph[-1].job_name  # what every job waits for first: the training order
    training = [(j, c, r) for j, c, r in planned  # a run trained before: its evaluation left only
                if whole or not (Path(c.paths.runs) / r.run_key / "final").exists()]
    waits = {r.run_key: [data_ready] for _, _, r in training}  # NLL students wait for the data only
    by_teacher: dict[str, list[study.Planned]] = {}
    for j, c, r in training:  # the teacher's identity is its own: every seed and method of a study shares it
        if c.method.name in C.DISTILLED:
            by_teacher.setdefault(_teacher_id(c), []).append((j, c, r))
    for group in by_teacher.values():
        graph += _teacher_stages(group, data_ready, data_key, tokens, waits, whole)
    students = {r.run_key: Stage("student", r.run_key, train, [j], waits[r.run_key],
                                 gpu_hours=gpu_hours(r, throughput(c)[0]),
                                 disk_bytes=4 * count_parameters(c.student)["total"]) for j, c, r in training}
    graph += students.values()
    graph += [Stage("eval", r.run_key, evaluate, [j], [students[r.run_key].job_name] if r.run_key in students else [])
              for j, _, r in planned]  # a run trained before: its evaluation alone
    exp = first.tracking.experiment
    command = [sys.executable, "-m", "analysis.report", "--experiment", exp, "--tracking-uri", first.tracking.uri,
               "--out", str(Path("reports") / exp)]
    graph.append(Stage("report", C.digest(exp), report, [command],
                       [s.job_name for s in graph if s.name == "eval"], ok=False))
    return graph


def _teacher_id(cfg) -> str:
    """Which teacher a job reads: teacher.ckpt (also when it is still to be given), or the on-demand one's."""
    given = OmegaConf.is_missing(cfg.teacher, "ckpt") or cfg.teacher.ckpt
    return f"ckpt:{OmegaConf.select(cfg, 'teacher.ckpt')}" if given else str(teacher.teacher_path(cfg))


def _teacher_stages(group: list[study.Planned], tokenized: str, data_key: str, tokens: int | None,
                    waits: dict[str, list[str]], whole: bool) -> list[Stage]:
    """The stages of one teacher's students: its pre-training (an on-demand teacher not built yet, or `whole`) and
    one cache per distinct cache identity, built with every part its students read (top-k, each teacher layer),
    each to the longest extent a student reads it; `waits` gets what each of the group's students waits for."""
    j, c, _ = group[0]
    out, after = [], [tokenized]
    given = OmegaConf.is_missing(c.teacher, "ckpt") or c.teacher.ckpt  # the user's teacher (to be) given
    if not given and (whole or not teacher.teacher_path(c).exists()):
        tcfg = teacher.teacher_config(c)
        out.append(Stage("teacher", C.run_key(tcfg), pretrain_teacher, [j], [tokenized],
                         gpu_hours=gpu_hours(plan_run(tcfg), throughput(tcfg)[0]),
                         disk_bytes=4 * count_parameters(tcfg.student)["total"]))
        after = [out[-1].job_name]
    by_cache: dict[str, list[study.Planned]] = {}
    for j, c, r in group:
        if c.teacher.source != "cache":
            waits[r.run_key] = after
            continue
        by_cache.setdefault(C.digest(_cache_identity(c)), []).append((j, c, r))
    for cached in by_cache.values():
        extents: dict[str, int] = {}
        for _, c, r in cached:
            for part, n in cache_parts(c, r).items():
                extents[part] = max(extents.get(part, 0), n)
        j, c, _ = cached[0]
        tasks = int(c.cache.tasks)
        share = [o for o in j if not o.startswith(("cache.task=", "cache.tasks=", "cache.rows=", "cache.hidden_rows="))]
        share += [f"cache.tasks={tasks}"]
        # A stage reading the middle layer alone (every study before layer pairs) keeps its job name.
        others = {p: n for p, n in extents.items() if p not in ("topk", "hidden")} or None
        key = C.digest([_teacher_id(c), data_key, extents.get("topk", 0), extents.get("hidden", 0),
                        c.cache.values_dtype, c.cache.hidden_dtype, c.method.get("top_k", 128), others]
                       + list(C.logits_variant(c).values()))
        as_student = c.copy()
        as_student.student = c.teacher.model
        forward = flops_per_token(as_student)["data"] / 3  # the teacher's forward alone: a third of training
        storage = cache_storage([c for _, c, _ in cached], [r for _, _, r in cached],
                                tokens // c.train.seq_len if tokens else None)  # at most the order's rows
        out.append(Stage("cache", key, build_cache, [(share + [f"cache.task={t}"], extents) for t in range(tasks)],
                         after,
                         gpu_hours=storage["tokens"] * forward / (c.plan.mfu * c.plan.peak_flops) / 3600,
                         disk_bytes=storage["bytes"]))
        for _, _, r in cached:
            waits[r.run_key] = [out[-1].job_name]
    return out


def _cache_identity(cfg) -> list:
    """What tells a job's cache from another's of the same teacher and rows: its dtypes, k and shards, and where it
    holds sampled logits, their draws and taus (config.logits_variant; a top-k cache's as before sampled caches
    existed)."""
    c = cfg.cache
    return [c.values_dtype, c.hidden_dtype, cfg.method.get("top_k", 128), c.rows_per_shard,
            *C.logits_variant(cfg).values()]


def table(graph: list[Stage]) -> str:
    """The stage graph: one line per stage, its jobs, GPU-hours (CPU stages: none) and bytes on disk."""
    lines = [f"{'stage':9} {'jobs':>5} {'GPU-h':>9} {'disk GB':>9}  waits for"]
    for name in dict.fromkeys(s.name for s in graph):
        group = [s for s in graph if s.name == name]
        waits = sorted({w.split("-")[1] for s in group for w in s.after})
        lines.append(f"{name:9} {sum(len(s.tasks) for s in group):5d} {sum(s.gpu_hours for s in group):9.4g} "
                     f"{sum(s.disk_bytes for s in group) / 1e9:9.4g}  {', '.join(waits) or '-'}")
    return "\n".join(lines)
