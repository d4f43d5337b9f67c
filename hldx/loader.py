"""The data path: each step's tokens and teacher outputs, read ahead of the step it feeds.

A step's rows are a pure function of the step (hldx.data.Batches), so while step s computes, threads read
steps s+1..s+P (cache.prefetch) from the training rows and the teacher cache straight into host buffers,
page-locked on a GPU so that the copies to the device are asynchronous; the stored values (bfloat16,
float8, ...) are upcast on the device. The cache.readers threads read whole steps, several at once (keep
cache.prefetch >= cache.readers): reading files and hashing them release the GIL, so readers scale with cores.
A buffer is refilled only once the copies out of it are done (a CUDA event), so nothing waits but a step whose
rows are not read yet.

torch's DataLoader is not used: its workers hand each batch over in a fresh shared-memory tensor and its
pinning thread copies it once more, two extra passes over what is here up to gigabytes per second.
"""
from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hldx.data import Batches
from hldx.store import CacheReader, decode_hidden, decode_topk


@dataclass
class Micro:
    """One micro-batch on the device: tokens [m, L] long and what the phase reads of the teacher."""

    tokens_BxL: Tensor
    topk_idx_BxLxK: Tensor | None = None
    topk_val_BxLxK: Tensor | None = None     # logits minus each position's largest, float32
    hidden_BxLxD: Tensor | None = None       # float32


@dataclass
class Slot:
    """Host buffers for one step of one rank."""

    tokens: Tensor                                    # [b, L] int32
    arrays: dict[str, list[Tensor]]                   # part -> its stored arrays [b, ...]
    copied: torch.cuda.Event | None = None            # recorded after the last copy out of these buffers
    step: int = -1
    pending: list[Future] = field(default_factory=list)


class Loader:
    """Steps `steps` of `batches` (this rank's rows) with the cache `parts` ("topk", "hidden") the phase
    reads, `prefetch` steps ahead, by `readers` threads; `get(step)` in increasing order."""

    def __init__(self, batches: Batches, reader: CacheReader | None, parts: Iterable[str], steps: range,
                 device: torch.device, prefetch: int = 2, readers: int = 2):
        self.batches, self.reader, self.parts = batches, reader, tuple(parts)
        if self.parts and reader is None:
            raise ValueError(f"parts {self.parts} need a cache reader")
        self.steps, self.device, self.readers = steps, device, max(1, readers)
        cuda = device.type == "cuda"
        b, L = batches.per_rank, batches.tokens_RxL.shape[1]
        self.slots = [Slot(torch.empty((b, L), dtype=torch.int32, pin_memory=cuda),
                           {p: reader.buffers(p, b, pin=cuda) for p in self.parts},
                           torch.cuda.Event() if cuda else None) for _ in range(max(1, prefetch) + 1)]
        self.pool = ThreadPoolExecutor(self.readers, thread_name_prefix="hldx-loader")
        self.next = steps.start  # the next step to schedule

    def _fill(self, slot: Slot, first: int) -> None:
        """The step whose rows start at global position `first` into the slot."""
        if slot.copied is not None:
            slot.copied.synchronize()  # the previous step's copies out of these buffers are done
        for lo, hi, row in _runs(first, first + self.batches.per_rank, self.batches.rows):
            at = slice(lo - first, hi - first)
            np.copyto(slot.tokens[at].numpy(), self.batches.tokens_RxL[row:row + hi - lo], casting="unsafe")
            for part in self.parts:
                self.reader.read_into(part, row, [t[at] for t in slot.arrays[part]])

    def _schedule(self, step: int) -> None:
        slot = self.slots[step % len(self.slots)]
        slot.step, slot.pending = step, [self.pool.submit(self._fill, slot, self.batches.first(step))]

    def get(self, step: int) -> Step:
        """Step `step`'s host buffers, read; the steps after it up to the prefetch depth are being read."""
        while self.next < min(step + len(self.slots), self.steps.stop):
            self._schedule(self.next)
            self.next += 1
        slot = self.slots[step % len(self.slots)]
        if slot.step != step:
            raise RuntimeError(f"loader asked for step {step} out of order (slot holds {slot.step})")
        for f in slot.pending:
            f.result()  # re-raises a reader's error (a damaged shard, ...) here
        return Step(slot, self.device)

    def close(self) -> None:
        for slot in self.slots:
            for f in slot.pending:
                f.cancel()
        self.pool.shutdown(wait=True)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Step:
    """One read step: its micro-batches, copied to the device and decoded there."""

    def __init__(self, slot: Slot, device: torch.device):
        self.slot, self.device = slot, device

    def __len__(self) -> int:
        return len(self.slot.tokens)

    def micro(self, start: int, size: int) -> Micro:
        at, dev = slice(start, start + size), self.device
        tokens = self.slot.tokens[at].to(dev, non_blocking=True).long()
        out = Micro(tokens)
        if "topk" in self.slot.arrays:
            ids, values = (t[at].to(dev, non_blocking=True) for t in self.slot.arrays["topk"])
            out.topk_idx_BxLxK, out.topk_val_BxLxK = decode_topk(ids, values)
        if "hidden" in self.slot.arrays:
            out.hidden_BxLxD = decode_hidden(*(t[at].to(dev, non_blocking=True) for t in self.slot.arrays["hidden"]))
        if self.slot.copied is not None:
            self.slot.copied.record()
        return out


def _runs(lo: int, hi: int, rows: int) -> list[tuple[int, int, int]]:
    """Global positions [lo, hi) as runs (start, stop, first row) of consecutive rows: a run ends at the end
    of an epoch, where the order starts again at row 0."""
    out = []
    while lo < hi:
        row = lo % rows
        stop = min(hi, lo + rows - row)
        out.append((lo, stop, row))
        lo = stop
    return out
