"""A process that grows or reads one teacher cache, for the concurrency tests (tests/test_cache_concurrency.py):

    python tests/cache_worker.py grow DIR ROWS HIDDEN_ROWS [DELAY_S [LAYERS [LOGITS]]]  # build to these extents
    python tests/cache_worker.py read DIR ROWS HIDDEN_ROWS STOP_FILE [LAYERS [LOGITS]]  # build them, then read and
                                                            # check them until STOP_FILE exists: prints the rows read
LAYERS: the teacher layers whose hidden states the cache holds, comma-separated (default 3, the part `hidden`);
LOGITS: topk (default) or sampled, the cache's logits.
Every row read is compared with the deterministic teacher of tests/test_cache.py; any mismatch or error exits 1.
"""
import dataclasses
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from hldx import store
from hldx.store import CacheSpec, hidden_part

L, K, D = 16, 8, 12


def with_extents(spec: CacheSpec, rows: int, hidden_rows: int | None = None, layers=(3,)) -> CacheSpec:
    """spec needing its logits (top-k or sampled) for rows [0, rows) and the hidden states after each of `layers`
    for [0, hidden_rows) (default: rows)."""
    states = rows if hidden_rows is None else hidden_rows
    layers = {hidden_part(spec, layer): states for layer in layers}
    return dataclasses.replace(spec, extents={spec.logits: rows} | layers)


def make_spec(rows: int = 37, hidden_rows: int | None = None, layers=(3,), **changes) -> CacheSpec:
    base = dict(teacher_digest="teacher-a", tokenizer_digest="tok-a", stream_digest="rows-a", seq_len=L, k=K,
                vocab_size=5000, hidden_layer=3, hidden_size=D, values_dtype="float32", hidden_dtype="float32",
                rows_per_shard=8)
    return with_extents(CacheSpec(**{**base, **changes}), rows, hidden_rows, layers)


def get(reader: store.CacheReader, rows, topk: bool = True, hidden: bool = False, layer: int = 3) -> tuple:
    """(the logits part's ids, its values, the hidden states after `layer`) of rows as the reader decodes them, None
    where not asked (topk: the logits, top-k or sampled; a sampled part's values: the draws' logits and then the
    log-normalisers, side by side)."""
    logits = reader.spec.logits
    parts = (logits,) * topk + (hidden_part(reader.spec, layer),) * hidden
    got = reader.get(rows, parts)
    idx, *val = got[logits] if topk else (None, None)
    return idx, torch.cat(val, -1) if topk else None, got[parts[-1]] if hidden else None


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

    def __call__(self, tokens_NxL: torch.Tensor, parts: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, ...]]:
        with self.lock:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.calls += 1
            self.rows += len(tokens_NxL)
        s = self.spec
        pos = torch.arange(s.seq_len)[:, None]
        idx = (tokens_NxL[..., None] * 31 + pos + torch.arange(s.k) * 577) % s.vocab_size
        val = torch.sin(idx.float() * 0.37 + pos) * 20 + 1 / 3
        out = {"topk": (idx, val)} if "topk" in parts else {}
        if "sampled" in parts:  # every logit: a smooth function of (token, position, id), peaked at a few ids
            ids = torch.arange(s.vocab_size)
            out["sampled"] = (torch.cos(ids * 0.011 + tokens_NxL[..., None] * 0.3 + pos) * 6 - (ids % 97) * 0.05,)
        for part in parts if self.hidden else ():
            if (layer := store.part_layer(s, part)) is not None:  # each layer's states its own
                out[part] = (torch.cos(tokens_NxL[..., None].float() * 0.1 + torch.arange(s.hidden_size) * 0.7
                                       + (layer - 3)) * 50,)
        return out


def online(spec: CacheSpec, rows, layer: int = 3) -> tuple:
    """What the cache must return for rows: the ids, the logits minus each position's largest (sampled: each row's
    draws, their logits and log-normalisers side by side, encoded here), the states after `layer`."""
    rows = np.asarray(rows)
    out = Teacher(spec)(row_tokens(spec)(rows), (spec.logits, hidden_part(spec, layer)))
    (hid,) = out[hidden_part(spec, layer)]
    if spec.logits == "sampled":
        (z,) = out["sampled"]
        idx, *val = zip(*(store.decode(spec.logits, store.encode_sampled(spec, z[i:i + 1], int(r)))
                          for i, r in enumerate(rows)))
        return torch.cat(idx), torch.cat([torch.cat(v) for v in val], -1), hid
    idx, val = out["topk"]
    return idx, val - val.amax(-1, keepdim=True), hid




class SlowTeacher(Teacher):
    def __init__(self, spec, delay_s: float):
        super().__init__(spec)
        self.delay_s = delay_s

    def __call__(self, tokens_NxL, parts):
        time.sleep(self.delay_s)
        return super().__call__(tokens_NxL, parts)


def main(mode: str, out: str, rows: str, hidden_rows: str, arg: str = "0.01", layers: str = "3",
         logits: str = "topk") -> int:
    spec = make_spec(rows=int(rows), hidden_rows=int(hidden_rows), layers=[int(x) for x in layers.split(",")],
                     logits=logits)
    delay = float(arg) if mode == "grow" else 0.002
    print("building", flush=True)
    assert store.build(spec, out, SlowTeacher(spec, delay), row_tokens(spec), batch_rows=2, progress=False)
    if mode == "grow":
        return 0
    reader, rng, read, stop = store.open_cache(out, spec), np.random.default_rng(int(rows)), 0, Path(arg)
    top, states = spec.extent(logits), int(hidden_rows)
    want = {layer: online(spec, range(top), layer) for layer in map(int, layers.split(","))}
    while not stop.exists():
        a = int(rng.integers(0, top))
        b = int(rng.integers(a + 1, top + 1))
        idx, val, _ = get(reader, np.arange(a, b))
        want_idx, want_val, _ = next(iter(want.values()))  # the top-k, whatever the layer
        assert torch.equal(idx, want_idx[a:b]) and torch.equal(val, want_val[a:b]), f"rows [{a}, {b}) differ"
        for layer, (_, _, want_hid) in want.items() if states else ():
            h = min(b, states)
            _, _, hid = get(reader, np.arange(min(a, h - 1), h), topk=False, hidden=True, layer=layer)
            assert torch.equal(hid, want_hid[min(a, h - 1):h]), f"hidden rows [{a}, {h}) of layer {layer} differ"
        read += b - a
    print(read, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
