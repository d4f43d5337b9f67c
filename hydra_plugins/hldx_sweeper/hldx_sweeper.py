"""hldx's Hydra plugin: the study grids of sweeps/ as the config group `sweep` (`+sweep=NAME`), and a sweeper
that launches only the jobs of a sweep that hldx still has to run.

The sweeper is Hydra's basic sweeper (the same grid syntax, `hydra.sweeper.params` from a sweep config)
with one step between expanding the grid and launching it: `hldx.study.check_sweep` checks every job,
drops duplicates (same run identity) and skips finished runs, so that the local and the SLURM launcher
both get the remaining distinct jobs. Hydra imports this module when it starts (plugin discovery).
"""
from __future__ import annotations

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override
from hydra.core.singleton import Singleton
from omegaconf import OmegaConf

from hldx.config import CONF_DIR

SWEEPS = CONF_DIR.parent / "sweeps"

for _path in sorted(SWEEPS.glob("*.yaml")):
    ConfigStore.instance().store(group="sweep", name=_path.stem, node=OmegaConf.load(_path), package="_global_",
                                 provider="hldx")


class HldxSweeper(BasicSweeper):
    """BasicSweeper whose expanded grid passes through hldx.study.check_sweep before any job is launched."""

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
