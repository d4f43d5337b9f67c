"""A study's stage graph (hldx.stages) run: submitted to SLURM as dependent jobs through submitit, or here in
order. hldx's sweeper (`python -m hldx.run -m ...`) hands it the checked, deduplicated jobs of a sweep.

On SLURM each stage is a job or job array named `hldx-<stage>-<key>`, with `--dependency=afterok:` on what it
needs (the report: afterany, it runs whatever happened) and `--kill-on-invalid-dep=yes`, so that a stage
that failed or was cancelled cancels what waits for it instead of leaving it pending forever. A job that is
requeued (preempted, timed out: submitit requeues it under the same id) keeps its dependents waiting. The
same command again submits only what is missing: a stage queued or running (squeue, by name) is waited on,
a tokenize, order or cache stage that COMPLETED (sacct) is not submitted again, a finished run is skipped (MLflow)
and a trained one is only evaluated.
"""
from __future__ import annotations

import logging
import re
import subprocess
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hldx.cli import failure_line
from hldx.errors import RunFailed, UserError
from hldx.progress import SweepLine, into_log
from hldx.stages import CPU_STAGES, ONE_PROCESS, Stage

log = logging.getLogger("hldx")


# ---- SLURM ------------------------------------------------------------------------------------------------

def executor(launcher: DictConfig, folder: Path, stage: Stage, dependency: str | None):
    """A submitit executor from the Hydra launcher preset (hydra/launcher=slurm...), as hydra-submitit-launcher
    builds one, for this stage: its job name, one process for tokenize, eval and report (no GPU for the CPU
    stages, at most one for eval), its dependency."""
    import submitit

    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_", None)
    params.pop("submitit_folder", None)
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm",
                               slurm_max_num_timeout=params.pop("max_num_timeout", 0))
    generic = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
               "stderr_to_stdout"}
    params["name"] = stage.job_name
    if stage.name in ONE_PROCESS:
        gpus = None if stage.name in CPU_STAGES or not params.get("gpus_per_node") else 1
        params |= {"gpus_per_node": gpus, "nodes": 1, "tasks_per_node": 1}
    extra = dict(params.pop("additional_parameters", None) or {})
    if dependency:
        extra |= {"dependency": dependency, "kill_on_invalid_dep": "yes"}
    ex.update_parameters(**{k if k in generic or k == "name" else f"slurm_{k}": v for k, v in params.items()},
                         slurm_additional_parameters=extra)
    return ex


@dataclass(frozen=True)
class Record:
    """One of hldx's SLURM jobs (an array task: one of its own), as SLURM's queue or accounting knows it."""
    job_id: str               # 123, or 123_4: task 4 of array 123
    name: str                 # hldx-<stage>-<key>
    state: str                # PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED, OUT_OF_MEMORY, ...
    started: bool = True
    hours: float = 0.0        # elapsed, every run of it (a requeued job runs again under the same id)
    gpus: int = 0
    submit_line: str = ""     # sbatch <submitit folder>/.submission_file_<uuid>.sh

    @property
    def task(self) -> int:
        return int(self.job_id.partition("_")[2] or 0)

    def log(self) -> str:
        """Its log (submitit's: the job's stderr, where a traceback goes), where SLURM's record says it is."""
        script = self.submit_line.split()[-1] if self.submit_line else ""
        if not script.endswith(".sh"):  # not submitit's submission
            return f"the --output of SLURM job {self.job_id}"
        return str(Path(script).parent / self.job_id / f"{self.job_id}_0_log.err")


def queue() -> dict[str, list[Record]]:
    """{job name: its tasks} of this user's hldx jobs pending or running."""
    out = subprocess.run(["squeue", "--me", "--array", "--noheader", "--format=%i|%j|%T"], capture_output=True,
                         text=True, check=True).stdout
    jobs: dict[str, list[Record]] = {}
    for line in out.split():
        job_id, name, state = line.split("|")
        if name.startswith("hldx-"):
            jobs.setdefault(name, []).append(Record(job_id, name, state, started=state != "PENDING"))
    return jobs


def queued() -> dict[str, str]:
    """{job name: SLURM job id} of this user's hldx jobs pending or running (an array: its job id)."""
    return {name: tasks[0].job_id.split("_")[0] for name, tasks in queue().items()}


STATES = "BF,CA,CD,DL,F,NF,OOM,PD,PR,R,RQ,S,TO"  # every state: a job SLURM cancelled before it started is only
# found by its state (its window then is that of its end): a time window alone misses it


def accounting(names: list[str]) -> dict[str, list[Record]]:
    """{job name: the tasks of its latest submission} from SLURM's accounting of the last 60 days, each task as its
    latest run left it, its hours those of all its runs (an array task cancelled while pending leaves no record;
    one not started yet is the queue's)."""
    fields = "JobID,JobName%200,State,Start,ElapsedRaw,AllocTRES,SubmitLine"
    out = subprocess.run(["sacct", "--noheader", "--allocations", "--duplicates", "--parsable2", f"--format={fields}",
                          f"--state={STATES}", "--starttime=now-60days", "--endtime=now", f"--name={','.join(names)}"],
                         capture_output=True, text=True, check=True).stdout
    runs: dict[str, list[list[str]]] = {}
    for line in out.splitlines():
        row = line.split("|", 6)
        if len(row) == 7 and "[" not in row[0]:  # 123_[4-7]: array tasks not started, known to the queue
            runs.setdefault(row[0], []).append(row)
    latest: dict[str, tuple[int, list[Record]]] = {}
    for job_id, rows in runs.items():
        _, name, state, start, _, tres, line = rows[-1]  # its latest run
        gpus = int(re.search(r"gres/gpu=(\d+)", tres).group(1)) if "gres/gpu=" in tres else 0
        record = Record(job_id, name, state.split()[0], start not in ("None", "Unknown", ""),
                        sum(int(r[4] or 0) for r in rows) / 3600, gpus, line)
        array = int(job_id.split("_")[0])
        if array > latest.get(name, (-1, []))[0]:  # job ids grow: the highest is the latest submission
            latest[name] = (array, [])
        if array == latest[name][0]:
            latest[name][1].append(record)
    return {name: sorted(tasks, key=lambda r: r.task) for name, (_, tasks) in latest.items()}


def completed(tasks: dict[str, int]) -> set[str]:
    """Of these job names ({name: its number of tasks}), those whose latest submission COMPLETED every task,
    from SLURM's accounting (an array task cancelled while pending leaves no record: it counts as not done)."""
    return {name for name, runs in accounting(list(tasks)).items()
            if [r.state for r in runs] == ["COMPLETED"] * tasks[name]}


def submit(graph: list[Stage], launcher: DictConfig, folder: Path, dry_run: bool) -> list[str]:
    """Submit the stages not already queued or completed (tokenize, order and cache: SLURM's accounting says; a
    student's completion is MLflow's, checked before), each with afterok on the SLURM ids of what it waits
    for; the lines saying what was (or, dry, would be) done."""
    ids = {} if dry_run else queued()
    once = {s.job_name: len(s.tasks) for s in graph if s.name in ("tokenize", "order", "cache")}
    done = set() if dry_run else completed(once)
    lines = []
    for stage in graph:
        if stage.job_name in ids:
            lines.append(f"{stage.job_name}: already queued or running as job {ids[stage.job_name]}")
            continue
        if stage.job_name in done:
            lines.append(f"{stage.job_name}: completed before")
            continue
        waits = [ids.get(name, f"<{name}>") for name in stage.after if name in ids or dry_run]
        dependency = f"{'afterok' if stage.ok else 'afterany'}:{':'.join(waits)}" if waits else None
        if dry_run:
            tasks = f" array of {len(stage.tasks)}" if len(stage.tasks) > 1 else ""
            lines.append(f"sbatch --job-name={stage.job_name}{tasks}"
                         f"{f' --dependency={dependency}' if dependency else ''}")
            ids[stage.job_name] = f"<{stage.job_name}>"
            continue
        ex = executor(launcher, folder, stage, dependency)
        many = len(stage.tasks) > 1
        jobs = ex.map_array(stage.fn, stage.tasks) if many else [ex.submit(stage.fn, stage.tasks[0])]
        ids[stage.job_name] = jobs[0].job_id.split("_")[0]
        lines.append(f"{stage.job_name}: submitted as job {ids[stage.job_name]}"
                     f"{f' ({len(jobs)} tasks)' if len(jobs) > 1 else ''}"
                     f"{f', {dependency}' if dependency else ''}")
    return lines


# ---- here -------------------------------------------------------------------------------------------------

def run_here(graph: list[Stage], logs: Path, line: SweepLine | None = None) -> dict[str, str]:
    """The stages in order in this process, each logging also to logs/<its job name>.log; a stage that fails
    does not stop the others, but what waits for it (afterok) does not run. {job name: why} of the stages that
    failed or did not run; a bug's traceback goes to the stage's log only. `line`: a quiet sweep's terminal,
    told of each stage's end; all the stage writes goes to its log alone."""
    failed: dict[str, str] = {}
    for stage in graph:
        if stage.ok and (blocked := [name for name in stage.after if name in failed]):
            failed[stage.job_name] = f"not run: {blocked[0]} did not complete"
            if line:
                line.ended_job(f"stage {stage.name}", failed[stage.job_name], ok=False, run=False)
            continue
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{stage.job_name}.log"
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        if line:
            line.started(f"stage {stage.name}")
        try:
            with into_log(path) if line else nullcontext():
                for i, task in enumerate(stage.tasks):
                    of = f" task {i} of {len(stage.tasks)}" if len(stage.tasks) > 1 else ""
                    log.info("stage %s%s", stage.job_name, of)
                    stage.fn(task)
        except Exception as err:  # noqa: BLE001 - reported in one line; a bug's traceback in the stage's log
            if not isinstance(err, (UserError, RunFailed)):
                handler.handle(logging.LogRecord("hldx", logging.ERROR, __file__, 0, "%s",
                                                 (traceback.format_exc(),), None))
            failed[stage.job_name] = f"{failure_line(err)} (log: {path})"
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if line:
            line.ended_job(f"stage {stage.name}", failed.get(stage.job_name, ""), stage.job_name not in failed, run=False)
    return failed
