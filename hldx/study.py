"""A study: a sweep's grid expanded into jobs as Hydra expands it, each job checked and planned, duplicates
(same run identity) dropped, and before a launch what is left to run."""
from __future__ import annotations

import logging
import shutil

from omegaconf import DictConfig

from hldx import config as C
from hldx import job as J
from hldx import teacher, tracking
from hldx.budget import RunPlan
from hldx.cli import explain
from hldx.errors import ConfigError

log = logging.getLogger("hldx")
Planned = tuple[list[str], DictConfig, RunPlan]


class BadJob(str):
    """One bad job's error line, '  <its overrides>: <message>', with the message alone in `.message`."""

    message: str

    def __new__(cls, job: str, message: str) -> BadJob:
        line = super().__new__(cls, f"  {job}: {message}")
        line.message = message
        return line


def refusal(bad: list[str], jobs: int, what: str) -> ConfigError:
    """One bad job of one: its message alone; else a count and a line for each bad job (and problem)."""
    if jobs == 1 and len(bad) == 1 and isinstance(bad[0], BadJob):
        return ConfigError(bad[0].message)
    head = f"{sum(isinstance(b, BadJob) for b in bad)} invalid job(s){what}"
    return ConfigError(f"{head}:\n" + "\n".join(bad))


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's own expansion of a sweep into one override list per job, as hldx's sweeper launches it: the
    grid of a sweep config (hydra.sweeper.params, e.g. from +sweep=NAME), then the command line's
    overrides (a=1,2 b=x,y), which win for a key given in both."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        sources = [o.input_line for o in parser.parse_overrides(overrides)  # what can set hydra.sweeper.params
                   if not o.is_sweep_override() and o.key_or_group.split(".")[0] in ("sweep", "hydra")]
        params = C.compose(sources, with_hydra=True).hydra.sweeper.get("params") or {}
        parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - an override Hydra cannot parse
        raise ConfigError(explain(err) or str(err)) from None
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def plan_jobs(jobs: list[list[str]], launch: bool = False, ranks: int | None = None
              ) -> tuple[list[Planned], list[str]]:
    """The distinct jobs (the first of each run_key) with their config and plan, and an error line per bad job.
    Every job passes hldx.job.check (on `ranks` ranks each); `launch`: also what a job needs to run (its
    teacher checkpoint, data enough for its epochs)."""
    planned, errors, seen, compose = [], [], set(), C.Composer()
    shared = set.intersection(*map(set, jobs)) if len(jobs) > 1 else set()  # not repeated in each error line
    for job in jobs:
        try:
            cfg = compose(job)
            run = J.check(cfg, launch=False, ranks=ranks)
            if launch:
                teacher.check(cfg, launch=True)
                J.check_epochs(cfg, run)
        except ConfigError as err:  # every bad job is reported, then we stop
            errors.append(BadJob(" ".join(o for o in job if o not in shared) or "(defaults)", str(err)))
            continue
        if run.run_key not in seen:
            seen.add(run.run_key)
            planned.append((job, cfg, run))
    return planned, errors


def plan_sweep(overrides: list[str]) -> tuple[list[RunPlan], list[str]]:
    """Unique jobs of a sweep (deduplicated by run_key) and one error line per bad job."""
    planned, errors = plan_jobs(expand_sweep(overrides))
    return [run for _, _, run in planned], errors


def launch_plan(jobs: list[list[str]], launcher: str = "", ranks: int | None = None) -> list[Planned]:
    """The jobs of a sweep left to launch, one per run_key, with their config and plan, before anything is
    launched.

    Every job is composed, checked and planned (on `ranks` ranks: the launcher's); bad jobs, a job too big for
    plan.device_memory, a distilled job without its teacher, a SLURM
    launcher (`launcher`: hydra.launcher._target_) without `sbatch` on PATH and a tracking server that does
    not answer raise ConfigError naming each of them. Of jobs with the same run_key only the first is kept;
    a finished run is skipped, a failed or interrupted one is kept (it resumes from its checkpoint).
    """
    planned, errors = plan_jobs(jobs, launch=True, ranks=ranks)
    problems = []
    if launcher.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
        problems.append("  hydra/launcher submits to SLURM, but sbatch is not on PATH: launch from a SLURM "
                        "login node, or leave hydra/launcher out to run the jobs here")
    problems += [f"  {why}" for uri in sorted({cfg.tracking.uri for _, cfg, _ in planned})
                 if (why := tracking.unreachable(uri))]
    if errors:
        raise refusal(errors + problems, len(jobs), " in the sweep; nothing was launched")
    if problems:
        raise ConfigError("nothing was launched:\n" + "\n".join(problems))
    todo = [(job, cfg, run) for job, cfg, run in planned if not J.finished(cfg, run.run_key)]
    log.info("sweep: %d job(s), %d distinct, %d finished already: launching %d", len(jobs), len(planned),
             len(planned) - len(todo), len(todo))
    for _, cfg, _ in todo:
        log.info("  %s", C.run_name(cfg))
    return todo
