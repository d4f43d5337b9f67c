"""hldx.data: corpora, tokenizer, token streams and batches, on real text (the packaged corpus, C4-shaped shards)."""
import gzip
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hldx import data
from hldx.order import Batches, Rows, epochs, training_rows
from hldx.config import ConfigError, compose

ENGLISH = "The quick brown fox, naïve as ever, jumps over 3 lazy dogs — doesn't it?\n\tYes!"


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HLDX_CACHE", str(tmp_path / "default-cache"))


def config(cache: Path, *overrides: str):
    return compose([f"paths.cache={cache}", "data.vocab_size=512", *overrides])


def packaged(split: str) -> list[str]:
    return list(data.documents(compose(["data=embedded"]), split))


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A slice of the packaged corpus as a data.path directory, with its 512-token tokenizer (built once)."""
    root = tmp_path_factory.mktemp("small")
    train, validation = packaged("train")[:120], packaged("validation")[:15]
    write_jsonl_gz(root / "corpus" / "train.jsonl.gz", [{"text": t} for t in train])
    write_jsonl_gz(root / "corpus" / "validation.jsonl.gz", [{"text": t} for t in validation])
    cfg = config(root / "cache", f"data.path={root / 'corpus'}")
    return cfg, data.tokenizer_for(cfg), train, validation


def c4_shards(root: Path, train: list[str], validation: list[str]) -> None:
    """Write C4's layout and row schema: en/c4-{split}.NNNNN-of-NNNNN.json.gz with {text, timestamp, url}."""
    def rows(texts, split):
        return [{"text": t, "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z",
                 "url": f"https://example.org/{split}/{i}"} for i, t in enumerate(texts)]
    half = len(train) // 2
    write_jsonl_gz(root / "en" / "c4-train.00000-of-01024.json.gz", rows(train[:half], "train"))
    write_jsonl_gz(root / "en" / "c4-train.00001-of-01024.json.gz", rows(train[half:], "train"))
    write_jsonl_gz(root / "en" / "c4-validation.00000-of-00008.json.gz", rows(validation, "validation"))


# ---- corpus ----------------------------------------------------------------------------------------------

def test_packaged_corpus_is_english_and_validation_holds_out_whole_works():
    train, validation = packaged("train"), packaged("validation")
    chars_train, chars_val = sum(map(len, train)), sum(map(len, validation))
    assert 3e6 < chars_train + chars_val < 6e6
    assert 0.03 < chars_val / (chars_train + chars_val) < 0.08
    assert all(1000 <= len(d) <= 8000 for d in train + validation)
    assert "gutenberg" not in "".join(train + validation).lower()
    assert any("Is this a dagger which I see before me" in d for d in validation)  # Macbeth is held out
    train_lines = {line for d in train for line in d.splitlines()}
    long_val_lines = [line for d in validation for line in d.splitlines() if len(line) >= 40]
    assert len(long_val_lines) > 1000 and not train_lines.intersection(long_val_lines)


# ---- tokenizer ---------------------------------------------------------------------------------------------

def test_tokenizer_has_exact_vocab_and_round_trips(small):
    _, tok, train, _ = small
    assert len(tok) == 512
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    ids = tok(ENGLISH, add_special_tokens=False)["input_ids"]
    assert max(ids) < 512 and tok.decode(ids) == ENGLISH
    assert tok.decode(tok(train[3])["input_ids"]) == train[3]
    assert len(tok(train[3])["input_ids"]) < 0.6 * len(train[3].encode())  # merges were learned (bytes: 1.0)


def test_second_call_loads_from_disk(tmp_path, monkeypatch, small):
    cfg = config(tmp_path, f"data.path={small[0].data.path}")
    first = data.tokenizer_for(cfg)
    [saved] = (tmp_path / "tokenizers").glob("*/tokenizer.json")
    mtime = saved.stat().st_mtime_ns

    def retrain(*_):
        raise AssertionError("retrained a cached tokenizer")

    monkeypatch.setattr(data, "_train_tokenizer", retrain)
    second = data.tokenizer_for(cfg)
    assert data.tokenizer_digest(second) == data.tokenizer_digest(first)
    assert second(ENGLISH)["input_ids"] == first(ENGLISH)["input_ids"]
    assert saved.stat().st_mtime_ns == mtime
    # A different vocabulary is a different tokenizer.
    monkeypatch.undo()
    other = data.tokenizer_for(config(tmp_path, f"data.path={small[0].data.path}", "data.vocab_size=300"))
    assert len(other) == 300 and data.tokenizer_digest(other) != data.tokenizer_digest(first)


def test_parallel_callers_build_one_tokenizer(tmp_path, monkeypatch, small):
    cfg = config(tmp_path, f"data.path={small[0].data.path}")
    train, builds = data._train_tokenizer, []

    def counted(*args):
        builds.append(threading.get_ident())
        train(*args)

    monkeypatch.setattr(data, "_train_tokenizer", counted)
    start, digests = threading.Barrier(3), []

    def call():
        start.wait()
        digests.append(data.tokenizer_digest(data.tokenizer_for(cfg)))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(digests) == 3 and len(set(digests)) == 1
    entries = [p.name for p in (tmp_path / "tokenizers").iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and not entries[0].startswith(".")  # no temporary directory left behind


def test_small_corpus_is_filled_up_to_the_vocab_size(tmp_path):
    text = "To be, or not to be, that is the question."
    write_jsonl_gz(tmp_path / "c" / "train.jsonl.gz", [{"text": text}])
    tok = data.tokenizer_for(config(tmp_path, f"data.path={tmp_path / 'c'}", "data.vocab_size=1024"))
    assert len(tok) == 1024
    unused = {i for t, i in tok.get_vocab().items() if t.startswith("<unused")}
    assert unused and not unused.intersection(tok(text)["input_ids"])
    assert tok.decode(tok(text)["input_ids"]) == text


def test_too_small_vocab_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="data.vocab_size=100"):
        data.tokenizer_for(config(tmp_path, "data.vocab_size=100"))


# ---- streams ---------------------------------------------------------------------------------------------

def test_stream_is_documents_joined_by_eos(small):
    cfg, tok, train, validation = small
    stream = data.prepare(cfg, "train", tok)
    expected = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in train])
    assert stream.tokens.dtype == np.uint16 and len(stream.tokens) == len(expected)
    np.testing.assert_array_equal(stream.tokens, expected)
    assert (stream.tokens == tok.eos_token_id).sum() == len(train)
    with pytest.raises(ValueError):
        stream.tokens[0] = 5  # read-only
    meta = json.loads((stream.path / "meta.json").read_text())
    assert meta["num_tokens"] == len(expected) and meta["tokenizer"] == data.tokenizer_digest(tok)
    assert stream.rows(128) == len(expected) // 128
    again = data.prepare(cfg, "train", tok)
    assert (again.digest, again.path) == (stream.digest, stream.path)
    val = data.prepare(cfg, "validation", tok)
    assert val.digest != stream.digest and (val.tokens == tok.eos_token_id).sum() == len(validation)


def test_embedded_path_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path=/no/such/dir .*train.jsonl.gz"):
        data.tokenizer_for(config(tmp_path, "data.path=/no/such/dir"))
    write_jsonl_gz(tmp_path / "bad" / "train.jsonl.gz", [{"body": "no text key"}])
    with pytest.raises(ConfigError, match=r"train.jsonl.gz:1: expected a JSON object with a \"text\""):
        list(data.documents(config(tmp_path, f"data.path={tmp_path / 'bad'}"), "train"))


# ---- C4 -------------------------------------------------------------------------------------------------

def test_c4_local_shards(tmp_path):
    docs = packaged("validation")
    train, validation = docs[:36], docs[36:46]
    marker = " zyzzyvaquux" * 400  # a word that only the last training document holds
    train[-1] += marker
    c4_shards(tmp_path / "c4", train, validation)
    c4 = ["data=c4", f"data.path={tmp_path / 'c4'}"]
    cfg = config(tmp_path / "cache", *c4, "data.tokenizer_documents=35")
    assert list(data.documents(cfg, "train")) == train  # shard order, row order
    assert list(data.documents(cfg, "validation")) == validation
    tok = data.tokenizer_for(cfg)
    assert len(tok) == 512 and len(tok.tokenize(" zyzzyvaquux")) > 1  # trained on the first 35 documents only
    whole = data.tokenizer_for(config(tmp_path / "cache", *c4, "data.tokenizer_documents=1000"))
    assert len(whole.tokenize(" zyzzyvaquux")) == 1

    full = data.prepare(cfg, "train", tok)
    assert len(full.tokens) == sum(len(tok(d)["input_ids"]) + 1 for d in train)
    capped = data.prepare(config(tmp_path / "cache", *c4, "data.tokenizer_documents=35", "data.max_train_tokens=1000"),
                          "train", tok)
    assert capped.digest != full.digest and len(capped.tokens) == 1000
    np.testing.assert_array_equal(capped.tokens, full.tokens[:1000])


def test_tokenizing_in_parts_joins_to_one_processs_stream(tmp_path):
    """The train split's two files tokenized as data.tasks=3 parts (one of them empty) and joined in file order:
    the same stream, byte for byte and digest, as one process makes; truncated alike at max_train_tokens."""
    docs = packaged("validation")
    c4_shards(tmp_path / "c4", docs[:36], docs[36:46])
    c4 = ["data=c4", f"data.path={tmp_path / 'c4'}", "data.tokenizer_documents=35"]
    for cap in ([], ["data.max_train_tokens=5000"]):
        one = data.prepare(config(tmp_path / "one", *c4, *cap), "train", data.tokenizer_for(config(tmp_path / "one", *c4)))
        cfg = config(tmp_path / "parts", *c4, *cap, "data.tasks=3")
        tok = data.tokenizer_for(cfg)
        parts = [data.prepare_part(cfg, tok, i) for i in range(3)]
        assert [json.loads((p / "meta.json").read_text())["num_tokens"] > 0 for p in parts] == [False, True, True]
        joined = data.prepare(cfg, "train", tok)
        assert joined.digest == one.digest and len(one.tokens) == (5000 if cap else len(one.tokens))
        assert (joined.path / "tokens.bin").read_bytes() == (one.path / "tokens.bin").read_bytes()
        assert (joined.path / "meta.json").read_text() == (one.path / "meta.json").read_text()
    with pytest.raises(ConfigError, match="data.tasks=2 is invalid for data.path=allenai/c4: tokenizing in parts"):
        next(data.documents(config(tmp_path, "data=c4", "data.tasks=2"), "train", (1, 2)))


def test_c4_bad_paths_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="data.path=/no/such/c4 is invalid: expected a readable directory"):
        data.tokenizer_for(config(tmp_path, "data=c4", "data.path=/no/such/c4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no file matching data.train_files=en/c4-train\.\*-of-01024\.json\.gz"):
        data.prepare(config(tmp_path, "data=c4", f"data.path={tmp_path / 'empty'}"), "train", None)


def test_c4_hub_offline_error_says_what_to_do(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # What HF_HUB_OFFLINE=1 sets at import; without it the hub lookup would retry for ~25 s here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"cannot reach allenai/c4 .* Pass data.path=DIR with local shards"):
        next(data.documents(config(tmp_path, "data=c4"), "validation"))


# ---- the training order and batches -----------------------------------------------------------------------

SEQ, ROWS = 8, 37


@pytest.fixture
def stream(tmp_path):
    """ROWS rows of SEQ tokens plus a 5-token tail; token value = position, so a row is recognisable."""
    return data.Stream(tokens=np.arange(ROWS * SEQ + 5, dtype=np.uint16), digest="test", path=tmp_path)


def order(stream, seed: int, tmp_path, seq: int = SEQ) -> Rows:
    return training_rows(compose([f"paths.cache={tmp_path}", f"train.seq_len={seq}", f"data.seed={seed}"]),
                              stream)


def test_the_order_is_laid_down_once_by_data_seed(stream, tmp_path):
    rows = order(stream, 3, tmp_path)
    perm = np.random.default_rng(3).permutation(ROWS)  # the documented order
    assert rows.count == ROWS and rows.tokens_RxL.shape == (ROWS, SEQ)
    for r in (0, 5, 36):
        assert rows.tokens_RxL[r].tolist() == list(range(perm[r] * SEQ, (perm[r] + 1) * SEQ))
    assert sorted(rows.tokens_RxL[:, 0] // SEQ) == list(range(ROWS))  # every full row once; the tail dropped
    again = order(stream, 3, tmp_path)  # built once: the same file
    assert again.path == rows.path and again.digest == rows.digest
    assert (rows.path / "rows.bin").stat().st_size == ROWS * SEQ * 2
    other = order(stream, 4, tmp_path)
    assert other.digest != rows.digest and other.tokens_RxL[:, 0].tolist() != rows.tokens_RxL[:, 0].tolist()
    # `seed` (the initialisation) does not move the order: a multi-seed study shares it, and its cache.
    cfg = compose([f"paths.cache={tmp_path}", f"train.seq_len={SEQ}", "data.seed=3", "seed=9"])
    assert training_rows(cfg, stream).digest == rows.digest


def test_batches_read_the_order_in_sequence(stream, tmp_path):
    rows = order(stream, 3, tmp_path)
    batches = Batches(rows, 6)
    for step in (0, 5, 6, 7, 40):  # step 6 spans the end of epoch 0 (positions 36..41)
        assert batches.positions(step).tolist() == [g % ROWS for g in range(step * 6, step * 6 + 6)]
    tokens_BxL, idx = batches.batch(6)
    assert tokens_BxL.dtype == torch.int64 and tokens_BxL.shape == (6, SEQ)
    for row, tokens in zip(idx, tokens_BxL):
        assert tokens.tolist() == rows.tokens_RxL[row].tolist()


def test_every_row_once_per_epoch_in_the_same_order(stream, tmp_path):
    batches = Batches(order(stream, 0, tmp_path), 6)
    seen = np.concatenate([batches.positions(s) for s in range(3 * ROWS // 6 + 1)])
    passes = [seen[e * ROWS:(e + 1) * ROWS] for e in range(3)]
    assert passes[0].tolist() == passes[1].tolist() == passes[2].tolist() == list(range(ROWS))
    assert epochs(3 * ROWS, ROWS) == 3 and epochs(3 * ROWS + 1, ROWS) == 4


def test_ranks_partition_the_global_batch(stream, tmp_path):
    rows = order(stream, 0, tmp_path)
    whole = Batches(rows, 6)
    ranks = [Batches(rows, 6, rank=r, world=2) for r in range(2)]
    for step in range(15):
        parts = [b.batch(step) for b in ranks]
        assert all(p[0].shape == (3, SEQ) for p in parts)
        tokens_BxL, idx = whole.batch(step)
        assert np.concatenate([p[1] for p in parts]).tolist() == idx.tolist()
        assert torch.equal(torch.cat([p[0] for p in parts]), tokens_BxL)


def test_resume_at_step_k_matches_uninterrupted_run(stream, tmp_path):
    rows = order(stream, 7, tmp_path)
    uninterrupted = [Batches(rows, 6).positions(s).tolist() for s in range(30)]
    resumed = Batches(rows, 6)
    assert [resumed.positions(s).tolist() for s in range(17, 30)] == uninterrupted[17:]


def test_batch_larger_than_an_epoch(stream, tmp_path):
    batches = Batches(order(stream, 2, tmp_path), 80)  # one step spans three epochs
    assert batches.positions(1).tolist() == [g % ROWS for g in range(80, 160)]


def test_bad_batch_settings(stream, tmp_path):
    with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of the world size 4"):
        Batches(order(stream, 0, tmp_path), 6, rank=0, world=4)
    with pytest.raises(ConfigError, match="train.seq_len=1000 is invalid: .* fewer than one row"):
        order(stream, 0, tmp_path, seq=1000)


def test_two_tokenizing_workers_write_the_stream_of_one(tmp_path):
    """data.workers splits the documents over processes and joins them in order: the same tokens, bit for
    bit, under the same stream digest (the workers are not part of what the stream is)."""
    streams = []
    for workers in (1, 2):
        cfg = compose(["data.max_train_tokens=200000", f"data.workers={workers}", f"paths.cache={tmp_path}/cache-{workers}"])
        tokenizer = data.tokenizer_for(cfg)
        streams.append(data.prepare(cfg, "train", tokenizer))
    one, two = streams
    assert one.digest == two.digest and len(one.tokens) == 200000
    assert (one.path / "tokens.bin").read_bytes() == (two.path / "tokens.bin").read_bytes()
