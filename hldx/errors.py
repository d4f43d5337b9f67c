"""User errors: a mistake of the user's (a bad override, a missing file, a damaged cache) raises a
`UserError` whose message names the key, what was given and what is allowed. `hldx.cli` turns it into one
line on stderr and exit status 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A mistake in what the user gave: the message says what is wrong and how to fix it."""


class RunFailed(Exception):
    """A run that cannot succeed as configured (it diverged): one line, exit status 1, the run FAILED."""


class ConfigError(UserError, ValueError):
    """A bad setting: the message names the key, what was given and what is allowed."""


class BadInput(UserError, ValueError):
    """Bad input data given by the user (a CSV of runs, an experiment that does not exist)."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError('key=value is invalid: expected allowed') unless ok."""
    if not ok:
        raise ConfigError(f"{key}={value} is invalid: expected {allowed}")
