"""The training order: a split's rows of seq_len tokens permuted once by data.seed and laid down on disk, and the
deterministic, resumable, shardable batches each rank reads from it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from hldx.config import digest
from hldx.data import FORMAT, Stream, build_once
from hldx.errors import ConfigError
from hldx.progress import Progress


@dataclass(frozen=True, eq=False)
class Rows:
    """A split's full rows of seq_len tokens in training order, laid down once on disk: a run reads them in
    sequence (row r at global position r, again from row 0 in a further epoch), so the rows of its first n
    steps are a prefix, and row r keys the teacher cache."""

    tokens_RxL: np.ndarray  # read-only np.memmap [R, L]
    digest: str
    path: Path

    @property
    def count(self) -> int:
        return len(self.tokens_RxL)


def training_rows(cfg: DictConfig, stream: Stream) -> Rows:
    """The stream's full rows of train.seq_len tokens (the tail is dropped) permuted by data.seed (NumPy's
    default generator seeded with it), written once to {paths.cache}/orders/<digest>/rows.bin. The order
    depends on data.seed alone, not on `seed`: the replicates of a multi-seed study share it, and its cache."""
    seq_len, seed = cfg.train.seq_len, cfg.data.seed
    count = stream.rows(seq_len)
    if count == 0:
        raise ConfigError(f"train.seq_len={seq_len} is invalid: the stream at {stream.path} holds "
                          f"{len(stream.tokens)} tokens, fewer than one row")
    spec = {"format": FORMAT, "stream": stream.digest, "seq_len": seq_len, "seed": seed}
    key = digest(spec)
    final = Path(cfg.paths.cache).expanduser() / "orders" / key
    build_once(final, lambda tmp: _write_rows(stream, seq_len, seed, {**spec, "rows": count}, tmp))
    tokens_RxL = np.memmap(final / "rows.bin", dtype=stream.tokens.dtype, mode="r", shape=(count, seq_len))
    return Rows(tokens_RxL=tokens_RxL, digest=key, path=final)


def _write_rows(stream: Stream, seq_len: int, seed: int, meta: dict, out: Path) -> None:
    count = meta["rows"]
    source_RxL = stream.tokens[: count * seq_len].reshape(count, seq_len)
    order = np.random.default_rng(seed).permutation(count)
    block = max(1, (64 << 20) // (seq_len * source_RxL.itemsize))  # rows per write: ~64 MB
    with open(out / "rows.bin", "wb") as f, Progress(total=count, desc="lay down the training order", unit="row",
                                                  unit_scale=True, mininterval=5) as bar:
        for start in range(0, count, block):
            rows = order[start:start + block]
            by_source = np.argsort(rows)  # read the source in its own order, write in the training order
            chunk = np.empty((len(rows), seq_len), dtype=source_RxL.dtype)
            chunk[by_source] = source_RxL[rows[by_source]]
            chunk.tofile(f)
            bar.update(len(rows))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


class Batches:
    """The global batch of every step, from the training rows: step s holds global positions
    [s * B, (s + 1) * B), position g is row g mod R (a position past R reads a further epoch), and rank r of
    `world` takes positions [r * B/W, (r + 1) * B/W) of each step. A pure function of the step: resuming needs
    only the step, and the rows a step reads can be read ahead of it."""

    def __init__(self, rows: Rows, batch_size: int, rank: int = 0, world: int = 1):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank={rank}, world={world}: expected 0 <= rank < world")
        if batch_size < 1 or batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the world size {world}")
        self.tokens_RxL, self.rows = rows.tokens_RxL, rows.count
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.per_rank = batch_size // world

    def first(self, step: int) -> int:
        """This rank's first global position of step `step`."""
        if step < 0:
            raise ValueError(f"step={step}: expected >= 0")
        return step * self.batch_size + self.rank * self.per_rank

    def positions(self, step: int) -> np.ndarray:
        """This rank's row indices [batch_size // world] (int64) for optimizer step `step`."""
        return (self.first(step) + np.arange(self.per_rank, dtype=np.int64)) % self.rows

    def batch(self, step: int) -> tuple[torch.Tensor, np.ndarray]:
        """(tokens_BxL int64, row indices [B]) of this rank for step `step`, B = batch_size // world."""
        rows = self.positions(step)
        return torch.from_numpy(self.tokens_RxL[rows].astype(np.int64)), rows


def epochs(rows_read: int, rows: int) -> int:
    """How many passes over `rows` training rows reading `rows_read` of them takes."""
    return -(-rows_read // rows)
