"""hldx.loader: each step's tokens and teacher outputs, read ahead by threads, equal what the training rows and
the cache hold for that step's rows, across epochs, from any step on; a reader's error reaches the trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hldx import order
from hldx import store as cache
from hldx.loader import Loader, _runs
from hldx.store import CacheError
from test_cache import Teacher, flip_bit, get, make_spec, online, row_tokens, shard_file

ROWS, B = 37, 6


@pytest.fixture
def setup(tmp_path):
    """Training rows whose tokens are those of the cache tests' row function, and a cache of all of them (top-k,
    the hidden states after teacher layers 3 and 5)."""
    spec = make_spec(rows=ROWS, hidden_dtype="float8_e4m3", layers=(3, 5))
    tokens = row_tokens(spec)(np.arange(ROWS)).numpy().astype(np.uint16)
    path = tmp_path / "rows.bin"
    tokens.tofile(path)
    rows = order.Rows(np.memmap(path, np.uint16, "r", shape=tokens.shape), spec.stream_digest, tmp_path)
    assert cache.build(spec, tmp_path / "c", Teacher(spec), row_tokens(spec), progress=False)
    return rows, cache.open_cache(tmp_path / "c", spec), spec


def expected(spec, batches: order.Batches, step: int):
    """The step's tokens, the teacher's top-k for its rows, and the rows."""
    positions = batches.positions(step)
    idx, val, _ = online(spec, positions)
    return batches.batch(step)[0], idx, val, positions


@pytest.mark.parametrize("readers, prefetch", [(1, 1), (2, 3)])
def test_every_step_holds_its_rows_across_epochs(setup, readers, prefetch):
    rows, reader, spec = setup
    batches = order.Batches(rows, B)
    steps = range(0, 3 * ROWS // B + 1)  # three epochs: steps 6, 12 and 18 span an epoch's end
    with Loader(batches, reader, ("topk", "hidden", "hidden-5"), steps, torch.device("cpu"), prefetch, readers) as loader:
        for step in steps:
            got = loader.get(step)
            assert len(got) == B
            micro = [got.micro(a, 2) for a in range(0, B, 2)]
            tokens = torch.cat([m.tokens_BxL for m in micro])
            want_tokens, want_idx, want_val, positions = expected(spec, batches, step)
            assert tokens.dtype == torch.int64 and torch.equal(tokens, want_tokens)
            assert torch.equal(torch.cat([m.topk_idx_BxLxK for m in micro]), want_idx)
            assert torch.equal(torch.cat([m.topk_val_BxLxK for m in micro]), want_val)
            for layer in (3, 5):  # each teacher layer's states, by layer
                hidden = torch.cat([m.hidden[layer] for m in micro])
                assert hidden.dtype == torch.float32
                assert torch.equal(hidden, get(reader, positions, topk=False, hidden=True, layer=layer)[2])
            assert not torch.equal(micro[0].hidden[3], micro[0].hidden[5])


def test_a_loader_started_mid_run_reads_what_an_uninterrupted_one_does(setup):
    rows, reader, _ = setup
    batches = order.Batches(rows, B, rank=1, world=2)
    full, resumed = [], []
    with Loader(batches, reader, ("topk",), range(20), torch.device("cpu"), 3, 2) as loader:
        full = [loader.get(s).micro(0, B // 2).topk_val_BxLxK.clone() for s in range(20)]
    with Loader(batches, reader, ("topk",), range(13, 20), torch.device("cpu"), 3, 2) as loader:
        resumed = [loader.get(s).micro(0, B // 2).topk_val_BxLxK.clone() for s in range(13, 20)]
    assert all(torch.equal(a, b) for a, b in zip(full[13:], resumed))


def test_tokens_alone_for_nll(setup):
    rows, _, _ = setup
    batches = order.Batches(rows, B)
    with Loader(batches, None, (), range(3), torch.device("cpu")) as loader:
        micro = loader.get(2).micro(0, B)
    assert torch.equal(micro.tokens_BxL, batches.batch(2)[0]) and micro.topk_idx_BxLxK is None


def test_a_damaged_row_stops_the_step_that_reads_it(setup, tmp_path):
    rows, _, spec = setup
    flip_bit(shard_file(tmp_path / "c", "topk", 8, 16), 5)  # row 8's ids
    reader = cache.open_cache(tmp_path / "c", spec)
    with Loader(order.Batches(rows, B), reader, ("topk",), range(4), torch.device("cpu"), 2, 2) as loader:
        loader.get(0)  # rows 0..5
        with pytest.raises(CacheError, match=r"ids of rows \[8\] fail their checksum"):
            loader.get(1)  # rows 6..11


def test_runs_split_at_the_end_of_an_epoch():
    assert _runs(30, 46, 37) == [(30, 37, 30), (37, 46, 0)]
    assert _runs(0, 80, 37) == [(0, 37, 0), (37, 74, 0), (74, 80, 0)]
