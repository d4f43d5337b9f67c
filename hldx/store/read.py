"""Reading a teacher cache: rows straight from the shard files into the caller's buffers, each row of each
array checked against its checksum as it is read; opening a cache for a run; verifying a whole cache."""
from __future__ import annotations

import bisect
import dataclasses
import errno
import os
from pathlib import Path

import numpy as np
import torch
from hldx.progress import Progress

from hldx.store.shards import (check_shard, diff, load_spec, parts, published, reach, shard_name, unfinished,
                               writer_gone)
from hldx.store.spec import (CacheError, CacheSpec, as_bytes, decode, fields, offsets, part_layer,
                             row_digests, shard_bytes)

PIECE = 1 << 20  # bytes read (then hashed) at a time


class CacheReader:
    """The shards of a cache that serve its rows from 0 on, in every part it holds, as resolved when it was opened
    (published shards are never changed; one removed since by `python -m hldx.cache gc` is resolved again)."""

    def __init__(self, root: Path, spec: CacheSpec):
        self.root, self.spec = root, spec
        self.resolve()

    def resolve(self) -> None:
        """Which shard serves which rows of each part: (rows, shard) pairs chaining from row 0."""
        self.cover = {part: reach(published(self.root, part), 0)[1]
                      for part in {*parts(self.root, self.spec), *self.spec.extents}}
        self.starts = {part: [rows.start for rows, _ in cover] for part, cover in self.cover.items()}

    def extent(self, part: str) -> int:
        cover = self.cover.get(part)
        return cover[-1][0].stop if cover else 0

    def buffers(self, part: str, n: int, pin: bool = False) -> list[torch.Tensor]:
        """Empty tensors for n rows of each array of a part (page-locked with pin, for fast copies to a GPU)."""
        return [torch.empty((n, *f.shape), dtype=f.dtype, pin_memory=pin) for f in fields(self.spec, part)]

    def read_into(self, part: str, start: int, out: list[torch.Tensor]) -> None:
        """Rows [start, start + n) of a part into `out` (one CPU tensor [n, ...] per array, as buffers()
        makes them), each row checked against its checksum."""
        stop, have = start + len(out[0]), self.extent(part)
        if start < 0 or stop > have:
            what = f"{'top-k' if part == 'topk' else part} logits" if part_layer(self.spec, part) is None else \
                f"hidden states after layer {part_layer(self.spec, part)}"
            raise CacheError(f"teacher cache {self.root} holds {what} for rows [0, {have}): rows [{start}, {stop}) "
                             f"were asked for ({max(0, stop - max(start, have)) * self.spec.seq_len} tokens missing); "
                             f"build a cache that covers them")
        a, i = start, bisect.bisect_right(self.starts[part], start) - 1
        while a < stop:
            rows, shard = self.cover[part][i]
            b = min(stop, rows.stop)
            try:
                self._read_checked(part, shard, a, b, [t[a - start:b - start] for t in out])
            except OSError as err:  # removed by gc since this reader resolved it: another shard serves it
                if err.errno not in (errno.ENOENT, errno.ESTALE):  # ESTALE: removed on another NFS client
                    raise
                self.resolve()
                i = bisect.bisect_right(self.starts[part], a) - 1
                if i < 0 or self.cover[part][i][1] == shard or self.cover[part][i][0].stop <= a:
                    raise CacheError(f"teacher cache {self.root}: {shard_name(part, shard)}.bin was removed and no "
                                     f"other shard holds row {a}; build the cache again") from None
                continue
            a, i = b, i + 1

    def _read_shard(self, part: str, r: range, a: int, b: int, out: list[torch.Tensor]) -> str | None:
        """Rows [a, b) of shard r into out; what fails its checksum (None: nothing). Read in pieces of about
        a megabyte, each hashed while it is still in the CPU's cache."""
        at, table = offsets(self.spec, part, len(r))
        part_fields = fields(self.spec, part)
        k = len(part_fields)
        fd = os.open(self.root / f"{shard_name(part, r)}.bin", os.O_RDONLY)
        try:
            want = np.frombuffer(os.pread(fd, (b - a) * k * 8, table + (a - r.start) * k * 8), "<u8").reshape(-1, k)
            for i, (f, t, offset) in enumerate(zip(part_fields, out, at)):
                array, step = as_bytes(t), max(1, PIECE // f.row_bytes)
                for lo in range(0, b - a, step):
                    piece = array[lo:lo + step]
                    os.preadv(fd, [piece], offset + (a - r.start + lo) * f.row_bytes)
                    bad = np.flatnonzero(row_digests(piece) != want[lo:lo + step, i])
                    if len(bad):
                        return f"{f.name} of rows {(bad + a + lo)[:8].tolist()} fail their checksum"
        finally:
            os.close(fd)
        return None

    def _read_checked(self, part: str, r: range, a: int, b: int, out: list[torch.Tensor]) -> None:
        if (bad := self._read_shard(part, r, a, b, out)) is not None:
            raise CacheError(f"teacher cache {self.root}: {bad} in {shard_name(part, r)}.bin: the shard is damaged; "
                             f"run `python -m hldx.cache verify dir={self.root}`, delete the shards it names and "
                             f"build again")

    def get(self, rows: np.ndarray, parts: tuple[str, ...] = ("topk",)) -> dict:
        """Decoded teacher outputs of each of `parts` for any rows [n]: top-k, (ids [n, L, K] long, logits
        relative to each position's largest [n, L, K] float32); sampled, the same of its draws and their
        log-normalisers [n, L, T] float32; a hidden part, its states [n, L, D] float32.
        Runs of consecutive rows are read at once."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        runs = np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []
        out = {}
        for part in parts:
            arrays = self.buffers(part, len(rows))
            for run in runs:
                self.read_into(part, int(rows[run[0]]), [t[run[0]:run[-1] + 1] for t in arrays])
            out[part] = decode(part, arrays)
        return out


def open_cache(out_dir: str | os.PathLike, expected: CacheSpec) -> CacheReader:
    """Open a cache for a run that expects `expected`: refuse one built for another teacher, tokenizer,
    training order, k or dtypes, naming each difference, and one that covers fewer rows of a part than the run
    reads, saying how many tokens are missing; check the size of every shard of its parts."""
    root = Path(out_dir)
    have = load_spec(root)
    if problems := diff(have, expected):
        raise CacheError(f"teacher cache {root} was built for something else: {'; '.join(problems)}. "
                         f"Point cache.dir at a matching cache (null: the content-addressed one) or build it")
    reader = CacheReader(root, expected)
    extents = {part: reader.extent(part) for part in expected.extents}
    for part, have_rows in extents.items():
        if expected.extent(part) > have_rows:
            what = "rows" if part_layer(expected, part) is None else \
                f"hidden states after layer {part_layer(expected, part)} for rows"
            raise CacheError(f"teacher cache {root} holds {what} [0, {have_rows}) but the run needs "
                             f"[0, {expected.extent(part)}): {(expected.extent(part) - have_rows) * expected.seq_len} "
                             f"tokens missing; build a cache that covers them")
    problems = [p for part in extents for _, r in reader.cover[part] if (p := check_shard(root, expected, part, r))]
    if problems:
        raise CacheError(f"teacher cache {root} is damaged: {'; '.join(problems)}. Run `python -m hldx.cache "
                         f"verify dir={root}`, then build again (a damaged shard is set aside and written anew)")
    reader.spec = dataclasses.replace(expected, extents=extents)
    return reader


def verify(out_dir: str | os.PathLike, *, progress: bool = True) -> list[str]:
    """Everything wrong with the cache at out_dir, one line per bad shard (empty: every shard is sound and the
    shards of each part chain from row 0 without a gap): sizes and every row's checksums of the shards a reader
    uses, shards a gap cuts off from row 0, and the leftovers of killed builds."""
    root = Path(out_dir)
    try:
        spec = load_spec(root)
    except CacheError as err:
        return [str(err)]
    reader, problems = CacheReader(root, spec), []
    for part in reader.cover:
        end = reader.extent(part)
        problems += [f"{shard_name(part, r)}.bin: not reachable from row 0 (a gap at row {end} before it: an "
                     f"interrupted build; build again)" for r in published(root, part) if r.stop > end]
    problems += [f"{p.relative_to(root)}: an unfinished write of a killed build (`python -m hldx.cache gc "
                 f"dir={root}` removes it)" for p in unfinished(root, spec) if writer_gone(p, older_than_s=24 * 3600)]
    files = [(part, shard) for part in sorted(reader.cover) for _, shard in reader.cover[part]]
    with Progress(total=sum(shard_bytes(spec, p, len(r)) for p, r in files), unit="B", unit_scale=True,
                  desc=f"verify {root.name}", disable=not progress) as bar:
        for part, r in files:
            if (why := check_shard(root, spec, part, r)) is not None:
                problems.append(why)
                continue
            for a in range(r.start, r.stop, 64):
                out = reader.buffers(part, min(64, r.stop - a))
                if (bad := reader._read_shard(part, r, a, a + len(out[0]), out)) is not None:
                    problems.append(f"{shard_name(part, r)}.bin: {bad}")
                    break
            bar.update(shard_bytes(spec, part, len(r)))
    return problems
