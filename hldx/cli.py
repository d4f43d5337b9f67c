"""How every entry point reports a user's mistake: one line on stderr, exit status 2, no traceback.

A `UserError` is reported as its message; Hydra's and OmegaConf's own composition errors (an unknown key or
option, a value of the wrong type, an override that does not parse) are put into the same form, naming the
key, what was given and what is allowed. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hldx.errors import BadInput, RunFailed, UserError
from hldx.progress import into_log

EXIT_USER_ERROR = 2
_TYPES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "str": "a string"}


def explain(err: BaseException) -> str | None:
    """The one-line form of a user's mistake, or None if `err` is not one (a bug keeps its traceback)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, MissingConfigException):
        return _missing_option(str(err))
    if isinstance(err, OverrideParseException):
        why = " ".join(str(err).split()).split(" See https://")[0]
        return f"{getattr(err, 'override', 'an override')} cannot be parsed: {why} (Hydra's override grammar: " \
               f"key=value, quote values with spaces or brackets)"
    if isinstance(err, ConfigCompositionException):
        cause, text = err.__cause__, str(err)
        given = re.search(r"use \+(\S+)", text) or re.search(r"override (\S+)$", text.splitlines()[0])
        if isinstance(cause, OmegaConfBaseException):
            line = _omegaconf(cause, given.group(1) if given else None)
            return line or f"{text.splitlines()[0]}: {_first_line(cause)}"
        return " ".join(text.split())
    if isinstance(err, OmegaConfBaseException):
        return _omegaconf(err, None)
    return None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _omegaconf(err: BaseException, given: str | None) -> str | None:
    """A type error or unknown key reported by OmegaConf, as 'key=value is invalid: expected ...'."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

    key = getattr(err, "full_key", None) or (given.split("=", 1)[0].lstrip("+~") if given else None)
    value = given.split("=", 1)[1] if given and "=" in given else getattr(err, "value", None)
    text = _first_line(err)
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)):
        where = key.rpartition(".")[0] if key else ""
        return (f"{key}={value} is invalid: there is no such key{f' in {where}' if where else ''} "
                f"(python -m hldx.run --help lists the keys; +{key}=VALUE adds a new one)")
    if isinstance(err, MissingMandatoryValue):
        return f"{key} is not set: give it a value ({key}=VALUE)"
    if isinstance(err, ValidationError):
        wanted = re.search(r"converted to (\w+)", text)
        if wanted:
            return f"{key}={value} is invalid: expected {_TYPES.get(wanted.group(1), wanted.group(1))}"
        if "Non optional field cannot be assigned None" in text or "is not Optional" in text:
            return f"{key}={value} is invalid: expected a value, not null"
        return f"{key}={value} is invalid: {text}"
    return None


def _missing_option(text: str) -> str:
    """MissingConfigException: an unknown group option, with the options that exist."""
    found = re.search(r"Could not find '([^']+)'", text)
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    if not found:
        return " ".join(text.split("Config search path")[0].split())
    group, _, option = found.group(1).rpartition("/")
    if not group:
        return f"no config named {option!r}: check the spelling (+sweep=NAME reads sweeps/NAME.yaml)"
    allowed = f"one of {', '.join(options)}" if options else "an option of that group"
    return f"{group.replace('/', '.')}={option} is invalid: expected {allowed}"


def command_args(argv: list[str] | None, doc: str) -> list[str] | None:
    """A command's arguments; None, after printing `doc`, when it starts with --help."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(doc)
        return None
    return args


def sweep_args(argv: list[str] | None, doc: str) -> list[str] | None:
    """The overrides of a command that takes a sweep (`-m` optional: it always expands one); None, after
    printing `doc`, when --help was asked for."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-m", "--multirun")]
    if any(a in ("-h", "--help") for a in args):
        print(doc)
        return None
    return args


def output_file(key: str, value: str):
    """The path an output switch (plan.json, eval.json, bench.json) names, its directory made before any work;
    UserError if it cannot be."""
    path = Path(value).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{key}={value} is invalid: its directory cannot be made ({err.strerror})") from None
    return path


def report(prog: str, err: BaseException) -> int:
    """Print the one-line form of a user's mistake and return exit status 2; re-raise anything else."""
    line = explain(err)
    if line is None:
        raise err
    sys.stderr.write(f"{prog}: error: {line}\n")
    return EXIT_USER_ERROR


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command's `main(argv) -> exit status`: a user's mistake is one line and status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified by report(): a bug is re-raised as it is
            return report(_prog(main.__module__), err)
    return wrapped


def task(fn: Callable) -> Callable:
    """Decorate a Hydra task function. Alone, a UserError ends the process with one line and status 2, a
    RunFailed with one line and status 1 (Hydra itself would print 'Error executing job' and a traceback).
    In a sweep, the error goes back to hldx's sweeper, which runs the other jobs and reports each failure in
    one line at the end; a bug's traceback goes to the job's log file, not the terminal, as does everything the
    job writes unless the sweep is verbose (hydra.sweeper.verbose=true, or --verbose)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            with into_log(where) if quiet_sweep() and (where := log_file()) else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except (UserError, RunFailed) as err:
            if in_sweep():
                raise
            if isinstance(err, UserError):
                raise SystemExit(report(_prog(fn.__module__), err)) from None
            sys.stderr.write(f"{_prog(fn.__module__)}: {err}\n")
            raise SystemExit(1) from None
        except Exception:
            if in_sweep():
                _to_log_file(traceback.format_exc())
            raise
    return wrapped


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra sweep (-m)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def quiet_sweep() -> bool:
    """Whether this process runs a job of a sweep that hldx's sweeper runs here, quietly: what the job writes
    goes to its log, the sweep's terminal shows a line per job (hydra.sweeper.verbose=false, the default)."""
    from hydra.core.hydra_config import HydraConfig

    if not in_sweep():
        return False
    sweeper = HydraConfig.get().sweeper
    return str(sweeper.get("_target_", "")).endswith("HldxSweeper") and not sweeper.get("verbose", False)


def log_file() -> str | None:
    """Where this process logs: the file of the root logger's file handler (a Hydra job's, a stage's run here),
    else, in a SLURM job, submitit's stderr file (its traceback's); None if neither."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    if "SUBMITIT_FOLDER" in os.environ:
        from submitit import JobEnvironment

        return str(JobEnvironment().paths.stderr)
    return None


def _to_log_file(text: str) -> None:
    """Write `text` to the job's log file (Hydra's file handler) and nowhere else."""
    record = logging.LogRecord("hldx", logging.ERROR, __file__, 0, "%s", (text,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def failure_line(err: BaseException) -> str:
    """A failed job's cause in one line: a user's mistake or a failed run as it is, a bug by its type."""
    if isinstance(err, (UserError, RunFailed)):
        return " ".join(str(err).split())
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first} (a bug: its traceback is in the log)"


def run(app: Callable[[], Any]) -> None:
    """Run a @hydra.main app so that every user's mistake, Hydra's composition errors included, ends with one
    line on stderr and exit status 2; `--verbose` is hydra.sweeper.verbose=true (a sweep run here shows all its
    jobs write)."""
    if "--verbose" in sys.argv:
        sys.argv = [a for a in sys.argv if a != "--verbose"] + ["hydra.sweeper.verbose=true"]
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    try:
        app()
    except Exception as err:  # noqa: BLE001 - classified by report(): a bug is re-raised as it is
        raise SystemExit(report(_prog(), err)) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _prog(module: str = "__main__") -> str:
    """How the user started this program: python -m MODULE."""
    if module != "__main__":
        return f"python -m {module}"
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else os.path.basename(sys.argv[0])


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line (and exit status 2) like every hldx command."""

    def error(self, message: str):
        raise BadInput(f"{message} (see --help)")
