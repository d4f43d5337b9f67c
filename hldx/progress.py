"""Progress that a log shows: tqdm's bar on a terminal; where output is not one (every SLURM log), a plain line
every few seconds with the count, the rate and the time left. And a sweep's terminal, run here: a line per job
and one live line, everything else the jobs write going to their logs."""
from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

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


# ---- a sweep's terminal ---------------------------------------------------------------------------------------

@contextmanager
def into_log(path: str | os.PathLike):
    """Everything this process writes meanwhile (its prints, third-party progress bars, warnings and log lines,
    a C library's output) appended to the log at `path`, and not to the terminal: standard output and error
    point there, and the root logger's terminal handlers are set aside (its file handler, if it has one for
    `path`, writes there itself)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved, root = (os.dup(1), os.dup(2)), logging.getLogger()
    handlers = list(root.handlers)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    root.handlers = [h for h in handlers if isinstance(h, logging.FileHandler)
                     or not isinstance(h, logging.StreamHandler)]
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        root.handlers = handlers


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


class SweepLine:
    """What a sweep run here shows on its terminal: a line per job that ends (its name, its headline metric or
    why it failed, its time) and one live line below them (jobs done, running and failed, the time elapsed and
    left), redrawn in place every second on a terminal; elsewhere (a pipe, a file) each job's line ends with
    where the sweep is instead. It writes to the terminal the process had when it was made, whatever `into_log`
    does meanwhile. `at_once`: jobs the launcher runs side by side."""

    def __init__(self, total: int, name: str = "sweep", at_once: int = 1):
        self.out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.live = self.out.isatty()
        self.total, self.name, self.at_once, self.start = total, name, max(1, at_once), time.monotonic()
        self.ended: list[tuple[bool, float, bool]] = []   # (ok, seconds, a run: not a stage)
        self.running: dict[str, float] = {}                # what runs, since when
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if self.live:
            threading.Thread(target=self._tick, daemon=True).start()

    def started(self, *what: str) -> None:
        with self.lock:
            self.running |= dict.fromkeys(what, time.monotonic())
            self._draw()

    def ended_job(self, what: str, result: str, ok: bool = True, run: bool = True) -> None:
        """A job ended: `result` is its headline metric, or why it failed; `run`: a run, not a stage."""
        with self.lock:
            since = self.running.pop(what, None)
            seconds = time.monotonic() - since if since is not None else 0.0
            self.ended.append((ok, seconds, run))
            line = f"{'done  ' if ok else 'FAILED'} {what}{f'  {result}' if result else ''}  ({_clock(seconds)})"
            self._print(line if self.live else f"{line}  [{self.state()}]")

    def state(self) -> str:
        """Jobs done and failed of all, the time elapsed and left (the runs' mean time for each job left, `at_once`
        at a time: the stages before them, a teacher's, a cache's, are not like them), and what runs."""
        done, failed = sum(ok for ok, _, _ in self.ended), sum(not ok for ok, _, _ in self.ended)
        runs = [s for _, s, run in self.ended if run]
        now, left = time.monotonic(), self.total - len(self.ended)
        running = max((now - t for t in self.running.values()), default=0.0)
        eta = _clock(max(0.0, sum(runs) / len(runs) * left / self.at_once - running)) if runs or not left else "--"
        return (f"{self.name}: {done}/{self.total} done, {failed} failed | {_clock(now - self.start)} elapsed, "
                f"ETA {eta}" + (f" | running {', '.join(self.running)}" if self.running else ""))

    def close(self) -> None:
        """The live line's last state, as a line of its own."""
        self.stop.set()
        with self.lock:
            self.out.write(("\r\033[K" if self.live else "") + self.state() + "\n")
            self.out.close()

    def _print(self, line: str) -> None:
        self.out.write(f"\r\033[K{line}\n" if self.live else f"{line}\n")
        self._draw()

    def _draw(self) -> None:
        if self.live:
            try:
                width = os.get_terminal_size(self.out.fileno()).columns or 80  # 0: a terminal that has not said
            except OSError:
                width = 80
            self.out.write(f"\r\033[K{self.state()[:width - 1]}")
            self.out.flush()

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            with self.lock:
                if not self.out.closed:
                    self._draw()
