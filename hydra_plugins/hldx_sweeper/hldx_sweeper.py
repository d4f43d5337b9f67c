"""hldx's Hydra plugin: the study grids of sweeps/ as the config group `sweep` (`+sweep=NAME`), and the sweeper
that runs a sweep as its stage graph, the one way a study runs.

The sweeper is Hydra's basic sweeper (the same grid syntax, `hydra.sweeper.params` from a sweep config)
with the study's stages around the launch: `hldx.study.launch_plan` checks every job, drops duplicates
(same run identity) and skips finished runs; `hldx.stages` makes the stage graph of what is left (one
teacher and one cache per distinct teacher, whatever the seeds). With a SLURM launcher (hydra/launcher=
slurm...) the graph is submitted as dependent jobs (hldx.submit) and the command returns; here, tokenize,
teacher and cache run first in this process, then the students through Hydra's launcher (each trains and
evaluates), then the report. Hydra imports this module when it starts (plugin discovery).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from hldx.config import CONF_DIR

SWEEPS = CONF_DIR.parent / "sweeps"

for _path in sorted(SWEEPS.glob("*.yaml")):
    ConfigStore.instance().store(group="sweep", name=_path.stem, node=OmegaConf.load(_path), package="_global_",
                                 provider="hldx")


class HldxSweeper(BasicSweeper):
    """BasicSweeper that runs the study's stage graph (see above) and every job it can: a failed job does not
    stop the others; at the end each failure is one line (its overrides, its cause, its log) and the exit
    status is 1. `dry_run`: print the stages (on SLURM: the sbatch plan) and run nothing; `report`: end with
    the report stage (reports/<experiment>/); `verbose`: here, show on the terminal all that the stages and
    jobs write (else it goes to their logs, and the terminal shows a line per job and one live line)."""

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None, dry_run: bool = False,
                 report: bool = True, verbose: bool = False) -> None:
        super().__init__(max_batch_size, params)
        self.dry_run, self.report, self.verbose = dry_run, report, verbose
        self.planned: list = []

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        from hldx import submit
        from hldx.config import run_name
        from hldx.progress import SweepLine, into_log
        from hldx.stages import stages, table

        launcher = self.config.hydra.launcher
        slurm = launcher._target_.endswith("SlurmLauncher")
        quiet = not (slurm or self.dry_run or self.verbose)
        params = self._parse_config() + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.split_arguments(parser.parse_overrides(params), self.max_batch_size)  # sets self.planned
        sweep_dir = Path(self.config.hydra.sweep.dir)
        graph = [s for s in stages(self.planned) if self.report or s.name != "report"]
        if not graph:
            print("every run of the sweep has finished: nothing to do")
            return []
        if not quiet:
            print("\n".join(f"  {run_name(cfg)}" for _, cfg, _ in self.planned))
            print(table(graph))
        if slurm:
            for line in submit.submit(graph, launcher, sweep_dir / ".submitit", self.dry_run):
                print(line)
            return []
        if self.dry_run:
            print("dry run: here, the stages would run in this order: " + ", ".join(s.job_name for s in graph))
            return []
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        stage_logs = sweep_dir / "stages"
        before = [s for s in graph if s.name in ("tokenize", "order", "teacher", "cache")]
        after = [s for s in graph if s.name == "report"]
        students = [s for s in graph if s.name == "student"]
        # An eval stage waiting for no student: a run trained before, which its job evaluates without training.
        evaluate = [s.tasks[0] for s in graph if s.name == "eval" and not s.after]
        names = {tuple(job): run_name(cfg) for job, cfg, _ in self.planned}
        total = len(before) + len(after) + len(students) + len(evaluate)  # jobs and stages
        line = SweepLine(total, f"sweep {sweep_dir}", _at_once(launcher)) if quiet else None
        try:
            with into_log(sweep_dir / "sweep.log") if quiet else nullcontext():
                failed = _keeping_hydra(submit.run_here, before, stage_logs, line)
                blocked = {s.job_name: failed[w] for s in students for w in s.after if w in failed}
                for s in students:
                    if line and s.job_name in blocked:
                        line.ended_job(names[tuple(s.tasks[0])], f"not run: {blocked[s.job_name]}", ok=False)
                todo = [s.tasks[0] for s in students if s.job_name not in blocked] + evaluate
                returns = self._launch(todo, names, line)
                failed |= _keeping_hydra(submit.run_here, after, stage_logs, line)
        finally:
            if line:
                line.close()
        self._end(returns, total, failed, blocked)
        return returns

    def _launch(self, todo: list[list[str]], names: dict[tuple, str], line) -> list[Sequence[JobReturn]]:
        """The students through Hydra's launcher, as many at a time as it runs side by side (the basic one: one;
        joblib's: hydra.launcher.n_jobs), so that `line` hears of each batch's jobs as they end."""
        from hldx.cli import failure_line

        batch_size = _at_once(self.config.hydra.launcher) if line else self.max_batch_size
        self.overrides = list(self.split_overrides_to_chunks(todo, batch_size)) if todo else []
        returns, done = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            if line:
                line.started(*(names.get(tuple(job), " ".join(job)) for job in batch))
            returns.append(self.launcher.launch(batch, initial_job_idx=done))
            done += len(batch)
            for r in returns[-1] if line else []:
                ok = r.status == JobStatus.COMPLETED
                result = (f"val_logppl={r.return_value:.4f}" if isinstance(r.return_value, float) else "") if ok \
                    else f"{failure_line(r._return_value)} (log: {_log_of(r)})"
                line.ended_job(names.get(tuple(r.overrides), " ".join(r.overrides)), result, ok)
        return returns

    @staticmethod
    def _end(returns: list[Sequence[JobReturn]], total: int, failed: dict[str, str], blocked: dict[str, str]) -> None:
        """Exit status 1 with one line per job (or stage) that failed or could not run, of `total`."""
        from hldx.cli import failure_line

        jobs = [r for batch in returns for r in batch if r.status == JobStatus.FAILED]
        lines = [f"  {' '.join(r.overrides)}: {failure_line(r._return_value)} (log: {_log_of(r)})" for r in jobs]
        lines += [f"  {name}: {why}" for name, why in failed.items()]
        lines += [f"  {name}: not run: {why}" for name, why in blocked.items()]
        if lines:
            raise SystemExit(f"{len(lines)} of {total} jobs and stages failed or did not run; the others ran:\n"
                             + "\n".join(lines))

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        # A static method of BasicSweeper; its sweep() calls it on self, which lands here.
        from hldx.cli import report
        from hldx.errors import UserError
        from hldx.study import launch_plan

        (jobs,) = BasicSweeper.split_arguments(overrides, None)
        launcher = self.config.hydra.launcher
        ranks = int(launcher.get("nodes") or 1) * int(launcher.get("tasks_per_node") or 1)
        target = "" if self.dry_run else launcher._target_  # dry: sbatch need not be on PATH
        try:
            self.planned = _keeping_hydra(launch_plan, jobs, target, ranks)
        except UserError as err:  # one message naming each bad job, exit status 2
            raise SystemExit(report("python -m hldx.run", err)) from None
        todo = [job for job, _, _ in self.planned]
        return list(self.split_overrides_to_chunks(todo, max_batch_size)) if todo else []


def _at_once(launcher) -> int:
    """How many jobs a local launcher runs side by side: joblib's n_jobs (-1: a CPU each), else one."""
    n_jobs = int(launcher.get("n_jobs") or 1)
    return (os.cpu_count() or 1) if n_jobs < 0 else n_jobs


def _keeping_hydra(fn, *args):
    """fn(*args), Hydra's globals kept: composing a job's config re-initialises them, and the sweep's jobs
    take their name and output directory from them."""
    state = Singleton.get_state()
    try:
        return fn(*args)
    finally:
        Singleton.set_state(state)


def _log_of(job: JobReturn) -> str:
    """Where a job's log is: Hydra's job log file in its output directory (the launcher's own log beside it)."""
    hydra = job.hydra_cfg.hydra if job.hydra_cfg is not None else None
    if hydra is None:
        return "the launcher's log"
    return str(Path(hydra.runtime.output_dir) / f"{hydra.job.name}.log")
