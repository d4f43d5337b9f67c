"""What a stopped run needs to go on exactly, and how it is told to stop.

A run directory holds
    start-<p>/   the student's weights (HF format) at the start of phase p, written once when p starts
    final/       the same after the last phase (the run's model)
    ckpt/p<phase>-s<step>/   a checkpoint: dcp/, that phase's module and AdamW state as
                 torch.distributed.checkpoint wrote them (every rank its part; none at a phase's end), then
                 state.json (phase, step, ranks, MLflow run id). Each is written as ckpt/.tmp-<name>/, then
                 renamed to its own new name; only then are older ones removed. A crash at any instant leaves
                 the newest complete checkpoint in place, and the run resumes from it.
Resuming phase p at step s: the weights of start-<p>, then dcp/ over the phase's module (HLDF's phase 1
trains only the bottom of the student: the rest stays as start-<p> holds it), then AdamW, then the loader at
step s. The data order and the schedule are pure functions of the step.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from transformers import PreTrainedModel

from hldx.errors import ConfigError
from hldx.parallel import Control


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class Checkpoint:
    phase: int = 0
    step: int = 0
    ranks: int = 1
    tracking_run_id: str | None = None

    @property
    def name(self) -> str:
        return f"p{self.phase}-s{self.step:012d}"

    @staticmethod
    def load(run_dir: Path) -> Checkpoint | None:
        """The newest complete checkpoint of a run (None: there is none)."""
        found = latest(run_dir)
        return None if found is None else Checkpoint(**json.loads((found / "state.json").read_text()))

    def check_ranks(self, run_dir: Path, ranks: int) -> None:
        if self.ranks != ranks:
            raise ConfigError(f"{run_dir / 'ckpt'} was written by a job of {self.ranks} rank(s) and this one has "
                              f"{ranks}: resume it on {self.ranks} (hydra.launcher.tasks_per_node x nodes, or "
                              f"torchrun --nproc_per_node), or delete that directory to start the run over")

    def save(self, run_dir: Path, write_state=None) -> None:
        """Add this checkpoint beside the run's others, then remove the older ones; `write_state(dir)` (every
        rank, collective) writes the module and optimizer state into dir/dcp. Every rank calls it."""
        root = run_dir / "ckpt"
        tmp, final = root / f".tmp-{self.name}", root / self.name
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        if write_state is not None:
            write_state(tmp / "dcp")
        barrier()
        if rank() == 0:
            with open(tmp / "state.json", "w") as f:
                f.write(json.dumps(asdict(self)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # this very state, saved by an attempt that died before cleaning up
                shutil.rmtree(tmp)
            else:
                tmp.rename(final)
            for old in [*root.iterdir(), run_dir / "ckpt.old"]:  # older ones, unfinished writes, the old layout
                if old.is_file():
                    old.unlink()
                elif old != final:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()


def latest(run_dir: Path) -> Path | None:
    """The directory of the newest complete checkpoint (one with its state.json), this layout's or the one
    before it (ckpt/ itself, or ckpt.old/ left by a crash between its two renames)."""
    root, states = run_dir / "ckpt", []
    for path in [*(root.glob("p*-s*") if root.is_dir() else ()), root, run_dir / "ckpt.old"]:
        try:
            state = json.loads((path / "state.json").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):  # none, or removed (or written) meanwhile
            continue
        states.append(((state["phase"], state["step"]), path))
    return max(states)[1] if states else None


def start_dir(run_dir: Path, phase: int, phases: int) -> Path:
    """Where the student's weights at the start of `phase` are: final/ after the last phase."""
    return run_dir / ("final" if phase == phases else f"start-{phase}")


def save_start(make_model: Callable[[], PreTrainedModel], path: Path) -> None:
    """Rank 0 alone makes the weights (if `path` lacks them) and writes them (HF format) beside, then renames
    them into place; every rank waits."""
    if rank() == 0 and not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_model().save_pretrained(tmp)
        tmp.rename(path)
    barrier()


class Preemption:
    """SIGUSR2 (SLURM's warning before a time limit or preemption) and SIGTERM only raise a flag. The ranks
    agree on it through hldx.parallel.Control, which reads the previous step's posting: no host-device sync,
    and every rank stops after the same step; the loop checkpoints, then hands SIGUSR2 to the handler that was
    there before (submitit's, which requeues the job) or exits."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __enter__(self) -> Preemption:
        self.received, self.previous, self.control = 0, {}, Control()
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._raise_flag) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _raise_flag(self, signum, _frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Whether any rank had been signalled when the previous step ended (at once with one rank)."""
        agreed = self.control.agreed(self.received)
        self.received = max(self.received, agreed)
        return bool(agreed)

    def stop(self) -> None:
        previous = self.previous.get(self.received)
        if self.received == signal.SIGUSR2 and callable(previous):
            previous(signal.SIGUSR2, None)  # submitit: checkpoint the job description and requeue
        raise SystemExit(f"stopped by signal {self.received} after a checkpoint; the same command resumes")
