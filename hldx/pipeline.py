"""`python -m hldx.pipeline`: a whole study as dependent stages, from one command.

    python -m hldx.pipeline +sweep=demo                                   # here, the stages in order
    python -m hldx.pipeline +sweep=paper-123m teacher.ckpt=DIR hydra/launcher=slurm ...   # on SLURM
    python -m hldx.pipeline --dry-run +sweep=demo hydra/launcher=slurm_cpu  # the sbatch plan, nothing submitted

Stages: tokenize (the training order laid down once) -> teacher (pre-training the on-demand teacher; none
with teacher.ckpt) -> cache (cache.tasks array tasks, each building its share of the teacher cache for the
longest job's extents) -> students (one job per distinct run left; NLL students wait for tokenize only) ->
report (analysis.report over the experiment, once every student has ended). On SLURM each stage is a job or
job array submitted through submitit with `--dependency=afterok:` on what it needs, named
`hldx-<stage>-<key>`; no student holds an accelerator while a teacher or a cache is built. The same command
again resumes: finished runs are skipped, a stage already queued or running (squeue, by name) is waited on,
never submitted twice, and failed ones are submitted again. Every job is checked before anything is
submitted, as `python -m hldx.run -m` checks a sweep.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hldx import cli, study
from hldx import config as C
from hldx.stages import CPU_STAGES, Stage, stages, table

log = logging.getLogger("hldx")


# ---- SLURM ------------------------------------------------------------------------------------------------

def executor(launcher: DictConfig, folder: Path, stage: Stage, dependency: str | None):
    """A submitit executor from the Hydra launcher preset (hydra/launcher=slurm...), as hydra-submitit-launcher
    builds one, for this stage: its job name, no GPU for the CPU stages, its dependency."""
    import submitit

    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_", None)
    params.pop("submitit_folder", None)
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm",
                               slurm_max_num_timeout=params.pop("max_num_timeout", 0))
    generic = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
               "stderr_to_stdout"}
    params["name"] = stage.job_name
    if stage.name in CPU_STAGES:
        params |= {"gpus_per_node": None, "nodes": 1, "tasks_per_node": 1}
    extra = dict(params.pop("additional_parameters", None) or {})
    if dependency:
        extra["dependency"] = dependency
    ex.update_parameters(**{k if k in generic or k == "name" else f"slurm_{k}": v for k, v in params.items()},
                         slurm_additional_parameters=extra)
    return ex


def queued() -> dict[str, str]:
    """{job name: SLURM job id} of this user's hldx jobs pending or running (an array: its job id)."""
    out = subprocess.run(["squeue", "--me", "--noheader", "--format=%F|%j"], capture_output=True, text=True,
                         check=True).stdout
    return {name: job_id for job_id, name in (line.split("|", 1) for line in out.split()) if name.startswith("hldx-")}


def completed(names: list[str]) -> set[str]:
    """Of these job names, those whose latest job (every task of an array) COMPLETED, from SLURM's accounting."""
    out = subprocess.run(["sacct", "--noheader", "--allocations", "--parsable2", "--format=JobName,State,Submit",
                          "--starttime=now-60days", f"--name={','.join(names)}"],
                         capture_output=True, text=True, check=True).stdout
    latest: dict[str, tuple[str, set]] = {}
    for line in out.splitlines():
        name, state, submitted = line.split("|")
        when, states = latest.get(name, ("", set()))
        if submitted > when:
            latest[name] = (submitted, {state})
        elif submitted == when:
            states.add(state)
    return {name for name, (_, states) in latest.items() if states == {"COMPLETED"}}


def submit(graph: list[Stage], launcher: DictConfig, folder: Path, dry_run: bool) -> list[str]:
    """Submit the stages not already queued or completed (tokenize and cache: SLURM's accounting says; a
    student's completion is MLflow's, checked before), each with afterok on the SLURM ids of what it waits
    for; the lines saying what was (or, dry, would be) done."""
    ids = {} if dry_run else queued()
    done = set() if dry_run else completed([s.job_name for s in graph if s.name in ("tokenize", "cache")])
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

def run_here(graph: list[Stage]) -> None:
    """The stages in order in this process (the report as its own command, as on SLURM)."""
    for stage in graph:
        for i, task in enumerate(stage.tasks):
            of = f" task {i} of {len(stage.tasks)}" if len(stage.tasks) > 1 else ""
            log.info("pipeline: %s%s", stage.job_name, of)
            stage.fn(task)


@cli.command
def main(argv: list[str] | None = None) -> int:
    if (args := cli.sweep_args(argv, __doc__)) is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    dry_run = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    hydra_args = [a for a in args if a.split("=")[0].lstrip("+") in ("hydra/launcher", "sweep") or
                  a.startswith("hydra.")]
    hydra = C.compose(hydra_args, with_hydra=True).hydra
    jobs = study.expand_sweep([a for a in args if not a.startswith("hydra")])  # the jobs, as Hydra's sweeper's
    slurm = hydra.launcher._target_.endswith("SlurmLauncher")
    ranks = int(hydra.launcher.get("nodes") or 1) * int(hydra.launcher.get("tasks_per_node") or 1) if slurm else None
    # Every job checked (and, to submit, sbatch on PATH); the distinct ones left to run.
    graph = stages(study.launch_plan(jobs, "" if dry_run else hydra.launcher._target_, ranks))
    if not graph:
        print("pipeline: every run of the study has finished: nothing to do")
        return 0
    print(table(graph))
    if slurm:
        folder = Path(hydra.sweep.dir) / ".submitit"
        for line in submit(graph, hydra.launcher, folder, dry_run):
            print(line)
    elif dry_run:
        print("dry run: here, the stages would run in this order, in this process")
    else:
        run_here(graph)
    return 0


if __name__ == "__main__":
    sys.exit(main())
