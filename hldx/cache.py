"""Teacher cache: the teacher's top-k logits and mid-layer hidden states per training row, on disk.

Built once per teacher, tokenizer, data slice, k, hidden layer and dtypes; shared by every run of a
sweep. A *row* r is sequence r of the packed stream (tokens[r*L:(r+1)*L], L = seq_len); the cache is
keyed by row and is read back in whatever order the trainer draws rows.

A cache directory holds
    spec.json                      the CacheSpec the directory was started with (a build refuses another)
    shard-<start>-<end>.bin        rows [start, end): rows_per_shard rows, the last shard may be shorter
    shard-<start>-<end>.json       its record {file, start_row, end_row, hidden_rows, bytes, sha256},
                                   written after the shard (which is written to a temporary name first)
    manifest.json                  {"format", "spec", "index_dtype", "bytes_per_token", "shards": [records]},
                                   written once every shard exists
    locks/                         the builders' file locks (empty files)

A shard is a plain little-endian byte file (no pickle; np.memmap reads it): one record per row that
keeps its hidden state (rows < spec.hidden_rows come first), then one record per row that does not.
A record is, in this order:
    idx [L, K]  uint16 (int32 when V > 65536)        the teacher's top-k token ids per position
    val [L, K]  bfloat16 bits (uint16) | float32     their logits, as teacher_fn returned them
    crc         uint32                               zlib.crc32 of idx and val
    hid [L, D]  bfloat16 bits (uint16) | float32     hidden state after the teacher's hidden layer   } rows with
    crc         uint32                               zlib.crc32 of hid                               } hidden only
bfloat16 rounds float32 to nearest even (torch's `.to(torch.bfloat16)`): relative error <= 2**-8.
float32 stores float32 exactly, so a run from such a cache sees bit for bit what the teacher returned.

Storage (bytes_per_token): top-k k*(2 + 2) bytes per token with uint16 ids and bfloat16 logits (512 at
the paper's k=128, V=32000; 768 with float32 logits); hidden states d_T*2 (5,120 at d_T=2560; 10,240 in
float32) for the rows that keep them; plus 4 bytes of CRC per row and part.

Integrity. verify() and a resumed build check every shard's size and sha256. The reader checks every
shard's size when it opens the cache and every record's CRC when it reads the record, so damaged data
is never returned, at a cost proportional to what is read: hashing whole shards on first use would
instead stall the first steps of a randomly ordered epoch until most of the cache had been read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import sys
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

FORMAT = "hldx-teacher-cache/1"
DTYPES = {"bfloat16": 2, "float32": 4}  # storage dtype -> bytes per value
TeacherFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
RowTokensFn = Callable[[np.ndarray], torch.Tensor]
Batch = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
log = logging.getLogger(__name__)


class CacheError(RuntimeError):
    """A cache that cannot serve the request: built for something else, incomplete, or damaged."""


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a cache holds: rows [0, rows) of a stream; rows [0, hidden_rows) also keep the hidden
    state after teacher layer `hidden_layer` (None: no hidden states)."""

    teacher_digest: str
    tokenizer_digest: str
    stream_digest: str
    seq_len: int
    rows: int
    k: int
    vocab_size: int
    hidden_layer: int | None = None
    hidden_size: int = 0
    hidden_rows: int = 0
    values_dtype: str = "bfloat16"
    hidden_dtype: str = "bfloat16"
    rows_per_shard: int = 1024

    def __post_init__(self) -> None:
        for key in ("seq_len", "rows", "k", "vocab_size", "rows_per_shard"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CacheSpec.{key} must be a positive integer, got {value!r}")
        if self.k > self.vocab_size:
            raise ValueError(f"CacheSpec.k={self.k} (method.top_k) exceeds vocab_size={self.vocab_size}")
        for key in ("values_dtype", "hidden_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"cache.{key}={getattr(self, key)!r}: choose one of {sorted(DTYPES)}")
        if self.hidden_layer is None and (self.hidden_size or self.hidden_rows):
            raise ValueError("CacheSpec: hidden_size and hidden_rows must be 0 when hidden_layer is None")
        if self.hidden_layer is not None and self.hidden_size < 1:
            raise ValueError(f"CacheSpec.hidden_size must be positive with a hidden_layer, got {self.hidden_size}")
        if not 0 <= self.hidden_rows <= self.rows:
            raise ValueError(f"cache.hidden_rows={self.hidden_rows} must lie in [0, {self.rows}] (the rows cached)")

    @property
    def digest(self) -> str:
        """Content address of the cache: a hash of every field."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype("<u2" if self.vocab_size <= 65536 else "<i4")


# Fields a run's expected spec must match exactly; the hidden ones only when the run needs hidden states.
IDENTITY = ("teacher_digest", "tokenizer_digest", "stream_digest", "seq_len", "k", "vocab_size", "values_dtype")
HIDDEN_IDENTITY = ("hidden_layer", "hidden_size", "hidden_dtype")


def bytes_per_token(spec: CacheSpec) -> dict[str, int]:
    """Bytes on disk per token: top-k ids and logits, and the hidden state (for rows that keep it).
    Each row adds 4 bytes of CRC per part (4 / seq_len bytes per token)."""
    return {"topk": spec.k * (spec.index_dtype.itemsize + DTYPES[spec.values_dtype]),
            "hidden": spec.hidden_size * DTYPES[spec.hidden_dtype]}


def resolve_hidden_rows(value: int | str, rows: int) -> int:
    """cache.hidden_rows (all | N) as a row count."""
    if value == "all":
        return rows
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= rows:
        return value
    raise ValueError(f"cache.hidden_rows={value!r}: use 'all' or a row count in [0, {rows}]")


def resolve_dir(dir: str | os.PathLike | None, root: str | os.PathLike, spec: CacheSpec) -> Path:
    """cache.dir, or (null) the content-addressed <paths.cache>/teacher_cache/<spec digest>."""
    return Path(dir) if dir else Path(root) / "teacher_cache" / spec.digest


def shard_ranges(spec: CacheSpec) -> list[range]:
    """Row ranges of the shards, in order."""
    step = spec.rows_per_shard
    return [range(start, min(start + step, spec.rows)) for start in range(0, spec.rows, step)]


def task_rows(spec: CacheSpec, task: int, tasks: int) -> range:
    """Rows that worker `task` of `tasks` builds (cache.task, cache.tasks): a block of whole shards."""
    if not 0 <= task < tasks:
        raise ValueError(f"cache.task={task} must lie in [0, cache.tasks={tasks})")
    n, step = len(shard_ranges(spec)), spec.rows_per_shard
    return range(min(n * task // tasks * step, spec.rows), min(n * (task + 1) // tasks * step, spec.rows))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Byte offsets within a record: idx [0, idx), val [idx, val), crc; hid [topk, full - 4), crc."""

    idx: int
    val: int
    topk: int  # bytes of a record without hidden state
    full: int  # bytes of a record with hidden state


def _layout(spec: CacheSpec) -> _Layout:
    per_row = spec.seq_len * spec.k
    idx = per_row * spec.index_dtype.itemsize
    val = idx + per_row * DTYPES[spec.values_dtype]
    hid = spec.seq_len * spec.hidden_size * DTYPES[spec.hidden_dtype]
    return _Layout(idx, val, val + 4, val + 4 + hid + 4)


def _name(r: range) -> str:
    return f"shard-{r.start:010d}-{r.stop:010d}"


def _hidden_in(spec: CacheSpec, r: range) -> int:
    return max(0, min(r.stop, spec.hidden_rows) - r.start)


def _record(spec: CacheSpec, r: range) -> dict:
    """A shard's manifest record, less its sha256."""
    lay, nh = _layout(spec), _hidden_in(spec, r)
    return {"file": _name(r) + ".bin", "start_row": r.start, "end_row": r.stop, "hidden_rows": nh,
            "bytes": nh * lay.full + (len(r) - nh) * lay.topk}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path}: not valid JSON ({err}); delete it and build again") from err


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _spec_of(raw: dict, path: Path) -> CacheSpec:
    try:
        return CacheSpec(**raw)
    except (TypeError, ValueError) as err:
        raise CacheError(f"{path}: not a valid cache spec ({err})") from err


def _sha256(path: Path, bar: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def _check_shard(root: Path, spec: CacheSpec, r: range, entry: dict | None, *, full: bool,
                 bar: tqdm | None = None) -> str | None:
    """What is wrong with shard `r` given its record (None: nothing); full: also compare the sha256."""
    want = _record(spec, r)
    if entry is None:
        return f"{want['file']}: not built"
    if {key: entry.get(key) for key in want} != want:
        return f"{want['file']}: its record {entry} does not match the spec (expected {want})"
    path = root / want["file"]
    if not path.exists():
        return f"{want['file']}: file missing"
    size = path.stat().st_size
    if size != want["bytes"]:
        return f"{want['file']}: {size} bytes instead of {want['bytes']} (truncated or overwritten)"
    if full and _sha256(path, bar) != entry.get("sha256"):
        return f"{want['file']}: sha256 mismatch (the file changed after it was written, e.g. a flipped bit)"
    return None


def _diff(have: CacheSpec, want: CacheSpec, fields: Iterable[str]) -> list[str]:
    return [f"{f}: cache has {getattr(have, f)!r}, expected {getattr(want, f)!r}"
            for f in fields if getattr(have, f) != getattr(want, f)]


# ---------------------------------------------------------------------------------------------- build


def _to_bytes(x_NxM: torch.Tensor, dtype: str) -> np.ndarray:
    """Float tensor [n, ...] as uint8 [n, bytes] in the storage dtype (bfloat16: round to nearest even)."""
    x = x_NxM.detach().cpu()
    if dtype == "bfloat16":
        a = x.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")
    else:
        a = x.to(torch.float32).numpy().astype("<f4")
    return a.reshape(len(a), -1).view(np.uint8)


def _with_crc(parts: list[np.ndarray]) -> np.ndarray:
    """Rows of the concatenated byte parts, each followed by its CRC32."""
    body = np.concatenate(parts, axis=1)
    crc = np.array([zlib.crc32(row) for row in body], dtype="<u4")
    return np.concatenate([body, crc.view(np.uint8).reshape(-1, 4)], axis=1)


def _teacher(spec: CacheSpec, teacher_fn: TeacherFn, tokens_NxL: torch.Tensor,
             need_hidden: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    with torch.inference_mode():
        idx_NxLxK, val_NxLxK, hid_NxLxD = teacher_fn(tokens_NxL)
    want = (len(tokens_NxL), spec.seq_len, spec.k)
    if tuple(idx_NxLxK.shape) != want or tuple(val_NxLxK.shape) != want:
        raise ValueError(f"teacher_fn returned top-k ids {tuple(idx_NxLxK.shape)} and logits "
                         f"{tuple(val_NxLxK.shape)}; expected {want} (rows, seq_len, k)")
    if idx_NxLxK.min() < 0 or idx_NxLxK.max() >= spec.vocab_size:
        raise ValueError(f"teacher_fn returned top-k ids outside [0, {spec.vocab_size})")
    if not torch.isfinite(val_NxLxK).all():
        raise ValueError("teacher_fn returned non-finite top-k logits")
    if need_hidden:
        want = (len(tokens_NxL), spec.seq_len, spec.hidden_size)
        if hid_NxLxD is None or tuple(hid_NxLxD.shape) != want:
            got = None if hid_NxLxD is None else tuple(hid_NxLxD.shape)
            raise ValueError(f"teacher_fn returned hidden states {got}; expected {want} (rows, seq_len, d_T)")
        if not torch.isfinite(hid_NxLxD).all():
            raise ValueError("teacher_fn returned non-finite hidden states")
    return idx_NxLxK, val_NxLxK, hid_NxLxD


def _encode(spec: CacheSpec, rows: np.ndarray, teacher_fn: TeacherFn, row_tokens_fn: RowTokensFn) -> np.ndarray:
    """Records of consecutive `rows` as bytes, in file order."""
    tokens_NxL = row_tokens_fn(rows)
    if tuple(tokens_NxL.shape) != (len(rows), spec.seq_len) or tokens_NxL.is_floating_point():
        raise ValueError(f"row_tokens_fn returned {tokens_NxL.dtype} {tuple(tokens_NxL.shape)}; "
                         f"expected integer token ids of shape ({len(rows)}, {spec.seq_len})")
    nh = int((rows < spec.hidden_rows).sum())  # rows ascend: those with hidden states come first
    idx, val, hid = _teacher(spec, teacher_fn, tokens_NxL.long(), nh > 0)
    ids = idx.cpu().numpy().astype(spec.index_dtype).reshape(len(rows), -1).view(np.uint8)
    topk = _with_crc([ids, _to_bytes(val, spec.values_dtype)])
    parts = [topk[nh:].reshape(-1)]
    if nh:
        full = np.concatenate([topk[:nh], _with_crc([_to_bytes(hid[:nh], spec.hidden_dtype)])], axis=1)
        parts.insert(0, full.reshape(-1))
    return np.concatenate(parts)


def _write_shard(root: Path, spec: CacheSpec, r: range, teacher_fn: TeacherFn, row_tokens_fn: RowTokensFn,
                 batch_rows: int, bar: tqdm) -> None:
    entry = _record(spec, r)
    path = root / entry["file"]
    tmp = path.with_name(path.name + ".tmp")
    (root / (_name(r) + ".json")).unlink(missing_ok=True)
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for start in range(r.start, r.stop, batch_rows):
            rows = np.arange(start, min(start + batch_rows, r.stop))
            data = _encode(spec, rows, teacher_fn, row_tokens_fn)
            f.write(data)
            digest.update(data)
            bar.update(len(rows) * spec.seq_len)
        f.flush()
        os.fsync(f.fileno())
    if tmp.stat().st_size != entry["bytes"]:
        raise RuntimeError(f"{tmp}: wrote {tmp.stat().st_size} bytes, expected {entry['bytes']}")
    os.replace(tmp, path)
    _write_json(root / (_name(r) + ".json"), {**entry, "sha256": digest.hexdigest()})


def _claim(root: Path, spec: CacheSpec) -> None:
    """Record the spec in a new directory, or refuse one started with another spec."""
    path = root / "spec.json"
    raw = _read_json(path)
    if raw is None:
        _write_json(path, dataclasses.asdict(spec))
        return
    problems = _diff(_spec_of(raw, path), spec, (f.name for f in dataclasses.fields(CacheSpec)))
    if problems:
        raise CacheError(f"{root} holds a cache built with another spec ({'; '.join(problems)}): "
                         f"choose another cache.dir or delete {root}")


def _finalize(root: Path, spec: CacheSpec) -> bool:
    """Write manifest.json if every shard has its record; say whether it did."""
    entries = [_read_json(root / (_name(r) + ".json")) for r in shard_ranges(spec)]
    if any(entry is None for entry in entries):
        return False
    _write_json(root / "manifest.json", {"format": FORMAT, "spec": dataclasses.asdict(spec),
                                         "index_dtype": spec.index_dtype.name,
                                         "bytes_per_token": bytes_per_token(spec), "shards": entries})
    return True


def build(spec: CacheSpec, out_dir: str | os.PathLike, teacher_fn: TeacherFn, row_tokens_fn: RowTokensFn,
          rows: range | None = None, *, batch_rows: int = 8, progress: bool = True) -> bool:
    """Build the shards that overlap `rows` (default: all) and are not yet complete; return whether
    the whole cache is complete (its manifest written).

    teacher_fn(tokens [n, L] long) -> (top-k ids [n, L, K], top-k logits [n, L, K], hidden [n, L, D] or
    None); row_tokens_fn(rows [n] int64) -> tokens [n, L]. A killed build resumes at its first shard
    that is not complete and verified (sha256). Workers may build overlapping ranges at the same
    time: each shard is built under its own file lock, and whichever worker completes the last shard
    writes the manifest.
    """
    if batch_rows < 1:
        raise ValueError(f"cache.batch_rows={batch_rows} must be positive")
    root = Path(out_dir)
    (root / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(root / "locks" / "cache.lock"):
        _claim(root, spec)
    rows = range(spec.rows) if rows is None else rows
    mine = [r for r in shard_ranges(spec) if r.start < rows.stop and rows.start < r.stop]

    def problem(r: range) -> str | None:
        return _check_shard(root, spec, r, _read_json(root / (_name(r) + ".json")), full=True)

    todo = []
    for r in tqdm(mine, desc="check built shards", unit="shard", disable=not progress):
        if (why := problem(r)) is not None:
            todo.append(r)
            if (root / (_name(r) + ".json")).exists():
                log.warning("rebuilding %s", why)
    with tqdm(total=sum(len(r) for r in todo) * spec.seq_len, unit="tok", unit_scale=True,
              desc=f"teacher cache {root.name}", disable=not progress) as bar:
        for r in todo:
            with FileLock(root / "locks" / (_name(r) + ".lock")):
                if problem(r) is None:  # another worker built it meanwhile
                    bar.total -= len(r) * spec.seq_len
                    bar.refresh()
                    continue
                _write_shard(root, spec, r, teacher_fn, row_tokens_fn, batch_rows, bar)
    with FileLock(root / "locks" / "cache.lock"):
        return _finalize(root, spec)


# ----------------------------------------------------------------------------------------------- read


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
        self._lay = _layout(spec)
        self._maps = lru_cache(maxsize=256)(self._map)  # bounded: a paper-scale cache has ~10^5 shards

    def _range(self, shard: int) -> range:
        step = self.spec.rows_per_shard
        return range(shard * step, min((shard + 1) * step, self.spec.rows))

    def _map(self, shard: int) -> tuple[np.memmap | None, np.memmap | None, int]:
        """Shard as (records with hidden [nh, full bytes], records without [n - nh, topk bytes], nh)."""
        r = self._range(shard)
        path, nh, lay = self.root / (_name(r) + ".bin"), _hidden_in(self.spec, r), self._lay
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
            files = sorted({_name(self._range(int(row) // step)) + ".bin" for row in rows[bad]})
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
    manifest = _read_json(root / "manifest.json")
    if manifest is None:
        raw = _read_json(root / "spec.json")
        if raw is None:
            raise CacheError(f"{root}: no teacher cache here (neither manifest.json nor spec.json); "
                             f"build one with `python -m hldx.cache build ...`")
        spec = _spec_of(raw, root / "spec.json")
        return spec, [_read_json(root / (_name(r) + ".json")) for r in shard_ranges(spec)], False
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{root / 'manifest.json'}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    spec = _spec_of(manifest["spec"], root / "manifest.json")
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
    problems = _diff(spec, expected, IDENTITY + (HIDDEN_IDENTITY if expected.hidden_rows else ()))
    if problems:
        raise CacheError(f"teacher cache {root} was built for something else: {'; '.join(problems)}. "
                         f"Point cache.dir at a matching cache (null: the content-addressed one) or build it")
    for what, have, want in (("rows", spec.rows, expected.rows),
                             ("hidden states for rows", spec.hidden_rows, expected.hidden_rows)):
        if want > have:
            raise CacheError(f"teacher cache {root} holds {what} [0, {have}) but the run needs [0, {want}): "
                             f"{(want - have) * spec.seq_len} tokens missing; build a cache that covers them")
    problems = [p for r, e in zip(shard_ranges(spec), entries) if (p := _check_shard(root, spec, r, e, full=False))]
    if problems:
        raise CacheError(f"teacher cache {root} is damaged: {'; '.join(problems)}. Run `python -m hldx.cache "
                         f"verify dir={root}`, delete the shards it names and build again")
    return CacheReader(root, spec, prefetch)


# --------------------------------------------------------------------------------------------- verify


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
    with tqdm(total=sum(_record(spec, r)["bytes"] for r in ranges), unit="B", unit_scale=True,
              desc=f"verify {root.name}", disable=not progress) as bar:
        for r, entry in zip(ranges, entries):
            if (why := _check_shard(root, spec, r, entry, full=True, bar=bar)) is not None:
                problems.append(why)
    return problems


def _build_command(overrides: list[str]) -> int:
    """Build this worker's share (cache.task of cache.tasks) of the cache of the composed config."""
    from hldx import config, data
    from hldx.run import ensure_teacher
    from hldx.teacher import build_cache, cache_spec
    from hldx.train import device_of

    cfg = config.compose(overrides)
    tokenizer = data.tokenizer_for(cfg)
    stream = data.prepare(cfg, "train", tokenizer)
    ensure_teacher(cfg)
    spec = cache_spec(cfg, tokenizer, stream)
    root = build_cache(cfg, spec, stream, device_of(cfg), task_rows(spec, cfg.cache.task, cfg.cache.tasks))
    print(f"{'complete' if (root / 'manifest.json').exists() else 'partial'}: {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m hldx.cache build <overrides> | verify dir=DIR (exit 1 naming every bad shard)."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "build":
        return _build_command(args[1:])
    if len(args) != 2 or args[0] != "verify" or not args[1].startswith("dir="):
        print("usage: python -m hldx.cache build <hydra overrides>   # cache.task/cache.tasks split the work\n"
              "       python -m hldx.cache verify dir=DIR", file=sys.stderr)
        return 2
    root = args[1].removeprefix("dir=")
    problems = verify(root)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
