"""The teacher cache under concurrency, with real processes: growers to different extents and readers that
check every row they read, at once, while builders are SIGKILLed at random points (tests/cache_worker.py)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hldx import store
from cache_worker import make_spec, online

WORKER = [sys.executable, str(Path(__file__).parent / "cache_worker.py")]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*WORKER, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_every_row(out: Path) -> int:
    """Every row the cache serves, against the teacher; how many top-k rows it serves."""
    spec = make_spec()
    reader = store.CacheReader(out, spec)  # the extents are those of the shards it finds
    rows, hidden = reader.extent("topk"), reader.extent("hidden")
    want_idx, want_val, want_hid = online(spec, range(max(rows, 1)))
    if rows:
        idx, val, _ = reader.get(np.arange(rows))
        assert torch.equal(idx, want_idx[:rows]) and torch.equal(val, want_val[:rows])
    if hidden:
        assert torch.equal(reader.get(np.arange(hidden), topk=False, hidden=True)[2], want_hid[:hidden])
    return rows


@pytest.mark.slow
def test_growers_readers_and_killed_builders_at_once(tmp_path):
    out = tmp_path / "cache"
    # Readers to three extents (each builds what it lacks, then reads its rows in a loop for 20 s) and growers
    # to larger ones, all at once: the shards a reader resolved are never removed or rewritten under it.
    stop = tmp_path / "stop"
    readers = [start("read", out, rows, hidden, stop) for rows, hidden in ((13, 5), (29, 29), (45, 11))]
    growers = [start("grow", out, rows, hidden, 0.01) for rows, hidden in ((37, 21), (61, 40), (77, 77))]
    # Builders to ever larger extents, SIGKILLed at random points while all that runs.
    rng, kills, seen = random.Random(0), 0, []
    for i in range(6):
        victim = start("grow", out, 80 + 24 * (i + 1), 80 + 24 * (i + 1), 0.05)
        assert victim.stdout.readline() == "building\n"
        time.sleep(rng.uniform(0.0, 1.0))  # anywhere in its build: mostly inside a shard
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
            kills += 1
        victim.wait()
        seen.append(check_every_row(out))  # whatever a kill left, every row served is right
    stop.touch()
    for p in growers:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    reads = []
    for p in readers:
        assert p.wait(timeout=300) == 0, p.stderr.read()
        reads.append(int(p.stdout.read().split()[-1]))
    assert kills >= 4 and min(reads) > 1000
    # The killed builders left only their temporary files: verify names them, gc removes them, and then the
    # cache is whole up to the largest extent a grower finished.
    assert check_every_row(out) >= 77
    leftovers = [p for p in store.verify(out, progress=False) if "unfinished write" in p]
    assert all("unfinished write" in p for p in store.verify(out, progress=False))
    removed = store.gc(out)
    assert len([r for r in removed if ".tmp-" in r]) == len(leftovers)
    assert store.verify(out, progress=False) == []
    print(f"\n{len(readers)} readers read {sum(reads)} rows ({reads}) while {len(growers)} growers and "
          f"{kills} SIGKILLed builders ran; served extents after each kill: {seen}; leftovers removed: "
          f"{len(leftovers)}")
