"""The data path: each step's tokens and teacher outputs, read ahead of the step it feeds.

A step's rows are a pure function of the step (hldx.order.Batches), so while step s computes, threads read
steps s+1..s+P (cache.prefetch) from the training rows and the teacher cache straight into host buffers,
page-locked on a GPU. The cache.readers threads read whole steps, several at once (keep cache.prefetch >=
cache.readers): reading files and hashing them release the GIL, so readers scale with cores.

On a GPU a step's host-to-device copies run on a side stream of their own, issued when the step is handed
out and, once read, when the step before it is: they overlap the compute queued before them. The compute
stream waits on them (an event), its micro-batches decode the stored values (bfloat16, float8, ...) on the
device, and a host buffer is refilled only once the copies out of it are done (the same event). The reader
threads set the rank's device first. Nothing waits but a step whose rows are not read yet.

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

from hldx.order import Batches
from hldx.store import CacheReader, decode, part_kind, part_layer


@dataclass
class Micro:
    """One micro-batch on the device: tokens [m, L] long and what the phase reads of the teacher."""

    tokens_BxL: Tensor
    topk_idx_BxLxK: Tensor | None = None     # the teacher's top-k ids (a sampled cache: its drawn ids)
    topk_val_BxLxK: Tensor | None = None     # their logits minus each position's largest, float32
    hidden: dict[int, Tensor] = field(default_factory=dict)   # teacher layer -> its states [m, L, D] float32
    lse_BxLxT: Tensor | None = None          # a sampled cache: the log-normalisers at its taus, float32


@dataclass
class Slot:
    """Host buffers for one step of one rank."""

    tokens: Tensor                                    # [b, L] int32
    arrays: dict[str, list[Tensor]]                   # part -> its stored arrays [b, ...]
    copied: torch.cuda.Event | None = None            # recorded on the copy stream after the copies out of these
    step: int = -1
    pending: list[Future] = field(default_factory=list)
    on_device: tuple[Tensor, dict[str, list[Tensor]]] | None = None   # the copies, once issued


class Loader:
    """Steps `steps` of `batches` (this rank's rows) with the cache `parts` (its logits, a hidden part per teacher
    layer) the phase reads, `prefetch` steps ahead, by `readers` threads; `get(step)` in increasing order. `pin`:
    into page-locked buffers (default: on a GPU), as for copies to one."""

    def __init__(self, batches: Batches, reader: CacheReader | None, parts: Iterable[str], steps: range,
                 device: torch.device, prefetch: int = 2, readers: int = 2, pin: bool | None = None):
        self.batches, self.reader, self.parts = batches, reader, tuple(parts)
        if self.parts and reader is None:
            raise ValueError(f"parts {self.parts} need a cache reader")
        cuda = device.type == "cuda"
        if cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.steps, self.device, self.readers = steps, device, max(1, readers)
        b, L, pin = batches.per_rank, batches.tokens_RxL.shape[1], cuda if pin is None else pin
        self.slots = [Slot(torch.empty((b, L), dtype=torch.int32, pin_memory=pin),
                           {p: reader.buffers(p, b, pin=pin) for p in self.parts},
                           torch.cuda.Event() if cuda else None) for _ in range(max(1, prefetch) + 1)]
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.pool = ThreadPoolExecutor(self.readers, thread_name_prefix="hldx-loader",
                                       initializer=torch.cuda.set_device if cuda else None,
                                       initargs=(device,) if cuda else ())
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
        """Step `step`'s buffers, read (on a GPU: copied, the compute stream waiting on the copies); the steps
        after it up to the prefetch depth are being read, the next one's copies issued if it is."""
        while self.next < min(step + len(self.slots), self.steps.stop):
            self._schedule(self.next)
            self.next += 1
        slot = self.slots[step % len(self.slots)]
        if slot.step != step:
            raise RuntimeError(f"loader asked for step {step} out of order (slot holds {slot.step})")
        for f in slot.pending:
            f.result()  # re-raises a reader's error (a damaged shard, ...) here
        if self.copy_stream is None:
            return Step(slot.tokens, slot.arrays, self.reader)
        self._copy(slot)
        tokens, arrays = slot.on_device
        slot.on_device = None
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(slot.copied)
        for t in [tokens, *(t for ts in arrays.values() for t in ts)]:
            t.record_stream(compute)  # allocated on the copy stream, freed only after compute is done with it
        after = self.slots[(step + 1) % len(self.slots)]
        if after.step == step + 1 and all(f.done() and f.exception() is None for f in after.pending):
            self._copy(after)
        return Step(tokens, arrays, self.reader)

    def _copy(self, slot: Slot) -> None:
        """Issue the copies of a read slot to the device on the copy stream, once; record slot.copied after."""
        if slot.on_device is not None:
            return
        with torch.cuda.stream(self.copy_stream):
            slot.on_device = (slot.tokens.to(self.device, non_blocking=True),
                              {p: [t.to(self.device, non_blocking=True) for t in ts] for p, ts in slot.arrays.items()})
            slot.copied.record(self.copy_stream)

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
    """One read step, on the device: its micro-batches, decoded there."""

    def __init__(self, tokens: Tensor, arrays: dict[str, list[Tensor]], reader: CacheReader | None = None):
        self.tokens, self.arrays = tokens, arrays   # [b, L] int32; part -> its stored arrays [b, ...]
        self.layers = {part: part_layer(reader.spec, part) for part in arrays if part_kind(part) == "hidden"}

    def __len__(self) -> int:
        return len(self.tokens)

    def micro(self, start: int, size: int) -> Micro:
        """Rows [start, start + size) of each part, decoded into the Micro's field for its kind."""
        at = slice(start, start + size)
        out = Micro(self.tokens[at].long())
        for part, arrays in self.arrays.items():
            decoded = decode(part, [t[at] for t in arrays])
            if part_kind(part) == "hidden":
                out.hidden[self.layers[part]] = decoded
            elif part_kind(part) == "topk":
                out.topk_idx_BxLxK, out.topk_val_BxLxK = decoded
            elif part_kind(part) == "sampled":
                out.topk_idx_BxLxK, out.topk_val_BxLxK, out.lse_BxLxT = decoded
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
