"""The cache's spec and byte layout: what a cache holds, where each record sits, and the checks of a shard
against its record (see hldx.store for the format)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hldx.errors import UserError

FORMAT = "hldx-teacher-cache/1"
DTYPES = {"bfloat16": 2, "float32": 4}  # storage dtype -> bytes per value


class CacheError(UserError, RuntimeError):
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
class Layout:
    """Byte offsets within a record: idx [0, idx), val [idx, val), crc; hid [topk, full - 4), crc."""

    idx: int
    val: int
    topk: int  # bytes of a record without hidden state
    full: int  # bytes of a record with hidden state


def layout(spec: CacheSpec) -> Layout:
    per_row = spec.seq_len * spec.k
    idx = per_row * spec.index_dtype.itemsize
    val = idx + per_row * DTYPES[spec.values_dtype]
    hid = spec.seq_len * spec.hidden_size * DTYPES[spec.hidden_dtype]
    return Layout(idx, val, val + 4, val + 4 + hid + 4)


def shard_name(r: range) -> str:
    return f"shard-{r.start:010d}-{r.stop:010d}"


def hidden_in(spec: CacheSpec, r: range) -> int:
    return max(0, min(r.stop, spec.hidden_rows) - r.start)


def shard_record(spec: CacheSpec, r: range) -> dict:
    """A shard's manifest record, less its sha256."""
    lay, nh = layout(spec), hidden_in(spec, r)
    return {"file": shard_name(r) + ".bin", "start_row": r.start, "end_row": r.stop, "hidden_rows": nh,
            "bytes": nh * lay.full + (len(r) - nh) * lay.topk}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path}: not valid JSON ({err}); delete it and build again") from err


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def spec_of(raw: dict, path: Path) -> CacheSpec:
    try:
        return CacheSpec(**raw)
    except (TypeError, ValueError) as err:
        raise CacheError(f"{path}: not a valid cache spec ({err})") from err


def sha256_file(path: Path, bar: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def check_shard(root: Path, spec: CacheSpec, r: range, entry: dict | None, *, full: bool,
                 bar: tqdm | None = None) -> str | None:
    """What is wrong with shard `r` given its record (None: nothing); full: also compare the sha256."""
    want = shard_record(spec, r)
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
    if full and sha256_file(path, bar) != entry.get("sha256"):
        return f"{want['file']}: sha256 mismatch (the file changed after it was written, e.g. a flipped bit)"
    return None


def diff(have: CacheSpec, want: CacheSpec, fields: Iterable[str]) -> list[str]:
    return [f"{f}: cache has {getattr(have, f)!r}, expected {getattr(want, f)!r}"
            for f in fields if getattr(have, f) != getattr(want, f)]
