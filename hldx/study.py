"""A study: a sweep's grid expanded into jobs as Hydra expands it, each job checked and planned, duplicates
(same run identity) dropped, and before a launch what is left to run."""
from __future__ import annotations

import logging
import re
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
    """One bad job's error line, '  <its overrides>: <message>', with the overrides in `.job` and the message
    alone in `.message`."""

    job: str
    message: str

    def __new__(cls, job: str, message: str) -> BadJob:
        line = super().__new__(cls, f"  {job}: {message}")
        line.job, line.message = job, message
        return line


def refusal(bad: list[str], jobs: int, what: str) -> ConfigError:
    """One bad job of one: its message alone; else each distinct cause once, with the number of (distinct) jobs
    it concerns and the overrides of one of them, then each other problem."""
    if jobs == 1 and len(bad) == 1 and isinstance(bad[0], BadJob):
        return ConfigError(bad[0].message)
    causes: dict[str, list[str]] = {}
    for b in bad:
        if isinstance(b, BadJob):
            causes.setdefault(b.message, []).append(b.job)
    lines = [f"  {cause} ({f'{len(of)} jobs, e.g.' if len(of) > 1 else 'job:'} {of[0]})" for cause, of in causes.items()]
    lines += [b for b in bad if not isinstance(b, BadJob)]
    head = f"{sum(len(of) for of in causes.values())} invalid job(s){what}"
    return ConfigError(f"{head}:\n" + "\n".join(lines))


def sweep_settings(overrides: list[str]) -> DictConfig:
    """The `hydra` node of a sweep's command line (hydra.sweeper: its grid and switches, hydra.launcher, ...): the
    overrides of hydra and of the sweep config (+sweep=NAME) alone, composed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        sources = [o.input_line for o in OverridesParser.create().parse_overrides(overrides)
                   if not o.is_sweep_override() and re.split(r"[./]", o.key_or_group)[0] in ("sweep", "hydra")]
    except Exception as err:  # noqa: BLE001 - an override Hydra cannot parse
        raise ConfigError(explain(err) or str(err)) from None
    return C.compose(sources, with_hydra=True).hydra


def expand_sweep(overrides: list[str], settings: DictConfig | None = None) -> list[list[str]]:
    """Hydra's own expansion of a sweep into one override list per job, as hldx's sweeper launches it: the
    grid of a sweep config (hydra.sweeper.params, e.g. from +sweep=NAME), then the command line's
    overrides (a=1,2 b=x,y), which win for a key given in both. `settings`: sweep_settings(overrides), if made."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = (settings or sweep_settings(overrides)).sweeper.get("params") or {}
    try:
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    except Exception as err:  # noqa: BLE001 - an override Hydra cannot parse
        raise ConfigError(explain(err) or str(err)) from None
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def plan_jobs(jobs: list[list[str]], launch: bool = False, ranks: int | None = None
              ) -> tuple[list[Planned], list[str]]:
    """The distinct jobs (the first of each run_key) with their config and plan, and an error line per bad one.
    Every distinct job passes hldx.job.check (on `ranks` ranks each); `launch`: also what a job needs to run
    (its teacher checkpoint and every input path, data enough for its epochs). A job that differs from an
    earlier one only in hyperparameters its method ignores is that job again: neither composed, checked nor
    counted."""
    planned, errors, seen, kept, compose = [], [], set(), set(), C.Composer()
    shared = set.intersection(*map(set, jobs)) if len(jobs) > 1 else set()  # not repeated in each error line
    for job in jobs:
        try:
            cfg, method = None, dict(o.split("=", 1) for o in job if "=" in o).get("method")
            if method not in C.USES:  # the default method, or a bad one: its config says
                cfg = compose(job)
                method = cfg.method.name
            ignored = set(C.HPARAMS) - set(C.USES[method])
            same = frozenset(o for o in job if o.split("=", 1)[0].lstrip("+~") not in ignored)
            if same in seen:
                continue
            seen.add(same)
            cfg = cfg or compose(job)
            run = J.check(cfg, launch=False, ranks=ranks)
            if launch:
                teacher.check(cfg, launch=True)
                J.check_inputs(cfg)
                J.check_epochs(cfg, run)
        except ConfigError as err:  # every bad job is reported, then we stop
            errors.append(BadJob(" ".join(o for o in job if o not in shared) or "(defaults)", str(err)))
            continue
        if run.run_key not in kept:  # the same run_key, differing in keys that change how it runs, not what
            kept.add(run.run_key)
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
    return todo
