"""Building a teacher cache: the shards its extents need and it lacks, from any teacher function; resumable,
shared by concurrent workers (a file lock per shard), and grown in place when a job needs more rows."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from hldx.progress import Progress

from hldx.store.spec import (FORMAT, PARTS, CacheError, CacheSpec, as_bytes, built_shards, covering, diff,
                             encode_hidden, encode_topk, fields, load_spec, offsets, row_digests, shard_name,
                             shard_ranges, write_json)

# teacher_fn(tokens [n, L] long, topk, hidden) -> (top-k ids [n, L, K], top-k logits [n, L, K], hidden [n, L, D]);
# a part not asked for may be None. row_tokens_fn(rows [n] int64) -> tokens [n, L].
TeacherFn = Callable[[torch.Tensor, bool, bool], tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]
RowTokensFn = Callable[[np.ndarray], torch.Tensor]
log = logging.getLogger(__name__)


def built_extent(root: Path, spec: CacheSpec, part: str) -> int:
    """How many leading rows of a part the shards on disk cover."""
    chain = built_shards(root, spec, part)
    return chain[-1].stop if chain else 0


def task_shards(spec: CacheSpec, task: int, tasks: int) -> range:
    """Shard indices that worker `task` of `tasks` builds (cache.task, cache.tasks): a block of whole shards."""
    if not 0 <= task < tasks:
        raise ValueError(f"cache.task={task} must lie in [0, cache.tasks={tasks})")
    n = max(len(shard_ranges(spec, p)) for p in PARTS)
    return range(n * task // tasks, n * (task + 1) // tasks)


def _claim(root: Path, spec: CacheSpec) -> None:
    """Record the spec's identity in a new cache directory, or check that the directory holds this one."""
    if (root / "spec.json").exists():
        if problems := diff(load_spec(root), spec):
            raise CacheError(f"{root} holds a cache built with another spec ({'; '.join(problems)}): "
                             f"choose another cache.dir or delete {root}")
        return
    write_json(root / "spec.json", {"format": FORMAT, **dataclasses.replace(spec, rows=0, hidden_rows=0).identity()})


def _teacher(spec: CacheSpec, teacher_fn: TeacherFn, tokens_NxL: torch.Tensor, topk: bool, hidden: bool):
    with torch.inference_mode():
        idx, val, hid = teacher_fn(tokens_NxL, topk, hidden)
    n = len(tokens_NxL)
    if topk:
        want = (n, spec.seq_len, spec.k)
        if idx is None or val is None or tuple(idx.shape) != want or tuple(val.shape) != want:
            got = None if idx is None or val is None else (tuple(idx.shape), tuple(val.shape))
            raise ValueError(f"teacher_fn returned top-k ids and logits {got}; expected {want} (rows, seq_len, k)")
        if idx.min() < 0 or idx.max() >= spec.vocab_size:
            raise ValueError(f"teacher_fn returned top-k ids outside [0, {spec.vocab_size})")
        if not torch.isfinite(val).all():
            raise ValueError("teacher_fn returned non-finite top-k logits")
    if hidden:
        want = (n, spec.seq_len, spec.hidden_size)
        if hid is None or tuple(hid.shape) != want:
            raise ValueError(f"teacher_fn returned hidden states {None if hid is None else tuple(hid.shape)}; "
                             f"expected {want} (rows, seq_len, d_T)")
        if not torch.isfinite(hid).all():
            raise ValueError("teacher_fn returned non-finite hidden states")
    return idx, val, hid


def _write_shards(root: Path, spec: CacheSpec, todo: dict[str, range], teacher_fn: TeacherFn,
                  row_tokens_fn: RowTokensFn, batch_rows: int, bar: Progress) -> None:
    """Write the shards of `todo` (part -> rows, all starting at the same row) with one teacher pass."""
    start, stop = min(r.start for r in todo.values()), max(r.stop for r in todo.values())
    files, sums = {}, {}
    try:
        for part, r in todo.items():
            tmp = root / f"{shard_name(part, r)}.bin.tmp"
            files[part] = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            sums[part] = np.empty((len(r), len(fields(spec, part))), dtype="<u8")
        for a in range(start, stop, batch_rows):
            rows = np.arange(a, min(a + batch_rows, stop))
            tokens_NxL = row_tokens_fn(rows)
            if tuple(tokens_NxL.shape) != (len(rows), spec.seq_len) or tokens_NxL.is_floating_point():
                raise ValueError(f"row_tokens_fn returned {tokens_NxL.dtype} {tuple(tokens_NxL.shape)}; "
                                 f"expected integer token ids of shape ({len(rows)}, {spec.seq_len})")
            want = {part: r for part, r in todo.items() if rows[0] < r.stop}
            idx, val, hid = _teacher(spec, teacher_fn, tokens_NxL.long(), "topk" in want, "hidden" in want)
            bar.update(len(rows) * spec.seq_len)
            for part, r in want.items():
                n = min(len(rows), r.stop - rows[0])
                arrays = encode_topk(spec, idx[:n], val[:n]) if part == "topk" else encode_hidden(spec, hid[:n], int(rows[0]))
                at, _ = offsets(spec, part, len(r))
                for i, (f, t) in enumerate(zip(fields(spec, part), arrays)):
                    data = as_bytes(t.cpu())
                    sums[part][rows[0] - r.start:rows[0] - r.start + n, i] = row_digests(data)
                    os.pwrite(files[part], memoryview(data).cast("B"), at[i] + (rows[0] - r.start) * f.row_bytes)
        for part, r in todo.items():
            _, table = offsets(spec, part, len(r))
            os.pwrite(files[part], sums[part].tobytes(), table)
            os.fsync(files[part])
    finally:
        for fd in files.values():
            os.close(fd)
    for part, r in todo.items():
        name = shard_name(part, r)
        os.replace(root / f"{name}.bin.tmp", root / f"{name}.bin")
        write_json(root / f"{name}.json", {"start_row": r.start, "end_row": r.stop,
                                           "bytes": (root / f"{name}.bin").stat().st_size})


def _drop_superseded(root: Path, part: str, r: range) -> None:
    """Remove a shorter last shard of an earlier extent that shard `r` now covers."""
    for path in (root / part).glob(f"{r.start:010d}-*.json"):
        stop = int(path.stem.partition("-")[2])
        if stop < r.stop:
            path.unlink(missing_ok=True)
            path.with_suffix(".bin").unlink(missing_ok=True)


def build(spec: CacheSpec, out_dir: str | os.PathLike, teacher_fn: TeacherFn, row_tokens_fn: RowTokensFn,
          shards: range | None = None, *, batch_rows: int = 8, progress: bool = True) -> bool:
    """Build what the spec's extents need of shards `shards` (indices; default all) and the cache lacks;
    return whether both extents are complete. A killed build resumes at its first missing shard (a shard is
    written to a temporary name, then renamed, then recorded). Workers may build overlapping shards at once:
    each shard index is built under a lock of its own."""
    if batch_rows < 1:
        raise ValueError(f"cache.batch_rows={batch_rows} must be positive")
    root = Path(out_dir)
    for sub in ("locks", *PARTS):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with FileLock(root / "locks" / "cache.lock"):
        _claim(root, spec)
    layout = {part: shard_ranges(spec, part) for part in PARTS}
    indices = range(max(map(len, layout.values()))) if shards is None else shards

    def missing(i: int) -> dict[str, range]:
        return {p: layout[p][i] for p in PARTS if i < len(layout[p]) and covering(root, spec, p, layout[p][i]) is None}

    todo = {i: need for i in indices if (need := missing(i))}
    total = sum(max(len(r) for r in need.values()) for need in todo.values()) * spec.seq_len
    with Progress(total=total, unit="tok", unit_scale=True, desc=f"teacher cache {root.name}", disable=not progress,
              mininterval=5) as bar:
        for i in todo:
            with FileLock(root / "locks" / f"shard-{i}.lock"):
                if need := missing(i):  # another worker may have built it meanwhile
                    _write_shards(root, spec, need, teacher_fn, row_tokens_fn, batch_rows, bar)
                    for part, r in need.items():
                        _drop_superseded(root, part, r)
    return all(built_extent(root, spec, p) >= spec.extent(p) for p in PARTS)
