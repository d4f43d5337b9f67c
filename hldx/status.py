"""`python -m hldx.status -m <a study's overrides>`: what of a study has finished, runs, waits, failed or was never
launched, stage by stage, read from what the study leaves behind: SLURM's queue and accounting (every job hldx
submits is named hldx-<stage>-<key>), MLflow and the run directories. It keeps no state of its own.

    python -m hldx.status -m +sweep=demo                                        # a study run here
    python -m hldx.status -m +sweep=paper-123m teacher.ckpt=DIR hydra/launcher=slurm ...   # the overrides of
                                                                                # its python -m hldx.run -m

Per stage (tokenize, teacher, cache, the students by method, their evaluations, the report): the jobs finished,
running, pending, failed and not launched; a line per failed job (its overrides, its cause in one line, its
log); GPU-hours spent against the plan's, and the time left at the pace of the runs that finished. Exit status
0 when every job of the study has finished, 1 when one has failed, 3 while some are still to run.

Here (no SLURM launcher) nothing is pending: a job not run yet is not launched; a teacher cache counts as built
once a student of it has started; a tokenize, teacher or cache stage that failed says why in its log in the
sweep's stages/ folder, where the sweep itself named it.
"""
from __future__ import annotations

import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hldx import cli, data, stages, study, submit, teacher, tracking
from hldx.errors import ConfigError
from hldx.job import FAILED as FAILED_TXT

FINISHED, RUNNING, PENDING, FAILED, NOT_LAUNCHED = "finished", "running", "pending", "failed", "not launched"
STATES = (FINISHED, RUNNING, PENDING, FAILED, NOT_LAUNCHED)
WHY = {"TIMEOUT": "TIMEOUT: it reached its time limit (hydra.launcher.timeout_min) and was not requeued",
       "OUT_OF_MEMORY": "OUT_OF_MEMORY: it needed more memory than it had (hydra.launcher.mem_gb)",
       "NODE_FAIL": "NODE_FAIL: its node failed", "BOOT_FAIL": "BOOT_FAIL: its node did not boot",
       "DEADLINE": "DEADLINE: it missed its deadline", "PREEMPTED": "PREEMPTED and not requeued"}
QUEUED = {"PENDING": PENDING, "REQUEUED": PENDING, "CONFIGURING": PENDING, "RUNNING": RUNNING, "COMPLETING": RUNNING}


@dataclass
class Job:
    """One job of the study (a task of a stage) and what became of it."""
    stage: stages.Stage
    task: int
    row: str                  # its row of the table: the stage's name, the students by method
    shown: str                # how a failure line names it: a run's overrides, else the stage's job name
    state: str = NOT_LAUNCHED
    cause: str = ""
    log: str = ""
    hours: float = 0.0        # elapsed, every run of it
    gpus: int = 0

    @property
    def planned_hours(self) -> float:
        return self.stage.gpu_hours / len(self.stage.tasks)

    def line(self) -> str:
        return f"  {self.shown}: {self.cause}" + (f" (log: {self.log})" if self.log else "")


class Study:
    """A study as it was launched (its whole stage graph) and what it left behind: its runs in MLflow (the latest
    per run_key), its run directories and, on SLURM, the queue and the accounting of its jobs."""

    def __init__(self, planned: list[study.Planned], graph: list[stages.Stage], slurm: bool):
        self.graph, self.slurm = graph, slurm
        self.by_job = {tuple(j): (c, r) for j, c, r in planned}
        self.shared = set.intersection(*(set(j) for j, _, _ in planned)) if len(planned) > 1 else set()
        self.first = planned[0][1]
        self.runs, self.reports = {}, []
        for _, cfg, _ in {(c.tracking.uri, c.tracking.experiment): (j, c, r) for j, c, r in planned}.values():
            if why := tracking.unreachable(cfg.tracking.uri):
                raise ConfigError(why)
            mlflow = tracking.client(cfg)
            found = mlflow.get_experiment_by_name(cfg.tracking.experiment)
            for run in sorted(tracking.all_runs(mlflow, found.experiment_id) if found else [],
                              key=lambda r: r.info.start_time or 0):
                if run.data.tags.get("hldx.role") == "report":
                    self.reports.append(run)
                elif key := run.data.tags.get("hldx.run_key"):
                    self.runs[key] = run
        names = [s.job_name for s in graph]
        self.queue = submit.queue() if slurm else {}
        self.accounting = submit.accounting(names) if slurm and names else {}

    def jobs(self) -> list[Job]:
        """Every job of the graph with its state: what is durably done first (the training stream, the teacher, a
        run's final weights, a FINISHED run), then the queue, then what failed (a diverged run's failed.txt, a
        FAILED run, a SLURM job that ended otherwise than COMPLETED), else not launched."""
        jobs = []
        for stage in self.graph:
            for task in range(len(stage.tasks)):
                if stage.name in ("student", "eval"):
                    cfg, _ = self.by_job[tuple(stage.tasks[0])]
                    row = f"student {cfg.method.name}" if stage.name == "student" else "eval"
                    shown = " ".join(o for o in stage.tasks[0] if o not in self.shared) or "(defaults)"
                else:
                    row = "tokenize" if stage.name == "order" else stage.name
                    shown = stage.job_name + (f" task {task}" if len(stage.tasks) > 1 else "")
                jobs.append(self._assess(Job(stage, task, row, shown)))
        failed = {j.stage.job_name for j in jobs if j.state == FAILED}
        for job in jobs:  # cancelled before it started: by SLURM, what it waited for failed; else by scancel
            if job.cause == "CANCELLED":
                upstream = [name for name in job.stage.after if name in failed]
                job.cause = (f"CANCELLED before it started: {upstream[0]} did not complete" if upstream else
                             "CANCELLED before it started (scancel)")
        return jobs

    def _assess(self, job: Job) -> Job:
        stage = job.stage
        record, slurm = self._record(stage, job.task)
        if record is not None:
            job.hours, job.gpus, job.log = record.hours, record.gpus, record.log()
        cfg, run, where = self.first, None, None  # where: its run directory
        if stage.name in ("student", "eval", "teacher"):
            cfg, plan = self.by_job[tuple(stage.tasks[0])]
            key = stage.key if stage.name == "teacher" else plan.run_key
            run = self.runs.get(key)
            where = teacher.teacher_path(cfg).parent if stage.name == "teacher" else Path(cfg.paths.runs) / key
        status = run.info.status if run is not None else None
        if run is not None:
            job.log = run.data.tags.get("hldx.log") or job.log
            if not self.slurm and run.info.start_time and stage.name != "eval":  # here: its run's time, once
                job.hours = ((run.info.end_time or time.time() * 1000) - run.info.start_time) / 3.6e6
        failed_txt = where / FAILED_TXT if where is not None and stage.name != "eval" else None
        if self._done(stage, cfg, run, where, slurm):
            job.state = FINISHED
        elif slurm in QUEUED:
            job.state = QUEUED[slurm]
        elif not self.slurm and status == "RUNNING":
            job.state = RUNNING
        elif failed_txt is not None and failed_txt.exists():
            job.state, job.cause = FAILED, " ".join(failed_txt.read_text().split())
        elif status in ("FAILED", "KILLED") and (stage.name != "eval" or (where / "final").exists()):
            job.state = FAILED
            job.cause = run.data.tags.get("hldx.failure") or _slurm_cause(record, slurm) or \
                f"its MLflow run is {status} (interrupted, or a bug: its log says)"
        elif slurm and slurm != "COMPLETED":
            job.state, job.cause = FAILED, _slurm_cause(record, slurm)
        return job

    def _record(self, stage: stages.Stage, task: int) -> tuple[submit.Record | None, str]:
        """The job's SLURM record and state: the queue's, else its latest submission's in the accounting; an array
        task with no record where the rest of its array has one: CANCELLED (SLURM keeps none of a task cancelled
        while pending)."""
        for source in (self.queue, self.accounting):
            for record in source.get(stage.job_name, []):
                if record.task == task:
                    return record, record.state
        return None, "CANCELLED" if self.accounting.get(stage.job_name) or self.queue.get(stage.job_name) else ""

    def _done(self, stage: stages.Stage, cfg, run, where: Path | None, slurm: str) -> bool:
        """Whether the job's work is durably there: the training stream; the teacher's or a student's final
        weights; an evaluation's FINISHED run; a cache a student of which has started (or that SLURM says
        COMPLETED); a report run after every student's end."""
        if stage.name in ("tokenize", "order"):
            return data.train_tokens(cfg)[1] or slurm == "COMPLETED"
        if stage.name in ("teacher", "student"):
            return (where / "final").exists()
        if stage.name == "eval":
            return run is not None and run.info.status == "FINISHED" and (where / "final").exists()
        if stage.name == "cache":
            readers = [s for s in self.graph if s.name == "student" and stage.job_name in s.after]
            return slurm == "COMPLETED" or any(
                (Path(self.by_job[tuple(s.tasks[0])][0].paths.runs) / s.key).exists() for s in readers)
        ends = [r.info.end_time or 0 for r in self.runs.values() if r.data.tags.get("hldx.role") == "student"]
        return slurm == "COMPLETED" or any((r.info.start_time or 0) >= max(ends, default=0) for r in self.reports)


def _slurm_cause(record: submit.Record | None, state: str) -> str:
    """Why a SLURM job ended otherwise than COMPLETED, in one line; a FAILED one's: the exception submitit kept."""
    if not state or state == "COMPLETED":
        return ""
    if state == "CANCELLED":
        return "CANCELLED while it ran (scancel)" if record is not None and record.started else "CANCELLED"
    if state == "FAILED" and record is not None:
        try:  # submitit's result: ("error", the traceback)
            outcome, trace = pickle.loads(Path(record.log()).with_name(f"{record.job_id}_0_result.pkl").read_bytes())
        except (OSError, ValueError, EOFError, pickle.UnpicklingError):
            outcome, trace = "", ""
        lines = [line for line in str(trace).splitlines() if line.strip()]
        if outcome == "error" and lines:
            kind, _, message = lines[-1].partition(": ")
            return f"FAILED: {kind.rsplit('.', 1)[-1]}: {message}" if message else f"FAILED: {kind}"
        return "FAILED (its log says why)"
    return WHY.get(state, state)


def summary(jobs: list[Job], slurm: bool, gpus: bool) -> list[str]:
    """The table (a row per stage and per method of the students), the failed jobs, the hours and the time left."""
    rows: dict[str, dict[str, int]] = {}
    for job in jobs:
        rows.setdefault(job.row, dict.fromkeys(STATES, 0))[job.state] += 1
    lines = [f"{'stage':12}" + "".join(f"{s:>14}" for s in STATES)]
    lines += [f"{row:12}" + "".join(f"{n:14d}" for n in counts.values()) for row, counts in rows.items()]
    failed = [job for job in jobs if job.state == FAILED]
    if failed:
        lines += [f"failed ({len(failed)}):"] + [job.line() for job in failed]
    planned = sum(job.planned_hours for job in jobs)
    if slurm:
        spent = f"GPU-hours: {sum(j.hours * j.gpus for j in jobs):.4g} spent (SLURM: elapsed x GPUs, every run)"
    else:
        spent = f"hours: {sum(j.hours for j in jobs):.4g} spent (MLflow: the runs' time, here)"
    lines.append(f"{spent} against {planned:.4g} GPU-hours planned (python -m hldx.plan)")
    lines.append(time_left(jobs, slurm and gpus))
    return lines


def time_left(jobs: list[Job], plan_pace: bool) -> str:
    """The time left: the planned GPU-hours of what is still to run, at the pace the finished students kept
    (elapsed over planned; before one has finished, the plan's if `plan_pace`: on GPUs), shared by the jobs
    running now."""
    left = [j for j in jobs if j.state in (RUNNING, PENDING, NOT_LAUNCHED)]
    if not left:
        return "time left: none" if not any(j.state == FAILED for j in jobs) else \
            "time left: none but for the failed jobs (python -m hldx.run -m with the same overrides reruns them)"
    done = [j for j in jobs if j.stage.name == "student" and j.state == FINISHED and j.hours > 0]
    planned = sum(j.planned_hours for j in done)
    pace = sum(j.hours for j in done) / planned if done and planned > 0 else (1.0 if plan_pace else None)
    if pace is None:
        return "time left: not known until a student has finished (the plan's GPU-hours are for GPUs)"
    running = max(1, sum(j.state == RUNNING for j in jobs))
    hours = sum(j.planned_hours for j in left) * pace / running
    how = f"at the pace of {len(done)} finished student(s)" if done else "at the plan's GPU-hours"
    return f"time left: about {_duration(hours * 3600)} ({how}, {running} job(s) at a time)"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} days"


@cli.command
def main(argv: list[str] | None = None) -> int:
    if (args := cli.sweep_args(argv, __doc__)) is None:
        return 0
    settings = study.sweep_settings(args)
    jobs = study.expand_sweep(args, settings)
    planned, bad = study.plan_jobs(jobs)
    if bad:
        raise study.refusal(bad, len(jobs), " in the sweep")
    slurm = settings.launcher._target_.endswith("SlurmLauncher")
    if slurm and not all(shutil.which(command) for command in ("squeue", "sacct")):
        raise ConfigError("hydra/launcher submits to SLURM, but squeue or sacct is not on PATH: ask where the study "
                          "was launched (a SLURM login node)")
    graph = [s for s in stages.stages(planned, whole=True) if settings.sweeper.report or s.name != "report"]
    cfg = planned[0][1]
    assessed = Study(planned, graph, slurm).jobs()
    where = "on SLURM" if slurm else "here"
    print(f"study {cfg.tracking.experiment!r} ({cfg.tracking.uri}), {where}: {len(jobs)} jobs in the grid, "
          f"{len(planned)} distinct runs")
    print("\n".join(summary(assessed, slurm, bool(settings.launcher.get("gpus_per_node")))))
    if any(j.state == FAILED for j in assessed):
        return 1
    return 0 if all(j.state == FINISHED for j in assessed) else 3


if __name__ == "__main__":
    sys.exit(main())
