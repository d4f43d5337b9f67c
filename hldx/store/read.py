"""Reading a teacher cache: memory-mapped, checksummed rows for the trainer; verifying a whole cache."""
from __future__ import annotations

import os
import queue
import threading
import zlib
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hldx.store.spec import (FORMAT, HIDDEN_IDENTITY, IDENTITY, CacheError, CacheSpec, check_shard, diff,
                             hidden_in, layout, read_json, shard_name, shard_ranges, shard_record, spec_of)

Batch = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

def _decode(b_NxB: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored bytes [n, bytes] as a float32 tensor of `shape`."""
    if dtype == "bfloat16":
        bits = b_NxB.view("<i2").astype(np.int16).reshape(shape)
        return torch.from_numpy(bits).view(torch.bfloat16).float()
    return torch.from_numpy(b_NxB.view("<f4").astype(np.float32).reshape(shape))


class CacheReader:
    """Rows of a complete cache: get() reads them (memory-mapped, CRC-checked); iter() reads batches
    ahead of the trainer in a background thread."""

    def __init__(self, root: Path, spec: CacheSpec, prefetch: int = 4):
        if prefetch < 1:
            raise ValueError(f"cache.prefetch={prefetch} must be positive")
        self.root, self.spec, self.prefetch = root, spec, prefetch
        self._lay = layout(spec)
        self._maps = lru_cache(maxsize=256)(self._map)  # bounded: a paper-scale cache has ~10^5 shards

    def _range(self, shard: int) -> range:
        step = self.spec.rows_per_shard
        return range(shard * step, min((shard + 1) * step, self.spec.rows))

    def _map(self, shard: int) -> tuple[np.memmap | None, np.memmap | None, int]:
        """Shard as (records with hidden [nh, full bytes], records without [n - nh, topk bytes], nh)."""
        r = self._range(shard)
        path, nh, lay = self.root / (shard_name(r) + ".bin"), hidden_in(self.spec, r), self._lay
        full = np.memmap(path, np.uint8, "r", 0, (nh, lay.full)) if nh else None
        rest = np.memmap(path, np.uint8, "r", nh * lay.full, (len(r) - nh, lay.topk)) if len(r) > nh else None
        return full, rest, nh

    def require_hidden(self, rows: np.ndarray) -> None:
        """Fail unless every row of `rows` kept its hidden state, saying how many tokens are missing."""
        missing = int((np.unique(np.asarray(rows, np.int64)) >= self.spec.hidden_rows).sum())
        if missing:
            raise CacheError(
                f"teacher cache {self.root} holds hidden states for rows [0, {self.spec.hidden_rows}) only: "
                f"{missing} requested rows ({missing * self.spec.seq_len} tokens) are missing; build a cache "
                f"with a larger cache.hidden_rows (all, or N covering them)")

    def _check(self, recs_NxB: np.ndarray, rows: np.ndarray, what: str) -> None:
        bad = [i for i, rec in enumerate(recs_NxB)
               if zlib.crc32(rec[:-4]) != int.from_bytes(rec[-4:].tobytes(), "little")]
        if bad:
            step = self.spec.rows_per_shard
            files = sorted({shard_name(self._range(int(row) // step)) + ".bin" for row in rows[bad]})
            raise CacheError(
                f"teacher cache {self.root}: {what} of rows {rows[bad][:8].tolist()} fail their checksum in "
                f"{', '.join(files)}: the shard is damaged; run `python -m hldx.cache verify dir={self.root}`, "
                f"delete the shards it names and build again")

    def get(self, rows: np.ndarray, *, topk: bool = True, hidden: bool = False) -> Batch:
        """Teacher outputs for `rows` [n]: top-k ids [n, L, K] long and logits [n, L, K] float32 (None
        unless topk), hidden states [n, L, D] float32 (None unless hidden)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        spec, lay, n = self.spec, self._lay, len(rows)
        if n and (rows.min() < 0 or rows.max() >= spec.rows):
            raise IndexError(f"rows {rows.min()}..{rows.max()} requested; "
                             f"the teacher cache holds rows [0, {spec.rows})")
        if hidden:
            self.require_hidden(rows)
        topk_NxB = np.empty((n, lay.topk), np.uint8) if topk else None
        hid_NxB = np.empty((n, lay.full - lay.topk), np.uint8) if hidden else None
        shard_of = rows // spec.rows_per_shard
        for shard in np.unique(shard_of):
            at = np.flatnonzero(shard_of == shard)
            local = rows[at] - int(shard) * spec.rows_per_shard
            full, rest, nh = self._maps(int(shard))
            kept = local < nh
            if topk:
                if kept.any():
                    topk_NxB[at[kept]] = full[local[kept], : lay.topk]
                if not kept.all():
                    topk_NxB[at[~kept]] = rest[local[~kept] - nh]
            if hidden:
                hid_NxB[at] = full[local, lay.topk:]
        idx = val = hid = None
        L, K = spec.seq_len, spec.k
        if topk:
            self._check(topk_NxB, rows, "top-k logits")
            ids = topk_NxB[:, : lay.idx].view(spec.index_dtype).astype(np.int64).reshape(n, L, K)
            idx, val = torch.from_numpy(ids), _decode(topk_NxB[:, lay.idx : lay.val], spec.values_dtype, (n, L, K))
        if hidden:
            self._check(hid_NxB, rows, "hidden states")
            hid = _decode(hid_NxB[:, :-4], spec.hidden_dtype, (n, L, spec.hidden_size))
        return idx, val, hid

    def iter(self, batches: Iterable[np.ndarray], *, topk: bool = True, hidden: bool = False) -> Iterator[Batch]:
        """get() of each row batch of `batches`, read up to `prefetch` batches ahead in a background thread."""
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop, done = threading.Event(), object()

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def work() -> None:
            try:
                for rows in batches:
                    if not put(self.get(rows, topk=topk, hidden=hidden)):
                        return
                put(done)
            except BaseException as err:  # handed to the consumer, raised there
                put(err)

        thread = threading.Thread(target=work, name="hldx-cache-prefetch", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


def _load(root: Path) -> tuple[CacheSpec, list[dict | None], bool]:
    """Spec and shard records of the cache at root, and whether it is complete (has its manifest);
    a build in progress has spec.json and the records of the shards done so far."""
    manifest = read_json(root / "manifest.json")
    if manifest is None:
        raw = read_json(root / "spec.json")
        if raw is None:
            raise CacheError(f"{root}: no teacher cache here (neither manifest.json nor spec.json); "
                             f"build one with `python -m hldx.cache build ...`")
        spec = spec_of(raw, root / "spec.json")
        return spec, [read_json(root / (shard_name(r) + ".json")) for r in shard_ranges(spec)], False
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{root / 'manifest.json'}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    spec = spec_of(manifest["spec"], root / "manifest.json")
    if len(manifest["shards"]) != len(shard_ranges(spec)):
        raise CacheError(f"{root / 'manifest.json'}: lists {len(manifest['shards'])} shards, "
                         f"its spec needs {len(shard_ranges(spec))}")
    return spec, manifest["shards"], True


def open_cache(out_dir: str | os.PathLike, expected: CacheSpec, *, prefetch: int = 4) -> CacheReader:
    """Open a complete cache for a run that expects `expected`: refuse one built for another teacher,
    tokenizer, data, k, dtypes or (when the run needs them, expected.hidden_rows > 0) hidden layer,
    naming each difference; refuse one with fewer rows or hidden rows than expected, saying how many
    tokens are missing; check every shard's size (each record's CRC is checked as it is read)."""
    root = Path(out_dir)
    spec, entries, complete = _load(root)
    if not complete:
        raise CacheError(f"the teacher cache at {root} is incomplete (manifest.json missing): finish its "
                         f"build; `python -m hldx.cache verify dir={root}` lists the missing shards")
    problems = diff(spec, expected, IDENTITY + (HIDDEN_IDENTITY if expected.hidden_rows else ()))
    if problems:
        raise CacheError(f"teacher cache {root} was built for something else: {'; '.join(problems)}. "
                         f"Point cache.dir at a matching cache (null: the content-addressed one) or build it")
    for what, have, want in (("rows", spec.rows, expected.rows),
                             ("hidden states for rows", spec.hidden_rows, expected.hidden_rows)):
        if want > have:
            raise CacheError(f"teacher cache {root} holds {what} [0, {have}) but the run needs [0, {want}): "
                             f"{(want - have) * spec.seq_len} tokens missing; build a cache that covers them")
    problems = [p for r, e in zip(shard_ranges(spec), entries) if (p := check_shard(root, spec, r, e, full=False))]
    if problems:
        raise CacheError(f"teacher cache {root} is damaged: {'; '.join(problems)}. Run `python -m hldx.cache "
                         f"verify dir={root}`, delete the shards it names and build again")
    return CacheReader(root, spec, prefetch)



def verify(out_dir: str | os.PathLike, *, progress: bool = True) -> list[str]:
    """Everything wrong with the cache at out_dir, one line per bad shard (empty: the cache is whole)."""
    root = Path(out_dir)
    try:
        spec, entries, complete = _load(root)
    except CacheError as err:
        return [str(err)]
    problems = [] if complete else [f"{root / 'manifest.json'}: missing, the build is incomplete "
                                    f"({sum(e is not None for e in entries)} of {len(entries)} shards done)"]
    ranges = shard_ranges(spec)
    with tqdm(total=sum(shard_record(spec, r)["bytes"] for r in ranges), unit="B", unit_scale=True,
              desc=f"verify {root.name}", disable=not progress) as bar:
        for r, entry in zip(ranges, entries):
            if (why := check_shard(root, spec, r, entry, full=True, bar=bar)) is not None:
                problems.append(why)
    return problems
