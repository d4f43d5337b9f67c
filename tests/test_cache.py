"""Teacher cache: round trips, the on-disk format, resume, concurrent workers, corruption, refusal."""

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from hldx import store as cache
from hldx.cache import main as cache_main
from hldx.store import CacheError, CacheSpec

ROOT = Path(__file__).resolve().parents[1]
L, K, D = 16, 8, 12


def make_spec(**changes) -> CacheSpec:
    base = dict(teacher_digest="teacher-a", tokenizer_digest="tok-a", stream_digest="stream-a", seq_len=L,
                rows=37, k=K, vocab_size=5000, hidden_layer=3, hidden_size=D,
                values_dtype="float32", hidden_dtype="float32", rows_per_shard=8)
    base["hidden_rows"] = changes.get("rows", base["rows"])  # all
    return CacheSpec(**{**base, **changes})


def row_tokens(spec: CacheSpec):
    def fn(rows: np.ndarray) -> torch.Tensor:
        r = torch.as_tensor(rows, dtype=torch.long)[:, None]
        return (r * 7919 + torch.arange(spec.seq_len) * 104729) % spec.vocab_size
    return fn


class Teacher:
    """A per-token function of (token, position): what any batching of rows must give back. Counts
    its calls and rows; raises after `fail_after` calls to stand in for a killed build."""

    def __init__(self, spec: CacheSpec, fail_after: int | None = None, hidden: bool = True):
        self.spec, self.fail_after, self.hidden = spec, fail_after, hidden
        self.calls = self.rows = 0
        self.lock = threading.Lock()

    def __call__(self, tokens_NxL: torch.Tensor):
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
    return Teacher(spec)(row_tokens(spec)(np.asarray(rows)))


def built(tmp_path: Path, spec: CacheSpec, name: str = "c") -> Path:
    out = tmp_path / name
    assert cache.build(spec, out, Teacher(spec), row_tokens(spec), progress=False, batch_rows=3)
    return out


def shard_file(out: Path, start: int, stop: int) -> Path:
    return out / f"shard-{start:010d}-{stop:010d}.bin"


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("vocab, index_bytes", [(65536, 2), (70000, 4)])
def test_float32_round_trip_is_exact_and_the_format_is_as_documented(tmp_path, vocab, index_bytes):
    spec = make_spec(vocab_size=vocab)
    out = built(tmp_path, spec)
    reader = cache.open_cache(out, spec)
    rows = np.array([36, 0, 9, 9, 17, 8, 23])  # unsorted, repeated, across all shards
    idx, val, hid = reader.get(rows, hidden=True)
    want_idx, want_val, want_hid = online(spec, rows)
    assert idx.dtype == torch.long and val.dtype == hid.dtype == torch.float32
    assert torch.equal(idx, want_idx) and torch.equal(val, want_val) and torch.equal(hid, want_hid)
    assert want_idx.max() > 32767  # ids with the top bit of a uint16 set survive

    # Bytes per token: ids + logits, hidden state; plus 4 bytes of CRC per row and part.
    bpt = cache.bytes_per_token(spec)
    assert bpt == {"topk": K * (index_bytes + 4), "hidden": D * 4}
    on_disk = sum(p.stat().st_size for p in out.glob("shard-*.bin"))
    assert on_disk == spec.rows * (L * (bpt["topk"] + bpt["hidden"]) + 8)

    # Read shard 1 (rows 8..15) by hand, from the layout in the module docstring.
    i_dt = np.dtype("<u2" if index_bytes == 2 else "<i4")
    rec = np.dtype([("idx", i_dt, (L, K)), ("val", "<f4", (L, K)), ("crc", "<u4"),
                    ("hid", "<f4", (L, D)), ("crc_h", "<u4")])
    recs = np.fromfile(shard_file(out, 8, 16), dtype=rec)
    w_idx, w_val, w_hid = online(spec, range(8, 16))
    assert np.array_equal(recs["idx"], w_idx.numpy()) and np.array_equal(recs["val"], w_val.numpy())
    assert np.array_equal(recs["hid"], w_hid.numpy())
    assert sorted(p.name for p in out.glob("*.json")) == ["manifest.json", *(f"{p.stem}.json" for p in sorted(out.glob("*.bin"))), "spec.json"]
    assert not list(out.glob("*.tmp"))


def test_bfloat16_rounds_to_nearest_within_two_to_the_minus_eight(tmp_path):
    spec = make_spec(values_dtype="bfloat16", hidden_dtype="bfloat16", vocab_size=4096)
    out = built(tmp_path, spec)
    rows = np.arange(spec.rows)
    idx, val, hid = cache.open_cache(out, spec).get(rows, hidden=True)
    want_idx, want_val, want_hid = online(spec, rows)
    assert torch.equal(idx, want_idx)
    for got, want in ((val, want_val), (hid, want_hid)):
        assert torch.equal(got.to(torch.bfloat16).float(), got)  # stored values are bfloat16 numbers
        assert ((got - want).abs() <= want.abs() * 2.0**-8).all()  # and the nearest ones: |err| <= 2^-8 |x|
        assert not torch.equal(got, want)
    assert cache.bytes_per_token(spec) == {"topk": K * 4, "hidden": D * 2}
    assert sum(p.stat().st_size for p in out.glob("shard-*.bin")) == spec.rows * (L * (K * 4 + D * 2) + 8)


def test_killed_build_resumes_from_its_last_complete_shard(tmp_path):
    spec = make_spec()  # shards of 8 rows: [0,8) [8,16) [16,24) [24,32) [32,37)
    out, tokens = tmp_path / "c", row_tokens(spec)
    killed = Teacher(spec, fail_after=5)  # batch_rows=4: 2 calls per shard; dies inside shard [16,24)
    with pytest.raises(KeyboardInterrupt):
        cache.build(spec, out, killed, tokens, batch_rows=4, progress=False)
    assert (out / "shard-0000000016-0000000024.bin.tmp").exists() and not (out / "manifest.json").exists()
    problems = cache.verify(out, progress=False)
    assert "the build is incomplete (2 of 5 shards done)" in problems[0]
    assert [p.split(":")[0] for p in problems[1:]] == [shard_file(out, a, b).name for a, b in ((16, 24), (24, 32), (32, 37))]
    with pytest.raises(CacheError, match=r"is incomplete \(manifest.json missing\)"):
        cache.open_cache(out, spec)

    resumed = Teacher(spec)
    assert cache.build(spec, out, resumed, tokens, batch_rows=4, progress=False)
    assert (resumed.calls, resumed.rows) == (6, 21)  # shards [16,24) [24,32) [32,37) only
    assert cache.verify(out, progress=False) == []
    clean = built(tmp_path, spec, "clean")
    for a in sorted(clean.glob("shard-*.bin")):
        assert (out / a.name).read_bytes() == a.read_bytes()

    # A damaged shard (here: truncated) found on resume is rebuilt, and only it.
    victim = shard_file(out, 8, 16)
    victim.write_bytes(victim.read_bytes()[:-100])
    again = Teacher(spec)
    assert cache.build(spec, out, again, tokens, batch_rows=4, progress=False)
    assert (again.calls, again.rows) == (2, 8)
    assert victim.read_bytes() == shard_file(clean, 8, 16).read_bytes()
    assert cache.build(spec, out, (none := Teacher(spec)), tokens, progress=False) and none.calls == 0


def test_workers_split_by_row_range_build_each_shard_once(tmp_path):
    spec = make_spec(rows_per_shard=4)  # 10 shards
    parts = [cache.task_rows(spec, t, 3) for t in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 12), (12, 24), (24, 37)]
    out, teachers, results = tmp_path / "c", [Teacher(spec) for _ in range(4)], {}

    def work(i: int, rows: range) -> None:
        results[i] = cache.build(spec, out, teachers[i], row_tokens(spec), rows, batch_rows=2, progress=False)

    threads = [threading.Thread(target=work, args=(i, r)) for i, r in enumerate(parts + [range(5, 30)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(t.rows for t in teachers) == spec.rows  # no shard computed twice
    assert any(results.values()) and (out / "manifest.json").exists()
    assert cache.verify(out, progress=False) == []
    rows = np.arange(spec.rows)
    assert torch.equal(cache.open_cache(out, spec).get(rows)[1], online(spec, rows)[1])
    with pytest.raises(ValueError, match="cache.task=3"):
        cache.task_rows(spec, 3, 3)


def test_bit_flip_and_truncation_are_caught_by_verify_and_the_reader(tmp_path):
    spec = make_spec(rows=20)  # shards [0,8) [8,16) [16,20)
    out = built(tmp_path, spec)
    assert cache_main(["verify", f"dir={out}"]) == 0
    topk = L * K * (2 + 4) + 4
    record = topk + L * D * 4 + 4
    flip_bit(shard_file(out, 8, 16), 1 * record + L * K * 2 + 50)  # row 9: a top-k logit
    flip_bit(shard_file(out, 8, 16), 2 * record + topk + 7)  # row 10: its hidden state
    reader = cache.open_cache(out, spec)  # sizes are fine: opens
    with pytest.raises(CacheError, match=r"top-k logits of rows \[9\] fail their checksum in shard-0000000008-0000000016.bin"):
        reader.get(np.array([3, 9]))
    with pytest.raises(CacheError, match=r"hidden states of rows \[10\]"):
        reader.get(np.array([10]), hidden=True)
    # Undamaged parts of the same shard are still served, and exactly.
    idx, val, hid = reader.get(np.array([8, 10, 11]), hidden=False)
    assert torch.equal(val, online(spec, [8, 10, 11])[1]) and hid is None
    assert torch.equal(reader.get(np.array([9]), topk=False, hidden=True)[2], online(spec, [9])[2])
    with pytest.raises(CacheError, match="rows \\[9\\]"):
        list(reader.iter([np.array([0, 1]), np.array([9])]))

    last = shard_file(out, 16, 20)
    last.write_bytes(last.read_bytes()[:-1])
    problems = cache.verify(out, progress=False)
    assert len(problems) == 2
    assert problems[0].startswith("shard-0000000008-0000000016.bin: sha256 mismatch")
    assert problems[1].startswith("shard-0000000016-0000000020.bin: ") and "truncated" in problems[1]
    with pytest.raises(CacheError, match="shard-0000000016-0000000020.bin"):
        cache.open_cache(out, spec)
    cli = subprocess.run([sys.executable, "-m", "hldx.cache", "verify", f"dir={out}"], capture_output=True, text=True)
    assert cli.returncode == 1
    assert "shard-0000000008-0000000016.bin" in cli.stdout and "shard-0000000016-0000000020.bin" in cli.stdout


def test_a_cache_for_something_else_is_refused_naming_the_difference(tmp_path):
    spec = make_spec(rows=10)
    out = built(tmp_path, spec)
    with pytest.raises(CacheError) as err:
        cache.open_cache(out, dataclasses.replace(spec, teacher_digest="teacher-b", k=K + 1))
    assert "teacher_digest: cache has 'teacher-a', expected 'teacher-b'" in str(err.value)
    assert f"k: cache has {K}, expected {K + 1}" in str(err.value)
    for field, value in (("tokenizer_digest", "tok-b"), ("stream_digest", "stream-b"), ("seq_len", L * 2),
                         ("values_dtype", "bfloat16"), ("hidden_layer", 2)):
        with pytest.raises(CacheError, match=f"{field}: cache has"):
            cache.open_cache(out, dataclasses.replace(spec, **{field: value}))
    with pytest.raises(CacheError, match="holds rows \\[0, 10\\) but the run needs \\[0, 12\\): 32 tokens missing"):
        cache.open_cache(out, dataclasses.replace(spec, rows=12, hidden_rows=10))
    # A KD run (no hidden states needed) may use a cache built for HLD; another build in the dir may not.
    kd = dataclasses.replace(spec, hidden_layer=None, hidden_size=0, hidden_rows=0, rows=8)
    assert cache.open_cache(out, kd).get(np.array([1]))[2] is None
    with pytest.raises(CacheError, match="rows_per_shard: cache has 8, expected 4"):
        cache.build(dataclasses.replace(spec, rows_per_shard=4), out, Teacher(spec), row_tokens(spec))
    with pytest.raises(CacheError, match="no teacher cache here"):
        cache.open_cache(tmp_path / "nothing", spec)
    assert "no teacher cache here" in cache.verify(tmp_path / "nothing", progress=False)[0]


def test_hidden_states_for_a_prefix_of_rows(tmp_path):
    spec = make_spec(rows=20, hidden_rows=11)  # shard [8,16) holds 3 rows with hidden states, 5 without
    out = built(tmp_path, spec)
    sizes = [shard_file(out, a, b).stat().st_size for a, b in ((0, 8), (8, 16), (16, 20))]
    topk, full = L * K * 6 + 4, L * K * 6 + 4 + L * D * 4 + 4
    assert sizes == [8 * full, 3 * full + 5 * topk, 4 * topk]
    reader = cache.open_cache(out, spec)
    rows = np.array([10, 0, 8])
    assert torch.equal(reader.get(rows, hidden=True)[2], online(spec, rows)[2])
    all_rows = np.arange(20)
    assert torch.equal(reader.get(all_rows)[1], online(spec, all_rows)[1])
    with pytest.raises(CacheError, match=r"rows \[0, 11\) only: 2 requested rows \(32 tokens\) are missing"):
        reader.get(np.array([3, 11, 19, 19]), hidden=True)
    with pytest.raises(CacheError, match=r"hidden states for rows \[0, 11\) but the run needs \[0, 20\): 144 tokens missing"):
        cache.open_cache(out, dataclasses.replace(spec, hidden_rows=20))
    # A KD-only cache: the teacher need not return hidden states.
    kd = make_spec(rows=9, hidden_layer=None, hidden_size=0, hidden_rows=0)
    out = tmp_path / "kd"
    assert cache.build(kd, out, Teacher(kd, hidden=False), row_tokens(kd), progress=False)
    assert cache.open_cache(out, kd).get(np.array([8]))[2] is None
    with pytest.raises(CacheError, match="16 tokens"):
        cache.open_cache(out, kd).get(np.array([8]), hidden=True)


def test_bad_input_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="cache.values_dtype='float16'"):
        make_spec(values_dtype="float16")
    with pytest.raises(ValueError, match="cache.hidden_rows=38"):
        make_spec(hidden_rows=38)
    with pytest.raises(ValueError, match="method.top_k"):
        make_spec(k=6000)
    assert cache.resolve_hidden_rows("all", 37) == 37 and cache.resolve_hidden_rows(5, 37) == 5
    with pytest.raises(ValueError, match="cache.hidden_rows='some'"):
        cache.resolve_hidden_rows("some", 37)
    spec = make_spec()
    with pytest.raises(ValueError, match=r"teacher_fn returned hidden states None; expected \(3, 16, 12\)"):
        cache.build(spec, tmp_path, Teacher(spec, hidden=False), row_tokens(spec), batch_rows=3, progress=False)


def test_config_group_composes(tmp_path, monkeypatch):
    monkeypatch.setenv("HLDX_CACHE", str(tmp_path))
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config")
        if "cache" not in cfg:  # until the root defaults list names the group
            cfg = compose("config", ["+cache=default"])
    c = cfg.cache
    assert (c.task, c.tasks, c.hidden_rows, c.dir) == (0, 1, "all", None)
    spec = make_spec(rows_per_shard=c.rows_per_shard, values_dtype=c.values_dtype, hidden_dtype=c.hidden_dtype,
                     hidden_rows=cache.resolve_hidden_rows(c.hidden_rows, 37))
    assert cache.resolve_dir(c.dir, cfg.paths.cache, spec) == tmp_path / "teacher_cache" / spec.digest
    assert spec.digest != dataclasses.replace(spec, hidden_rows=0).digest


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other (4x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_throughput_with_the_tiny_teacher_and_student(tmp_path, one_thread):
    """Prints build and read throughput and the tiny student's training consumption (one process)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    def model(name: str) -> Gemma3ForCausalLM:
        c = yaml.safe_load((ROOT / "conf" / "student" / f"{name}.yaml").read_text())
        c.pop("name")
        return Gemma3ForCausalLM(Gemma3TextConfig(**c))

    torch.manual_seed(0)
    teacher = model("tiny-teacher").eval()
    layer = teacher.config.num_hidden_layers // 2

    def teacher_fn(tokens):
        out = teacher(tokens, output_hidden_states=True)
        val, idx = out.logits.topk(128, dim=-1)
        return idx, val, out.hidden_states[layer]

    seq, n_rows = 128, 16
    stream = torch.randint(0, teacher.config.vocab_size, (n_rows, seq))
    spec = CacheSpec("t", "tok", "s", seq, n_rows, 128, teacher.config.vocab_size, layer,
                     teacher.config.hidden_size, n_rows, rows_per_shard=8)
    start = time.perf_counter()
    assert cache.build(spec, tmp_path / "c", teacher_fn, lambda r: stream[torch.as_tensor(r)], batch_rows=8, progress=False)
    build_tps = n_rows * seq / (time.perf_counter() - start)
    reader = cache.open_cache(tmp_path / "c", spec)
    with torch.inference_mode():  # the cache holds what the online teacher gives for the same batch
        idx, val, hid = teacher_fn(stream[8:16])
    c_idx, c_val, c_hid = reader.get(np.arange(8, 16), hidden=True)
    assert torch.equal(c_idx, idx)
    assert ((c_val - val).abs() <= val.abs() * 2.0**-8).all() and ((c_hid - hid).abs() <= hid.abs() * 2.0**-8).all()

    batch = 16
    order = np.random.default_rng(0).permutation(np.tile(np.arange(n_rows), 16)).reshape(-1, batch)
    start = time.perf_counter()
    for rows in order:
        reader.get(rows, hidden=True)
    read_s = time.perf_counter() - start
    read_tps = order.size * seq / read_s
    read_mbs = order.size * (seq * sum(cache.bytes_per_token(spec).values()) + 8) / read_s / 1e6

    student = model("tiny")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def step(tokens):
        loss = student(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    step(stream[:batch])  # warm-up
    waits, steps = [], 4
    start = time.perf_counter()
    batches = reader.iter(iter(order[:steps]), hidden=True)
    for s in range(steps):
        t0 = time.perf_counter()
        next(batches)
        waits.append(time.perf_counter() - t0)
        step(stream[torch.as_tensor(order[s])])
    train_tps = steps * batch * seq / (time.perf_counter() - start)
    print(f"\ncache build (tiny teacher, CPU, 1 thread): {build_tps:,.0f} tok/s; reader: {read_tps:,.0f} tok/s "
          f"({read_mbs:,.1f} MB/s, top-k + hidden, bf16); tiny student training: {train_tps:,.0f} tok/s; "
          f"waiting on the prefetcher: {waits[0] * 1e3:.1f} ms for the first batch, "
          f"{np.mean(waits[1:]) * 1e3:.2f} ms per later step")
    assert read_tps > train_tps  # the reader outpaces the student it feeds
