"""hldx's Hydra plugin: the study grids of sweeps/ as the config group `sweep` (`+sweep=NAME`), and a sweeper
that launches only the jobs of a sweep that hldx still has to run.

The sweeper is Hydra's basic sweeper (the same grid syntax, `hydra.sweeper.params` from a sweep config)
with one step between expanding the grid and launching it: `hldx.study.check_sweep` checks every job,
drops duplicates (same run identity) and skips finished runs, so that the local and the SLURM launcher
both get the remaining distinct jobs. Hydra imports this module when it starts (plugin discovery).
"""
from __future__ import annotations

from collections.abc import Sequence
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
    """BasicSweeper whose expanded grid passes through hldx.study.check_sweep before any job is launched, and
    that runs every job it can: a failed job does not stop the others; at the end each failure is one line
    (its overrides, its cause, its log) and the exit status is 1."""

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        from hldx.cli import failure_line

        params = self._parse_config() + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, done = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            returns.append(self.launcher.launch(batch, initial_job_idx=done))
            done += len(batch)
        failed = [r for batch in returns for r in batch if r.status == JobStatus.FAILED]
        if failed:
            lines = [f"  {' '.join(r.overrides)}: {failure_line(r._return_value)} (log: {_log_of(r)})" for r in failed]
            raise SystemExit(f"{len(failed)} of {done} job(s) failed; the others ran:\n" + "\n".join(lines))
        return returns

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        # A static method of BasicSweeper; its sweep() calls it on self, which lands here.
        from hldx.cli import report
        from hldx.errors import UserError
        from hldx.study import check_sweep

        (jobs,) = BasicSweeper.split_arguments(overrides, None)
        state = Singleton.get_state()  # composing the jobs re-initialises Hydra's globals: keep the sweep's
        try:
            launcher = self.config.hydra.launcher
            ranks = int(launcher.get("nodes") or 1) * int(launcher.get("tasks_per_node") or 1)
            todo = check_sweep(jobs, launcher._target_, ranks)
        except UserError as err:  # one message naming each bad job, exit status 2
            raise SystemExit(report("python -m hldx.run", err)) from None
        finally:
            Singleton.set_state(state)
        return list(self.split_overrides_to_chunks(todo, max_batch_size)) if todo else []


def _log_of(job: JobReturn) -> str:
    """Where a job's log is: Hydra's job log file in its output directory (the launcher's own log beside it)."""
    hydra = job.hydra_cfg.hydra if job.hydra_cfg is not None else None
    if hydra is None:
        return "the launcher's log"
    return str(Path(hydra.runtime.output_dir) / f"{hydra.job.name}.log")
