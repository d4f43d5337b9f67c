"""What a stopped run needs to go on exactly, and how it is told to stop.

A run directory holds
    start-<p>/   the student's weights (HF format) at the start of phase p, written once when p starts
    final/       the same after the last phase (the run's model)
    ckpt/        the latest checkpoint: state.json (phase, step, ranks, MLflow run id) and, inside a phase,
                 dcp/, that phase's module and AdamW state as torch.distributed.checkpoint wrote them (every
                 rank its part). A checkpoint is written as ckpt.tmp/, then renamed over ckpt/: a crash
                 mid-write leaves the previous one whole.
Resuming phase p at step s: the weights of start-<p>, then dcp/ over the phase's module (HLDF's phase 1
trains only the bottom of the student: the rest stays as start-<p> holds it), then AdamW, then the loader at
step s. The data order and the schedule are pure functions of the step.
"""
from __future__ import annotations

import json
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

    @staticmethod
    def load(run_dir: Path) -> Checkpoint | None:
        """The latest checkpoint (the previous one if a crash came between the two renames of a save)."""
        for name in ("ckpt", "ckpt.old"):
            state = run_dir / name / "state.json"
            if state.exists():
                return Checkpoint(**json.loads(state.read_text()))
        return None

    def check_ranks(self, run_dir: Path, ranks: int) -> None:
        if self.ranks != ranks:
            raise ConfigError(f"{run_dir / 'ckpt'} was written by a job of {self.ranks} rank(s) and this one has "
                              f"{ranks}: resume it on {self.ranks} (hydra.launcher.tasks_per_node x nodes, or "
                              f"torchrun --nproc_per_node), or delete that directory to start the run over")

    def save(self, run_dir: Path, write_state=None) -> None:
        """Atomically replace the run's checkpoint; `write_state(dir)` (every rank, collective) writes the
        module and optimizer state into dir/dcp. Every rank calls it."""
        tmp, final, old = run_dir / "ckpt.tmp", run_dir / "ckpt", run_dir / "ckpt.old"
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        if write_state is not None:
            write_state(tmp / "dcp")
        barrier()
        if rank() == 0:
            (tmp / "state.json").write_text(json.dumps(asdict(self)) + "\n")
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        barrier()


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
