"""A cache directory on disk: its spec file, its immutable shard files, how they are published and found.

Every file a reader may use is written once and never changed or removed under it. A shard is written to a
name of its own (`<shard>.bin.tmp-<host>-<pid>-<random>`), flushed to disk, then published by a hard link to
its final name, which fails rather than replaces when the name exists: publication is atomic, and a
published shard is never rewritten. A grown extent adds shards beside the old ones (a shard covers any rows
[start, stop) inside one block of rows_per_shard rows), so nothing a running job reads is ever superseded.
A killed writer leaves only its temporary file, which no reader looks at; `gc` removes such leftovers, and
shards made redundant by racing builders, and a reader whose shard was removed by it finds its rows again.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from hldx.store.spec import CacheError, CacheSpec, is_part, shard_bytes

FORMAT = "hldx-teacher-cache/3"   # 3: shards at any row, published by link; no per-shard record
READABLE = ("hldx-teacher-cache/2", FORMAT)  # 2: shards aligned to rows_per_shard, each with a .json record
TMP = ".tmp-"
Cover = list[tuple[range, range]]  # (the rows read from a shard, that shard's rows), chaining from row 0


def shard_name(part: str, r: range) -> str:
    return f"{part}/{r.start:010d}-{r.stop:010d}"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> bool:
    """Give the complete, flushed file `tmp` the name `final` unless a file has it; whether `tmp` became it.
    A hard link never replaces (on local file systems, NFS and Lustre alike); where links are refused, a
    rename into a name still free (a concurrent writer of the same content may then win the race)."""
    try:
        os.link(tmp, final)
        published = True
    except FileExistsError:
        published = False
    except OSError:  # a file system without hard links
        published = not final.exists()
        if published:
            os.rename(tmp, final)
    tmp.unlink(missing_ok=True)
    if published:
        _fsync_dir(final.parent)
    return published


def open_tmp(final: Path) -> tuple[int, Path]:
    """A new file beside `final` that only its writer knows: (its descriptor, its path)."""
    tmp = _tmp_name(final)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), tmp


# ---- the spec file ------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path}: not valid JSON ({err}); delete it and build again") from err


def load_spec(root: Path) -> CacheSpec:
    """The identity a cache directory was started with (extents 0: they are its shards')."""
    raw = read_json(root / "spec.json")
    if raw is None:
        raise CacheError(f"{root}: no teacher cache here (spec.json missing); build one with "
                         f"`python -m hldx.cache build ...`")
    if raw.pop("format", None) not in READABLE:
        raise CacheError(f"{root / 'spec.json'}: not a cache of a format this hldx reads ({', '.join(READABLE)}); "
                         f"build it again")
    try:
        return CacheSpec(**raw)
    except (TypeError, ValueError) as err:
        raise CacheError(f"{root / 'spec.json'}: not a valid cache spec ({err})") from err


def diff(have: CacheSpec, want: CacheSpec) -> list[str]:
    """The identity fields in which two specs differ."""
    a, b = have.identity(), want.identity()
    return [f"{f}: cache has {a[f]!r}, expected {b[f]!r}" for f in a if a[f] != b[f]]


def claim(root: Path, spec: CacheSpec) -> None:
    """Make `root` a cache of `spec`'s identity (its spec.json, published once), or check that it is one; with a
    directory for each part of the spec's."""
    for sub in spec.extents:
        (root / sub).mkdir(parents=True, exist_ok=True)
    path = root / "spec.json"
    if not path.exists():
        fd, tmp = open_tmp(path)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, **spec.identity()}, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    if problems := diff(load_spec(root), spec):
        raise CacheError(f"{root} holds a cache built with another spec ({'; '.join(problems)}): "
                         f"choose another cache.dir or delete {root}")


# ---- finding the shards -----------------------------------------------------------------------------------

def parts(root: Path, spec: CacheSpec) -> list[str]:
    """The parts a cache directory holds (its part directories), in name order."""
    try:
        return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and is_part(spec, entry.name))
    except FileNotFoundError:
        return []


def published(root: Path, part: str) -> list[range]:
    """The rows of every shard published in a part, from their names (one directory listing), in order."""
    found = []
    try:
        entries = os.scandir(root / part)
    except FileNotFoundError:
        return []
    with entries:
        for entry in entries:
            stem, dot, ext = entry.name.partition(".")
            start, _, stop = stem.partition("-")
            if ext == "bin" and start.isdigit() and stop.isdigit() and int(start) < int(stop):
                found.append(range(int(start), int(stop)))
    return sorted(found, key=lambda r: (r.start, r.stop))


def reach(shards: list[range], row: int) -> tuple[int, Cover]:
    """How far rows from `row` on are covered without a gap by `shards` (sorted by start), and by which: at each
    row the shard that holds it and reaches furthest."""
    cover, i, best = [], 0, None
    while True:
        while i < len(shards) and shards[i].start <= row:
            if row < shards[i].stop and (best is None or shards[i].stop > best.stop):
                best = shards[i]
            i += 1
        if best is None or best.stop <= row:
            return row, cover
        cover.append((range(row, best.stop), best))
        row, best = best.stop, None  # no shard seen so far reaches past it: each would have been the best


def check_shard(root: Path, spec: CacheSpec, part: str, r: range) -> str | None:
    """What is wrong with a published shard's file, short of its checksums (None: nothing)."""
    name, want = shard_name(part, r), shard_bytes(spec, part, len(r))
    try:
        size = (root / f"{name}.bin").stat().st_size
    except FileNotFoundError:
        return f"{name}.bin: file missing"
    return None if size == want else f"{name}.bin: {size} bytes instead of {want} (truncated or overwritten)"


def unfinished(root: Path, spec: CacheSpec) -> list[Path]:
    """The temporary files of writers (running, or killed: a killed build's leftovers)."""
    return sorted(p for part in parts(root, spec) for pattern in (f"*{TMP}*", "*.tmp")
                  for p in (root / part).glob(pattern))


def writer_gone(path: Path, older_than_s: float) -> bool:
    """Whether no writer can still be writing `path`: its process, on this host, is gone, or it has not been
    written to for `older_than_s` seconds (a writer on another node)."""
    writer = path.name.rpartition(TMP)[2]           # <host>-<pid>-<random>
    host, _, pid = writer.rpartition("-")[0].rpartition("-")
    try:
        if host == socket.gethostname() and pid.isdigit():
            os.kill(int(pid), 0)
            return False
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    try:
        return time.time() - path.stat().st_mtime > older_than_s
    except FileNotFoundError:
        return False


def redundant(root: Path, part: str) -> list[range]:
    """Published shards no reader needs: every row of theirs is served by the shards a reader resolves."""
    shards = published(root, part)
    used = {shard for _, shard in reach(shards, 0)[1]}
    end = reach(shards, 0)[0]
    return [r for r in shards if r not in used and r.stop <= end]


def gc(root: Path, older_than_s: float = 24 * 3600) -> list[str]:
    """Remove what no run reads: shards made redundant (by racing builders, or a format-2 cache grown in
    place) and unfinished writes whose writer is gone. A reader that had resolved a removed shard resolves
    its rows again. What was removed, relative to `root`."""
    spec, removed = load_spec(root), []
    for part in parts(root, spec):
        for r in redundant(root, part):
            path = root / f"{shard_name(part, r)}.bin"
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)  # a format-2 record
            removed.append(f"{shard_name(part, r)}.bin")
    for path in unfinished(root, spec):
        if writer_gone(path, older_than_s):
            path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(root)))
    return removed
