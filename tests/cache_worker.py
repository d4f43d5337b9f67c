"""A process that grows or reads one teacher cache, for the concurrency tests (tests/test_cache_concurrency.py):

    python tests/cache_worker.py grow DIR ROWS HIDDEN_ROWS [DELAY_S]   # build to these extents, slowly
    python tests/cache_worker.py read DIR ROWS HIDDEN_ROWS STOP_FILE   # build them, then read and check them
                                                                        # until STOP_FILE exists: prints the rows read
Every row read is compared with the deterministic teacher of tests/test_cache.py; any mismatch or error exits 1.
"""
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from hldx import store
from hldx.store import CacheSpec

L, K, D = 16, 8, 12


def make_spec(**changes) -> CacheSpec:
    base = dict(teacher_digest="teacher-a", tokenizer_digest="tok-a", stream_digest="rows-a", seq_len=L, k=K,
                vocab_size=5000, hidden_layer=3, hidden_size=D, values_dtype="float32", hidden_dtype="float32",
                rows_per_shard=8, rows=37)
    base["hidden_rows"] = changes.get("rows", base["rows"])  # all
    return CacheSpec(**{**base, **changes})


def row_tokens(spec: CacheSpec):
    def fn(rows: np.ndarray) -> torch.Tensor:
        r = torch.as_tensor(rows, dtype=torch.long)[:, None]
        return (r * 7919 + torch.arange(spec.seq_len) * 104729) % spec.vocab_size
    return fn


class Teacher:
    """A per-token function of (token, position): what any batching of rows must give back. Counts its calls
    and rows; raises after `fail_after` calls to stand in for a killed build."""

    def __init__(self, spec: CacheSpec, fail_after: int | None = None, hidden: bool = True):
        self.spec, self.fail_after, self.hidden = spec, fail_after, hidden
        self.calls = self.rows = 0
        self.lock = threading.Lock()

    def __call__(self, tokens_NxL: torch.Tensor, topk: bool = True, hidden: bool = True):
        with self.lock:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.calls += 1
            self.rows += len(tokens_NxL)
        s = self.spec
        pos = torch.arange(s.seq_len)[:, None]
        idx = (tokens_NxL[..., None] * 31 + pos + torch.arange(s.k) * 577) % s.vocab_size
        val = torch.sin(idx.float() * 0.37 + pos) * 20 + 1 / 3
        hid = torch.cos(tokens_NxL[..., None].float() * 0.1 + torch.arange(s.hidden_size) * 0.7) * 50
        return idx, val, hid if self.hidden else None


def online(spec: CacheSpec, rows) -> tuple:
    """What the cache must return for rows: the ids, the logits minus each position's largest, the states."""
    idx, val, hid = Teacher(spec)(row_tokens(spec)(np.asarray(rows)))
    return idx, val - val.amax(-1, keepdim=True), hid




class SlowTeacher(Teacher):
    def __init__(self, spec, delay_s: float):
        super().__init__(spec)
        self.delay_s = delay_s

    def __call__(self, tokens_NxL, topk=True, hidden=True):
        time.sleep(self.delay_s)
        return super().__call__(tokens_NxL, topk, hidden)


def main(mode: str, out: str, rows: str, hidden_rows: str, arg: str = "0.01") -> int:
    spec = make_spec(rows=int(rows), hidden_rows=int(hidden_rows))
    delay = float(arg) if mode == "grow" else 0.002
    print("building", flush=True)
    assert store.build(spec, out, SlowTeacher(spec, delay), row_tokens(spec), batch_rows=2, progress=False)
    if mode == "grow":
        return 0
    reader, rng, read, stop = store.open_cache(out, spec), np.random.default_rng(int(rows)), 0, Path(arg)
    want_idx, want_val, want_hid = online(spec, range(spec.rows))
    while not stop.exists():
        a = int(rng.integers(0, spec.rows))
        b = int(rng.integers(a + 1, spec.rows + 1))
        idx, val, _ = reader.get(np.arange(a, b))
        assert torch.equal(idx, want_idx[a:b]) and torch.equal(val, want_val[a:b]), f"rows [{a}, {b}) differ"
        if spec.hidden_rows:
            h = min(b, spec.hidden_rows)
            _, _, hid = reader.get(np.arange(min(a, h - 1), h), topk=False, hidden=True)
            assert torch.equal(hid, want_hid[min(a, h - 1):h]), f"hidden rows [{a}, {h}) differ"
        read += b - a
    print(read, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
