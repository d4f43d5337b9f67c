"""Progress that a log shows: tqdm's bar on a terminal; where output is not one (every SLURM log), a plain line
every few seconds with the count, the rate and the time left."""
from __future__ import annotations

import io
import sys

from tqdm import tqdm

LINE_EVERY_S = 10.0  # off a terminal: a line this often


class Progress(tqdm):
    """tqdm; `line_every_s`: off a terminal, seconds between lines (inf: only when the postfix is set, as the
    trainer does at each log step)."""

    def __init__(self, *args, line_every_s: float = LINE_EVERY_S, **kwargs):
        self.plain = not sys.stderr.isatty() and kwargs.get("disable") is not True
        if self.plain:
            kwargs |= {"disable": False, "dynamic_ncols": False, "file": io.StringIO(),  # lines: display() below
                       "mininterval": line_every_s, "maxinterval": line_every_s}
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self.plain:
            return super().display(msg, pos)
        if msg != "" or self.n:  # tqdm clears a bar with an empty message; a line is not cleared
            print(self.format_meter(**{**self.format_dict, "ncols": 0}), file=sys.stderr, flush=True)
        return True
