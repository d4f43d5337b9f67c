"""The teacher cache under concurrency, with real processes: growers to different extents and readers that
check every row they read, at once, while builders are SIGKILLed at random points (tests/cache_worker.py)."""
import hashlib
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
from cache_worker import Teacher, get, make_spec, online, row_tokens

WORKER = [sys.executable, str(Path(__file__).parent / "cache_worker.py")]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*WORKER, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_every_row(out: Path, logits: str = "topk") -> int:
    """Every row the cache serves, against the teacher; how many rows of logits (top-k or sampled) it serves."""
    spec = make_spec(logits=logits)
    reader = store.CacheReader(out, spec)  # the extents are those of the shards it finds
    rows, hidden = reader.extent(logits), reader.extent("hidden")
    want_idx, want_val, want_hid = online(spec, range(max(rows, 1)))
    if rows:
        idx, val, _ = get(reader, np.arange(rows))
        assert torch.equal(idx, want_idx[:rows]) and torch.equal(val, want_val[:rows])
    if hidden:
        assert torch.equal(get(reader, np.arange(hidden), topk=False, hidden=True)[2], want_hid[:hidden])
    return rows


@pytest.mark.slow
def test_growers_readers_and_killed_builders_at_once(tmp_path):
    out, sampled = tmp_path / "cache", tmp_path / "sampled"  # a top-k cache, and one of sampled logits beside it
    # Readers to three extents (each builds what it lacks, then reads its rows in a loop for 20 s) and growers
    # to larger ones, all at once: the shards a reader resolved are never removed or rewritten under it.
    stop = tmp_path / "stop"
    readers = [start("read", sampled, 21, 9, stop, "3", "sampled")]
    readers += [start("read", out, rows, hidden, stop) for rows, hidden in ((29, 29), (45, 11))]
    growers = [start("grow", sampled, 53, 30, 0.01, "3", "sampled")]
    growers += [start("grow", out, rows, hidden, 0.01) for rows, hidden in ((61, 40), (77, 77))]
    # Builders to ever larger extents, SIGKILLed at random points while all that runs (every third: the sampled
    # cache's).
    rng, kills, seen = random.Random(0), 0, []
    for i in range(6):
        logits, where = ("sampled", sampled) if i % 3 == 2 else ("topk", out)
        victim = start("grow", where, 80 + 24 * (i + 1), 80 + 24 * (i + 1), 0.05, "3", logits)
        assert victim.stdout.readline() == "building\n"
        time.sleep(rng.uniform(0.0, 1.0))  # anywhere in its build: mostly inside a shard
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
            kills += 1
        victim.wait()
        seen.append(check_every_row(where, logits))  # whatever a kill left, every row served is right
    stop.touch()
    for p in growers:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    reads = []
    for p in readers:
        assert p.wait(timeout=300) == 0, p.stderr.read()
        reads.append(int(p.stdout.read().split()[-1]))
    assert kills >= 4 and min(reads) > 1000
    # The killed builders left only their temporary files: verify names them, gc removes them, and then each
    # cache is whole up to the largest extent a grower finished.
    assert check_every_row(out) >= 77 and check_every_row(sampled, "sampled") >= 53
    for cache in (out, sampled):
        leftovers = [p for p in store.verify(cache, progress=False) if "unfinished write" in p]
        assert all("unfinished write" in p for p in store.verify(cache, progress=False))
        removed = store.gc(cache)
        assert len([r for r in removed if ".tmp-" in r]) == len(leftovers)
        assert store.verify(cache, progress=False) == []
    print(f"\n{len(readers)} readers read {sum(reads)} rows ({reads}) while {len(growers)} growers and "
          f"{kills} SIGKILLed builders ran; served extents after each kill: {seen}; leftovers removed: "
          f"{len(leftovers)}")


def _fingerprints(out: Path, parts: tuple[str, ...]) -> dict[str, tuple[int, int, str]]:
    """Each shard file of `parts`: its inode, mtime (ns) and content digest."""
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for part in parts for p in sorted((out / part).glob("*.bin"))}


@pytest.mark.slow
def test_a_layer_added_to_a_cache_leaves_the_shards_it_had_untouched(tmp_path):
    """A cache of top-k and teacher layer 3 (the part `hidden`) grows a part for layer 5 while readers check every
    row of layer 3 and top-k they read, growers add layer 5 to different extents and builders of it are SIGKILLed
    at random points, all at once: every shard the cache had keeps its inode, bytes and mtime; layer 5's rows are
    the teacher's; what the kills left, verify names and gc removes, sparing the first layer's shards."""
    out, stop = tmp_path / "cache", tmp_path / "stop"
    first = make_spec(rows=45)
    assert store.build(first, out, Teacher(first), row_tokens(first), batch_rows=4, progress=False)
    before = _fingerprints(out, ("topk", "hidden"))
    assert len(before) == 2 * 6
    readers = [start("read", out, 45, 45, stop, "3") for _ in range(2)]
    growers = [start("grow", out, 45, rows, 0.01, layers) for rows, layers in ((20, "3,5"), (45, "5"))]
    rng, kills, tries = random.Random(1), 0, 0
    while kills < 3 and tries < 12:  # a builder that finished before its kill is not a kill: start another
        victim = start("grow", out, 45, 45, 0.05, "5")
        assert victim.stdout.readline() == "building\n"
        time.sleep(rng.uniform(0.0, 0.5))
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
            kills += 1
        victim.wait()
        tries += 1
    for p in growers:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    stop.touch()
    reads = []
    for p in readers:
        assert p.wait(timeout=300) == 0, p.stderr.read()
        reads.append(int(p.stdout.read().split()[-1]))
    assert kills >= 2 and min(reads) > 100
    assert _fingerprints(out, ("topk", "hidden")) == before  # not one shard of them written, replaced or touched
    both = make_spec(rows=45, layers=(3, 5))
    reader = store.open_cache(out, both)
    assert torch.equal(get(reader, np.arange(45), hidden=True, layer=5)[2], online(both, range(45), layer=5)[2])
    assert all("unfinished write" in p for p in store.verify(out, progress=False))
    store.gc(out)
    assert store.verify(out, progress=False) == [] and _fingerprints(out, ("topk", "hidden")) == before
    print(f"\n{len(readers)} readers read {sum(reads)} rows of top-k and layer 3 while {len(growers)} growers and "
          f"{kills} SIGKILLed builders added layer 5")
