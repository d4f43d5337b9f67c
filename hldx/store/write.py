"""Building a teacher cache: the shards its extents need and it lacks, from any teacher function; resumable,
shared by concurrent workers across processes and nodes (a file lock per block of rows avoids duplicate work;
correctness does not depend on it), and grown by adding shards when a job needs more rows (hldx.store.shards)."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from hldx.progress import Progress

from hldx.store.shards import (check_shard, claim, open_tmp, publish, published, reach, shard_name, unfinished,
                               writer_gone)
from hldx.store.spec import (CacheSpec, as_bytes, encode, fields, offsets, part_kind, part_layer, row_digests,
                             shard_ranges)

# teacher_fn(tokens [n, L] long, parts) -> {part: its outputs} for each part asked for, on any device: top-k (ids
# [n, L, K], logits [n, L, K]); sampled (all logits [n, L, V],); a hidden part (the states after its layer
# [n, L, D],). row_tokens_fn(rows [n] int64) -> tokens [n, L].
TeacherFn = Callable[[torch.Tensor, tuple[str, ...]], dict[str, tuple[torch.Tensor, ...]]]
RowTokensFn = Callable[[np.ndarray], torch.Tensor]
log = logging.getLogger(__name__)


def built_extent(root: Path, spec: CacheSpec, part: str) -> int:
    """How many leading rows of a part the published shards cover."""
    return reach(published(root, part), 0)[0]


def task_shards(spec: CacheSpec, task: int, tasks: int) -> range:
    """Shard indices that worker `task` of `tasks` builds (cache.task, cache.tasks): a block of whole shards."""
    if not 0 <= task < tasks:
        raise ValueError(f"cache.task={task} must lie in [0, cache.tasks={tasks})")
    n = max((len(shard_ranges(spec, p)) for p in spec.extents), default=0)
    return range(n * task // tasks, n * (task + 1) // tasks)


def _teacher(spec: CacheSpec, teacher_fn: TeacherFn, tokens_NxL: torch.Tensor, parts: tuple[str, ...]
             ) -> dict[str, tuple[torch.Tensor, ...]]:
    """The teacher's outputs for `parts`, each checked against what its kind stores."""
    with torch.inference_mode():
        out = teacher_fn(tokens_NxL, parts)
    n = len(tokens_NxL)
    for part in parts:
        got = out.get(part)
        if part_kind(part) == "topk":
            want = (n, spec.seq_len, spec.k)
            if got is None or [tuple(t.shape) for t in got] != [want, want]:
                shapes = None if got is None else tuple(tuple(t.shape) for t in got)
                raise ValueError(f"teacher_fn returned top-k ids and logits {shapes}; expected {want} "
                                 f"(rows, seq_len, k)")
            idx, val = got
            if idx.min() < 0 or idx.max() >= spec.vocab_size:
                raise ValueError(f"teacher_fn returned top-k ids outside [0, {spec.vocab_size})")
            if not torch.isfinite(val).all():
                raise ValueError("teacher_fn returned non-finite top-k logits")
        elif part_kind(part) == "sampled":
            want = (n, spec.seq_len, spec.vocab_size)
            if got is None or [tuple(t.shape) for t in got] != [want]:
                shapes = None if got is None else tuple(tuple(t.shape) for t in got)
                raise ValueError(f"teacher_fn returned logits {shapes}; expected ({want},) (rows, seq_len, vocab)")
            if not torch.isfinite(got[0]).all():
                raise ValueError("teacher_fn returned non-finite logits")
        else:
            want, what = (n, spec.seq_len, spec.hidden_size), f"hidden states after layer {part_layer(spec, part)}"
            if got is None or [tuple(t.shape) for t in got] != [want]:
                shapes = None if got is None else tuple(tuple(t.shape) for t in got)
                raise ValueError(f"teacher_fn returned {what} {shapes}; expected ({want},) (rows, seq_len, d_T)")
            if not torch.isfinite(got[0]).all():
                raise ValueError(f"teacher_fn returned non-finite {what}")
    return out


class _Shard:
    """One shard being written: a file only its writer knows, filled at any row by a background thread, then
    flushed, checksummed and published."""

    def __init__(self, root: Path, spec: CacheSpec, part: str, r: range):
        self.root, self.spec, self.part, self.r = root, spec, part, r
        self.final = root / f"{shard_name(part, r)}.bin"
        self.fd: int | None
        self.fd, self.tmp = open_tmp(self.final)
        self.sums = np.empty((len(r), len(fields(spec, part))), dtype="<u8")
        self.at, self.table = offsets(spec, part, len(r))

    def write(self, first: int, arrays: list[torch.Tensor]) -> None:
        """Rows [first, first + n) of each array (CPU tensors [n, ...]): their checksums, then their bytes."""
        for i, (f, t) in enumerate(zip(fields(self.spec, self.part), arrays)):
            data = as_bytes(t)
            self.sums[first - self.r.start:first - self.r.start + len(data), i] = row_digests(data)
            os.pwrite(self.fd, memoryview(data).cast("B"), self.at[i] + (first - self.r.start) * f.row_bytes)

    def publish(self) -> None:
        os.pwrite(self.fd, self.sums.tobytes(), self.table)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        if self.final.exists() and check_shard(self.root, self.spec, self.part, self.r):  # damaged: set aside
            self.final.rename(self.final.with_name(f"{self.final.name}.damaged-{os.getpid()}"))
        publish(self.tmp, self.final)

    def abandon(self) -> None:
        """Drop an unpublished shard (an error or an interrupt: nothing of it was published)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


def _write_shards(root: Path, spec: CacheSpec, todo: dict[str, range], teacher_fn: TeacherFn,
                  row_tokens_fn: RowTokensFn, batch_rows: int, bar: Progress) -> None:
    """Write the shards of `todo` (part -> rows) with one teacher pass over their rows: the teacher runs and
    encodes on its device while a background thread checksums and writes the previous batch."""
    start, stop = min(r.start for r in todo.values()), max(r.stop for r in todo.values())
    shards = {part: _Shard(root, spec, part, r) for part, r in todo.items()}
    pending: list[Future] = []
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="hldx-cache-writer") as writer:
            for a in range(start, stop, batch_rows):
                rows = np.arange(a, min(a + batch_rows, stop))
                tokens_NxL = row_tokens_fn(rows)
                if tuple(tokens_NxL.shape) != (len(rows), spec.seq_len) or tokens_NxL.is_floating_point():
                    raise ValueError(f"row_tokens_fn returned {tokens_NxL.dtype} {tuple(tokens_NxL.shape)}; "
                                     f"expected integer token ids of shape ({len(rows)}, {spec.seq_len})")
                want = {part: r for part, r in todo.items() if r.start <= rows[-1] and rows[0] < r.stop}
                outputs = _teacher(spec, teacher_fn, tokens_NxL.long(), tuple(want))
                for part, r in want.items():
                    lo, hi = max(r.start, a) - a, min(r.stop, a + len(rows)) - a
                    arrays = encode(spec, part, tuple(t[lo:hi] for t in outputs[part]), a + lo)
                    pending.append(writer.submit(shards[part].write, a + lo, [t.cpu() for t in arrays]))
                bar.update(len(rows) * spec.seq_len)
                while len(pending) > 2 * len(todo):  # bounded: the teacher runs at most a batch ahead
                    pending.pop(0).result()
            for future in pending:
                future.result()
        for shard in shards.values():
            shard.publish()
    except BaseException:
        for shard in shards.values():
            shard.abandon()
        raise


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """A lock that keeps two workers from computing one block twice, where the file system has file locks
    (Lustre mounted without -o flock has none): correctness never depends on it."""
    lock = FileLock(path)
    try:
        lock.acquire()
    except (OSError, NotImplementedError) as err:
        log.warning("no file lock on %s (%s): workers may compute a block twice; the cache stays correct",
                    path.parent, err)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def build(spec: CacheSpec, out_dir: str | os.PathLike, teacher_fn: TeacherFn, row_tokens_fn: RowTokensFn,
          shards: range | None = None, *, batch_rows: int = 8, progress: bool = True) -> bool:
    """Build what the spec's extents need of blocks `shards` (indices of rows_per_shard rows; default all) and
    the cache lacks; return whether every part's extent is complete. A part it does not name (another layer's)
    is neither read nor written: adding a layer to a cache leaves the others' shards as they are. Missing rows of a block are written as one new
    shard beside those that exist (which are never changed); a killed build leaves only a temporary file and
    resumes at the first missing row. Workers may build overlapping blocks at once: each block is built under
    a lock of its own, so each is normally computed once."""
    if batch_rows < 1:
        raise ValueError(f"cache.batch_rows={batch_rows} must be positive")
    root = Path(out_dir)
    claim(root, spec)
    (root / "locks").mkdir(exist_ok=True)
    for path in unfinished(root, spec):  # the leftovers of this host's killed builds
        if writer_gone(path, older_than_s=float("inf")):
            path.unlink(missing_ok=True)
    layout = {part: shard_ranges(spec, part) for part in spec.extents}
    indices = range(max(map(len, layout.values()), default=0)) if shards is None else shards
    sound = {p: [r for r in published(root, p) if check_shard(root, spec, p, r) is None] for p in layout}

    def missing(i: int) -> dict[str, range]:
        need = {}
        for p in layout:
            if i < len(layout[p]):
                block = layout[p][i]
                have = reach(sound[p], block.start)[0]
                if have < block.stop:
                    need[p] = range(have, block.stop)
        return need

    todo = {i: need for i in indices if (need := missing(i))}
    total = sum(max(len(r) for r in need.values()) for need in todo.values()) * spec.seq_len
    with Progress(total=total, unit="tok", unit_scale=True, desc=f"teacher cache {root.name}", disable=not progress,
                  mininterval=5) as bar:
        for i, need in todo.items():
            with _lock(root / "locks" / f"shard-{i}.lock"):
                # Another worker may have written exactly these shards meanwhile.
                need = {p: r for p, r in need.items() if check_shard(root, spec, p, r) is not None}
                if need:
                    _write_shards(root, spec, need, teacher_fn, row_tokens_fn, batch_rows, bar)
    return all(built_extent(root, spec, p) >= spec.extent(p) for p in layout)  # other workers' shards included
