"""Teacher cache: round trips, the on-disk format, resume, growing in place, concurrent workers, corruption of
any part, refusal of a cache built for something else."""

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
from cache_worker import Teacher, get, make_spec, online, row_tokens, with_extents

ROOT = Path(__file__).resolve().parents[1]
L, K, D = 16, 8, 12  # as cache_worker's


def built(tmp_path: Path, spec: CacheSpec, name: str = "c") -> Path:
    out = tmp_path / name
    assert cache.build(spec, out, Teacher(spec), row_tokens(spec), progress=False, batch_rows=3)
    return out


def shard_file(out: Path, part: str, start: int, stop: int) -> Path:
    return out / part / f"{start:010d}-{stop:010d}.bin"


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
    idx, val, hid = get(reader, rows, hidden=True)
    want_idx, want_val, want_hid = online(spec, rows)
    assert idx.dtype == torch.long and val.dtype == hid.dtype == torch.float32
    assert torch.equal(idx, want_idx) and torch.equal(val, want_val) and torch.equal(hid, want_hid)
    assert want_idx.max() > 32767  # ids with the top bit of a uint16 set survive
    assert (val <= 0).all() and (val.amax(-1) == 0).all()  # relative to each position's largest

    # Bytes per token: ids + logits, hidden state, plus 8 bytes of checksum per row and array.
    bpt = cache.bytes_per_token(spec)
    assert bpt == {"topk": K * (index_bytes + 4) + 16 / L, "hidden": D * 4 + 8 / L}
    for part in ("topk", "hidden"):
        on_disk = sum(p.stat().st_size for p in (out / part).glob("*.bin"))
        assert on_disk == spec.extent("topk") * L * bpt[part]

    # Read shard [8, 16) by hand, from the layout in hldx.store's docstring.
    w_idx, w_val, w_hid = online(spec, range(8, 16))
    raw = shard_file(out, "topk", 8, 16).read_bytes()
    ids = np.frombuffer(raw, "<u2" if index_bytes == 2 else "<i4", count=8 * L * K).reshape(8, L, K)
    vals = np.frombuffer(raw, "<f4", count=8 * L * K, offset=ids.nbytes).reshape(8, L, K)
    sums = np.frombuffer(raw, "<u8", offset=ids.nbytes + vals.nbytes).reshape(8, 2)
    assert np.array_equal(ids, w_idx.numpy()) and np.array_equal(vals, w_val.numpy())
    import xxhash
    assert sums[3, 1] == xxhash.xxh3_64_intdigest(vals[3].tobytes())
    hidden = np.frombuffer(shard_file(out, "hidden", 8, 16).read_bytes(), "<f4", count=8 * L * D).reshape(8, L, D)
    assert np.array_equal(hidden, w_hid.numpy())
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.parent.name != "locks")
    shards = [f"{part}/{a:010d}-{b:010d}.{ext}" for part in ("hidden", "topk")
              for a, b in ((0, 8), (8, 16), (16, 24), (24, 32), (32, 37)) for ext in ("bin",)]
    assert names == sorted(shards + ["spec.json"])


def test_bfloat16_rounds_to_nearest_within_two_to_the_minus_eight(tmp_path):
    spec = make_spec(values_dtype="bfloat16", hidden_dtype="bfloat16", vocab_size=4096)
    out = built(tmp_path, spec)
    rows = np.arange(spec.extent("topk"))
    idx, val, hid = get(cache.open_cache(out, spec), rows, hidden=True)
    want_idx, want_val, want_hid = online(spec, rows)
    assert torch.equal(idx, want_idx)
    for got, want in ((val, want_val), (hid, want_hid)):
        assert torch.equal(got.to(torch.bfloat16).float(), got)  # stored values are bfloat16 numbers
        assert ((got - want).abs() <= want.abs() * 2.0**-8).all()  # and the nearest ones: |err| <= 2^-8 |x|
        assert not torch.equal(got, want)
    assert cache.bytes_per_token(spec) == {"topk": K * 4 + 16 / L, "hidden": D * 2 + 8 / L}


def test_float8_hidden_states_keep_a_per_token_scale(tmp_path):
    spec = make_spec(hidden_dtype="float8_e4m3", hidden_size=64)
    out = built(tmp_path, spec)
    rows = np.arange(spec.extent("topk"))
    _, _, hid = get(cache.open_cache(out, spec), rows, topk=False, hidden=True)
    want = online(spec, rows)[2]
    # Scaled so the largest component sits at e4m3's top: each component within half a step (2^-4 relative)
    # of the largest one's scale, and the direction within a fraction of a percent.
    scale = want.abs().amax(-1, keepdim=True)
    assert ((hid - want).abs() <= 2.0**-4 * want.abs() + scale * 2.0**-9).all()
    cos = torch.nn.functional.cosine_similarity(hid, want, dim=-1)
    assert cos.min() > 0.999
    assert cache.bytes_per_token(spec)["hidden"] == 64 + 2 + 16 / L  # 1 byte a component, 2 of scale


def test_killed_build_resumes_from_its_last_complete_shard(tmp_path):
    spec = make_spec()  # shards of 8 rows: [0,8) [8,16) [16,24) [24,32) [32,37)
    out, tokens = tmp_path / "c", row_tokens(spec)
    killed = Teacher(spec, fail_after=5)  # batch_rows=4: 2 calls per shard; dies inside shard [16,24)
    with pytest.raises(KeyboardInterrupt):
        cache.build(spec, out, killed, tokens, batch_rows=4, progress=False)
    assert not list((out / "topk").glob("*.tmp-*"))  # an interrupted writer drops what it had not published
    assert cache.built_extent(out, spec, "topk") == 16
    assert cache.verify(out, progress=False) == []  # what is there is sound: a prefix
    with pytest.raises(CacheError, match=r"holds rows \[0, 16\) but the run needs \[0, 37\): 336 tokens missing"):
        cache.open_cache(out, spec)

    resumed = Teacher(spec)
    assert cache.build(spec, out, resumed, tokens, batch_rows=4, progress=False)
    assert (resumed.calls, resumed.rows) == (6, 21)  # shards [16,24) [24,32) [32,37) only
    assert cache.verify(out, progress=False) == []
    clean = built(tmp_path, spec, "clean")
    for a in sorted(clean.rglob("*.bin")):
        assert (out / a.relative_to(clean)).read_bytes() == a.read_bytes()

    # A damaged shard (here: truncated) found on resume is set aside and written again, and only it.
    victim = shard_file(out, "topk", 8, 16)
    victim.write_bytes(victim.read_bytes()[:-100])
    again = Teacher(spec)
    assert cache.build(spec, out, again, tokens, batch_rows=4, progress=False)
    assert (again.calls, again.rows) == (2, 8)
    assert victim.read_bytes() == shard_file(clean, "topk", 8, 16).read_bytes()
    assert [p.name.split(".")[1] for p in (out / "topk").glob("*damaged*")] == ["bin"]
    assert cache.build(spec, out, (none := Teacher(spec)), tokens, progress=False) and none.calls == 0


def test_a_cache_grows_in_place_for_a_job_that_reads_further(tmp_path):
    small = make_spec(rows=13, hidden_rows=5)
    out = built(tmp_path, small)
    big = make_spec(rows=20, hidden_rows=11)
    grower = Teacher(big)
    assert cache.build(big, out, grower, row_tokens(big), batch_rows=8, progress=False)
    # Only the missing rows, as new shards beside the old ones (never rewritten): top-k [13,16) and [16,20),
    # hidden [5,8) and [8,11); one teacher pass per block serves both parts: [5,8) (hidden alone),
    # [8,16) (top-k from 13, hidden to 11), [16,20) (top-k).
    assert grower.rows == 3 + 8 + 4
    assert sorted(p.name for p in (out / "topk").glob("*.bin")) == [
        "0000000000-0000000008.bin", "0000000008-0000000013.bin", "0000000013-0000000016.bin",
        "0000000016-0000000020.bin"]
    assert sorted(p.name for p in (out / "hidden").glob("*.bin")) == [
        "0000000000-0000000005.bin", "0000000005-0000000008.bin", "0000000008-0000000011.bin"]
    assert cache.verify(out, progress=False) == []
    reader = cache.open_cache(out, big)
    rows = np.arange(20)
    assert torch.equal(get(reader, rows)[1], online(big, rows)[1])
    assert torch.equal(get(reader, np.arange(11), topk=False, hidden=True)[2], online(big, range(11))[2])
    assert cache.open_cache(out, small).spec.extent("topk") == 20  # a smaller job opens it too, and sees what is there


def test_a_format_2_cache_is_read_grown_and_collected(tmp_path):
    """A cache of format 2 (aligned shards with .json records, a short last shard rebuilt longer when grown)
    is read as it is; gc removes the superseded short shard and its record, and nothing a reader needs."""
    small = make_spec(rows=13, hidden_rows=13)
    out = built(tmp_path, small)
    spec_json = out / "spec.json"
    spec_json.write_text(spec_json.read_text().replace("hldx-teacher-cache/3", "hldx-teacher-cache/2"))
    for path in out.glob("*/*.bin"):
        a, b = map(int, path.stem.split("-"))
        path.with_suffix(".json").write_text(f'{{"start_row": {a}, "end_row": {b}, "bytes": {path.stat().st_size}}}')
    big = make_spec(rows=16, hidden_rows=16)
    full = built(tmp_path, big, "full")
    for part in ("topk", "hidden"):  # as format 2 grew it: [8,16) written beside [8,13)
        (out / part / "0000000008-0000000016.bin").write_bytes((full / part / "0000000008-0000000016.bin").read_bytes())
    reader = cache.open_cache(out, big)
    assert reader.spec.extent("topk") == 16 and [s for _, s in reader.cover["topk"]] == [range(0, 8), range(8, 16)]
    assert cache_main(["gc", f"dir={out}"]) == 0
    assert sorted(p.name for p in (out / "topk").iterdir()) == [
        "0000000000-0000000008.bin", "0000000000-0000000008.json", "0000000008-0000000016.bin"]
    assert torch.equal(get(reader, np.arange(16))[1], online(big, range(16))[1])
    assert cache.verify(out, progress=False) == []


def test_workers_split_by_shards_build_each_shard_once(tmp_path):
    spec = make_spec(rows_per_shard=4)  # 10 shards
    parts = [cache.task_shards(spec, t, 3) for t in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 10)]
    out, teachers, results = tmp_path / "c", [Teacher(spec) for _ in range(4)], {}

    def work(i: int, shards: range) -> None:
        results[i] = cache.build(spec, out, teachers[i], row_tokens(spec), shards, batch_rows=2, progress=False)

    threads = [threading.Thread(target=work, args=(i, r)) for i, r in enumerate(parts + [range(1, 8)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(t.rows for t in teachers) == spec.extent("topk")  # no shard computed twice
    assert any(results.values()) and cache.verify(out, progress=False) == []
    rows = np.arange(spec.extent("topk"))
    assert torch.equal(get(cache.open_cache(out, spec), rows)[1], online(spec, rows)[1])
    with pytest.raises(ValueError, match="cache.task=3"):
        cache.task_shards(spec, 3, 3)


@pytest.mark.parametrize("part, offset, name", [
    ("topk", 1 * L * K * 2 + 50, "ids of rows \\[9\\]"),                 # row 9's top-k ids
    ("topk", 8 * L * K * 2 + 2 * L * K * 4 + 7, "values of rows \\[10\\]"),  # row 10's logits
    ("hidden", 3 * L * D * 1 + 5, "hidden of rows \\[11\\]"),             # row 11's float8 state
    ("hidden", 8 * L * D + 4 * L * 2 + 1, "scale of rows \\[12\\]"),       # row 12's scales
    ("topk", 8 * L * K * 6 + 5 * 16 + 2, "ids of rows \\[13\\]"),           # the checksum table, row 13
])
def test_a_flipped_bit_in_any_part_is_caught_and_named(tmp_path, part, offset, name):
    spec = make_spec(rows=20, hidden_dtype="float8_e4m3")  # shards [0,8) [8,16) [16,20)
    out = built(tmp_path, spec)
    assert cache_main(["verify", f"dir={out}"]) == 0
    flip_bit(shard_file(out, part, 8, 16), offset)
    reader = cache.open_cache(out, spec)  # sizes are fine: opens
    rows = np.arange(8, 16)
    with pytest.raises(CacheError, match=f"{name} fail their checksum in {part}/0000000008-0000000016.bin"):
        get(reader, rows, topk=part == "topk", hidden=part == "hidden")
    (problem,) = cache.verify(out, progress=False)
    assert problem.startswith(f"{part}/0000000008-0000000016.bin: ") and "fail their checksum" in problem
    # The other part, and the other shards, are still served exactly.
    other = "hidden" if part == "topk" else "topk"
    assert get(reader, np.arange(0, 20), topk=other == "topk", hidden=other == "hidden") is not None
    cli = subprocess.run([sys.executable, "-m", "hldx.cache", "verify", f"dir={out}"], capture_output=True, text=True)
    assert cli.returncode == 1 and f"{part}/0000000008-0000000016.bin" in cli.stdout


def test_truncation_is_caught_by_verify_and_on_open(tmp_path):
    spec = make_spec(rows=20)
    out = built(tmp_path, spec)
    last = shard_file(out, "hidden", 16, 20)
    last.write_bytes(last.read_bytes()[:-1])
    (problem,) = cache.verify(out, progress=False)
    assert problem.startswith("hidden/0000000016-0000000020.bin: ") and "truncated" in problem
    with pytest.raises(CacheError, match="hidden/0000000016-0000000020.bin"):
        cache.open_cache(out, spec)


def test_a_cache_for_something_else_is_refused_naming_the_difference(tmp_path):
    spec = make_spec(rows=10)
    out = built(tmp_path, spec)
    with pytest.raises(CacheError) as err:
        cache.open_cache(out, dataclasses.replace(spec, teacher_digest="teacher-b", k=K + 1))
    assert "teacher_digest: cache has 'teacher-a', expected 'teacher-b'" in str(err.value)
    assert f"k: cache has {K}, expected {K + 1}" in str(err.value)
    for field, value in (("tokenizer_digest", "tok-b"), ("stream_digest", "rows-b"), ("seq_len", L * 2),
                         ("values_dtype", "bfloat16"), ("hidden_layer", 2), ("hidden_dtype", "bfloat16")):
        with pytest.raises(CacheError, match=f"{field}: cache has"):
            cache.open_cache(out, dataclasses.replace(spec, **{field: value}))
    with pytest.raises(CacheError, match="holds rows \\[0, 10\\) but the run needs \\[0, 12\\): 32 tokens missing"):
        cache.open_cache(out, with_extents(spec, rows=12))
    kd = with_extents(spec, 8, layers=())  # a KD run needs no hidden states
    assert get(cache.open_cache(out, kd), np.array([1]))[2] is None
    with pytest.raises(CacheError, match="rows_per_shard: cache has 8, expected 4"):
        cache.build(dataclasses.replace(spec, rows_per_shard=4), out, Teacher(spec), row_tokens(spec))
    with pytest.raises(CacheError, match="no teacher cache here"):
        cache.open_cache(tmp_path / "nothing", spec)
    assert "no teacher cache here" in cache.verify(tmp_path / "nothing", progress=False)[0]


def test_hidden_states_for_a_prefix_of_rows(tmp_path):
    spec = make_spec(rows=20, hidden_rows=11)  # hidden shards [0,8) [8,11)
    out = built(tmp_path, spec)
    assert sorted(p.name for p in (out / "hidden").glob("*.bin")) == [
        "0000000000-0000000008.bin", "0000000008-0000000011.bin"]
    reader = cache.open_cache(out, spec)
    rows = np.array([10, 0, 8])
    assert torch.equal(get(reader, rows, hidden=True)[2], online(spec, rows)[2])
    with pytest.raises(CacheError, match=r"states after layer 3 for rows \[0, 11\): rows \[11, 12\) were asked for \(16 "):
        get(reader, np.array([3, 11, 19]), hidden=True)
    with pytest.raises(CacheError, match=r"states after layer 3 for rows \[0, 11\) but the run needs \[0, 20\): 144 tokens"):
        cache.open_cache(out, with_extents(spec, 20, 20))
    # A KD-only cache: the teacher need not return hidden states.
    kd = make_spec(rows=9, hidden_rows=0)
    out = tmp_path / "kd"
    assert cache.build(kd, out, Teacher(kd, hidden=False), row_tokens(kd), progress=False)
    assert not list((out / "hidden").glob("*.bin"))
    assert get(cache.open_cache(out, kd), np.array([8]))[2] is None


def test_bad_input_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="cache.values_dtype='int8'"):
        make_spec(values_dtype="int8")
    with pytest.raises(ValueError, match="cache.hidden_dtype='float4'"):
        make_spec(hidden_dtype="float4")
    with pytest.raises(ValueError, match="method.top_k"):
        make_spec(k=6000)
    spec = make_spec()
    with pytest.raises(ValueError, match=r"teacher_fn returned hidden states after layer 3 None; expected \(\(3, 16, 12\),\)"):
        cache.build(spec, tmp_path, Teacher(spec, hidden=False), row_tokens(spec), batch_rows=3, progress=False)


def test_config_group_composes(tmp_path, monkeypatch):
    monkeypatch.setenv("HLDX_CACHE", str(tmp_path))
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config")
    c = cfg.cache
    assert (c.task, c.tasks, c.rows, c.hidden_rows, c.dir) == (0, 1, "auto", "auto", None)
    spec = make_spec(rows_per_shard=c.rows_per_shard, values_dtype=c.values_dtype, hidden_dtype=c.hidden_dtype)
    assert spec.digest == with_extents(spec, 3, 0, layers=(3, 5)).digest  # extents and layers are not identity
    assert spec.digest != dataclasses.replace(spec, hidden_dtype="float8_e4m3").digest


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other (4x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_throughput_with_the_tiny_teacher(tmp_path, one_thread):
    """Prints the cache's build and read throughput with the tiny teacher's shapes (one process)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    c = yaml.safe_load((ROOT / "conf" / "student" / "tiny-teacher.yaml").read_text())
    c.pop("name")
    torch.manual_seed(0)
    teacher = Gemma3ForCausalLM(Gemma3TextConfig(**c)).eval()
    layer = teacher.config.num_hidden_layers // 2

    def teacher_fn(tokens, parts=("topk", "hidden")):
        out = teacher(tokens, output_hidden_states=True)
        val, idx = out.logits.topk(128, dim=-1)
        return {"topk": (idx, val), "hidden": (out.hidden_states[layer],)}

    seq, n_rows = 128, 16
    stream = torch.randint(0, teacher.config.vocab_size, (n_rows, seq))
    spec = CacheSpec("t", "tok", "s", seq, 128, teacher.config.vocab_size, layer, teacher.config.hidden_size,
                     values_dtype="bfloat16", hidden_dtype="bfloat16", rows_per_shard=8,
                     extents={"topk": n_rows, "hidden": n_rows})
    start = time.perf_counter()
    assert cache.build(spec, tmp_path / "c", teacher_fn, lambda r: stream[torch.as_tensor(r)], batch_rows=8,
                       progress=False)
    build_tps = n_rows * seq / (time.perf_counter() - start)
    reader = cache.open_cache(tmp_path / "c", spec)
    with torch.inference_mode():  # the cache holds what the teacher gives for the same batch
        (idx, val), (hid,) = teacher_fn(stream[8:16]).values()
    c_idx, c_val, c_hid = get(reader, np.arange(8, 16), hidden=True)
    rel = val - val[..., :1]
    assert torch.equal(c_idx, idx)
    assert ((c_val - rel).abs() <= rel.abs() * 2.0**-8).all() and ((c_hid - hid).abs() <= hid.abs() * 2.0**-8).all()
    out = reader.buffers("hidden", 8) + reader.buffers("topk", 8)
    start, rounds = time.perf_counter(), 32
    for r in range(rounds):
        reader.read_into("topk", 8 * (r % 2), out[1:])
        reader.read_into("hidden", 8 * (r % 2), out[:1])
    read_tps = rounds * 8 * seq / (time.perf_counter() - start)
    print(f"\ncache build (tiny teacher, CPU, 1 thread): {build_tps:,.0f} tok/s; reader (top-k + hidden, bf16): "
          f"{read_tps:,.0f} tok/s ({read_tps * sum(cache.bytes_per_token(spec).values()) / 1e6:,.0f} MB/s)")
