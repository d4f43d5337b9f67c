"""Writing a teacher cache: shards built from a teacher function, resumable, split over workers."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from hldx.store.spec import (FORMAT, CacheError, CacheSpec, bytes_per_token, check_shard, diff, read_json,
                             shard_name, shard_ranges, shard_record, spec_of, write_json)

TeacherFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
RowTokensFn = Callable[[np.ndarray], torch.Tensor]
log = logging.getLogger(__name__)

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
    entry = shard_record(spec, r)
    path = root / entry["file"]
    tmp = path.with_name(path.name + ".tmp")
    (root / (shard_name(r) + ".json")).unlink(missing_ok=True)
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
    write_json(root / (shard_name(r) + ".json"), {**entry, "sha256": digest.hexdigest()})


def _claim(root: Path, spec: CacheSpec) -> None:
    """Record the spec in a new directory, or refuse one started with another spec."""
    path = root / "spec.json"
    raw = read_json(path)
    if raw is None:
        write_json(path, dataclasses.asdict(spec))
        return
    problems = diff(spec_of(raw, path), spec, (f.name for f in dataclasses.fields(CacheSpec)))
    if problems:
        raise CacheError(f"{root} holds a cache built with another spec ({'; '.join(problems)}): "
                         f"choose another cache.dir or delete {root}")


def _finalize(root: Path, spec: CacheSpec) -> bool:
    """Write manifest.json if every shard has its record; say whether it did."""
    entries = [read_json(root / (shard_name(r) + ".json")) for r in shard_ranges(spec)]
    if any(entry is None for entry in entries):
        return False
    write_json(root / "manifest.json", {"format": FORMAT, "spec": dataclasses.asdict(spec),
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
        return check_shard(root, spec, r, read_json(root / (shard_name(r) + ".json")), full=True)

    todo = []
    for r in tqdm(mine, desc="check built shards", unit="shard", disable=not progress):
        if (why := problem(r)) is not None:
            todo.append(r)
            if (root / (shard_name(r) + ".json")).exists():
                log.warning("rebuilding %s", why)
    with tqdm(total=sum(len(r) for r in todo) * spec.seq_len, unit="tok", unit_scale=True,
              desc=f"teacher cache {root.name}", disable=not progress) as bar:
        for r in todo:
            with FileLock(root / "locks" / (shard_name(r) + ".lock")):
                if problem(r) is None:  # another worker built it meanwhile
                    bar.total -= len(r) * spec.seq_len
                    bar.refresh()
                    continue
                _write_shard(root, spec, r, teacher_fn, row_tokens_fn, batch_rows, bar)
    with FileLock(root / "locks" / "cache.lock"):
        return _finalize(root, spec)
