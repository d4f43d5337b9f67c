"""Corpora, tokenizer and pre-tokenised token streams (hldx.order lays down the training order over them).

Sources (`data.name`):
  embedded  public-domain English shipped in hldx/corpus (see its README), or `data.path=DIR` holding
            train.jsonl.gz and validation.jsonl.gz with one {"text": ...} object per line.
  c4        English C4 streamed by `datasets`: local shards when `data.path` is a directory in C4's layout
            (en/c4-{split}.NNNNN-of-NNNNN.json.gz, rows {text, timestamp, url}), else the hub id `data.path`.

What is built is content-addressed under `paths.cache`: tokenizers/<digest>/ (save_pretrained) and
streams/<digest>/ (tokens.bin + meta.json). Each is built once, under a file lock, into a temporary
directory that is renamed into place, so parallel jobs never race and a crash leaves nothing half-made.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from omegaconf import DictConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hldx.config import digest
from hldx.errors import ConfigError
from hldx.progress import Progress

FORMAT = 1  # version of what is built; bump it to rebuild every cached tokenizer and stream
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2: Gemma3Config's pad/eos/bos defaults
CORPUS = Path(__file__).parent / "corpus"
SPLITS = ("train", "validation")
ENCODE_BATCH = 1000  # documents per encode call
log = logging.getLogger("hldx")


# ---- sources ----------------------------------------------------------------------------------------

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")


def _embedded_file(data: DictConfig, split: str) -> Path:
    root = CORPUS if data.path is None else Path(data.path).expanduser()
    file = root / f"{split}.jsonl.gz"
    if not (root.is_dir() and file.is_file() and os.access(file, os.R_OK)):
        raise ConfigError(f"data.path={data.path} is invalid: expected a readable directory holding {file.name} "
                          "(one JSON object {\"text\": ...} per line), or data.path=null for the packaged corpus")
    return file


def _c4_local_dir(data: DictConfig) -> Path | None:
    """The local shard directory, or None when `data.path` is a hub id (owner/name, not on disk)."""
    path = Path(data.path).expanduser()
    if not path.exists() and not str(data.path).startswith(("/", ".", "~")):
        return None
    if not (path.is_dir() and os.access(path, os.R_OK | os.X_OK)):
        raise ConfigError(f"data.path={data.path} is invalid: expected a readable directory of C4 shards "
                          "(en/c4-{train,validation}.NNNNN-of-NNNNN.json.gz) or a hub id such as allenai/c4")
    return path


def _c4_files(data: DictConfig, root: Path, split: str) -> list[Path]:
    pattern = data[f"{split}_files"]
    files = sorted(root.glob(pattern))
    if not files:
        raise ConfigError(f"data.path={data.path} holds no file matching data.{split}_files={pattern}: expected "
                          f"C4 shards such as {root}/en/c4-{split}.00000-of-01024.json.gz")
    return files


def source_spec(cfg: DictConfig, split: str) -> dict:
    """What `split` of `cfg.data` is read from, as a JSON-able dict (it keys the caches).

    Raises ConfigError for a bad `data.name` or `data.path`, without reading any text.
    """
    _check_split(split)
    data = cfg.data
    if data.name == "embedded":
        file = _embedded_file(data, split)
        return {"name": "embedded", "file": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    if data.name == "c4":
        root = _c4_local_dir(data)
        if root is None:
            return {"name": "c4", "hub": data.path, "files": data[f"{split}_files"]}
        files = _c4_files(data, root, split)
        return {"name": "c4", "files": [[str(f.relative_to(root)), f.stat().st_size] for f in files]}
    raise ConfigError(f"data.name={data.name} is invalid: expected embedded or c4")


def check(cfg: DictConfig) -> None:
    """Raise ConfigError for a bad data.name or data.path (both splits) or data.tasks, without reading any text."""
    for split in SPLITS:
        source_spec(cfg, split)
    _check_parts(cfg.data, cfg.data.tasks)


def _check_parts(data: DictConfig, parts: int) -> None:
    """Tokenizing in several parts needs the files on disk."""
    if parts > 1 and data.name == "c4" and _c4_local_dir(data) is None:
        raise ConfigError(f"data.tasks={parts} is invalid for data.path={data.path}: tokenizing in parts needs "
                          f"local files (data.path=DIR), or data.tasks=1")


def documents(cfg: DictConfig, split: str, part: tuple[int, int] = (0, 1)) -> Iterator[str]:
    """The texts of `split`, one per document, in corpus order; `part` (i, n): those of the i-th of n blocks of
    its files (local files only; the embedded corpus is one file, in part 0)."""
    _check_split(split)
    data = cfg.data
    i, n = part
    _check_parts(data, n)
    if data.name == "embedded":
        if i > 0:  # one file: part 0's
            return
        file = _embedded_file(data, split)
        with gzip.open(file, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise ConfigError(f"{file}:{n}: expected a JSON object with a \"text\" string")
                yield text
        return
    from datasets import load_dataset  # slow import, needed for C4 only

    cache_dir = str(Path(cfg.paths.cache).expanduser() / "datasets")  # datasets' own lock files and metadata
    root = _c4_local_dir(data)
    if root is not None:
        files = [str(f) for f in _c4_files(data, root, split)]
        files = files[len(files) * i // n: len(files) * (i + 1) // n]
        if not files:
            return
        rows = load_dataset("json", data_files={split: files}, split=split, streaming=True, cache_dir=cache_dir)
        yield from (row["text"] for row in rows)
        return
    pattern = data[f"{split}_files"]
    try:
        rows = load_dataset(data.path, data_files={split: pattern}, split=split, streaming=True, cache_dir=cache_dir)
        yield from (row["text"] for row in rows)
    except OSError as e:  # ConnectionError offline, FileNotFoundError for a pattern the hub lacks
        raise ConfigError(f"cannot reach {data.path} (data.{split}_files={pattern}) on the Hugging Face Hub: {e}. "
                          "Offline? Pass data.path=DIR with local shards in C4's layout "
                          f"(DIR/en/c4-{split}.NNNNN-of-NNNNN.json.gz)") from e


# ---- building once ------------------------------------------------------------------------------------

def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Make directory `final` by `build(tmp)` exactly once across processes; return it."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{final}.lock"):
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
            try:
                build(tmp)
                tmp.rename(final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


# ---- tokenizer ------------------------------------------------------------------------------------------

def _tokenizer_dir(cfg: DictConfig) -> Path:
    data = cfg.data
    spec = {"format": FORMAT, "source": source_spec(cfg, "train"), "vocab_size": data.vocab_size}
    if data.name == "c4":
        spec["documents"] = data.tokenizer_documents
    return Path(cfg.paths.cache).expanduser() / "tokenizers" / digest(spec)


def tokenizer_for(cfg: DictConfig) -> PreTrainedTokenizerFast:
    """The byte-level BPE of `cfg.data` with exactly `data.vocab_size` ids, trained once on the train split.

    Special tokens: <pad>=0, <eos>=1, <bos>=2. Nothing is added when encoding; `prepare` appends <eos>.
    """
    data = cfg.data
    if data.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"data.vocab_size={data.vocab_size} is invalid: expected at least "
                          f"{256 + len(SPECIAL_TOKENS)} (256 bytes and {len(SPECIAL_TOKENS)} special tokens)")
    final = _tokenizer_dir(cfg)
    return PreTrainedTokenizerFast.from_pretrained(build_once(final, lambda tmp: _train_tokenizer(cfg, tmp)))


def _train_tokenizer(cfg: DictConfig, out: Path) -> None:
    vocab_size = cfg.data.vocab_size
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = documents(cfg, "train")
    if cfg.data.name == "c4":
        texts = itertools.islice(texts, cfg.data.tokenizer_documents)
    bpe.train_from_iterator(texts, trainer)
    # A corpus too small to learn vocab_size tokens: fill up with never-produced tokens so ids match the model.
    bpe.add_special_tokens([f"<unused{i}>" for i in range(vocab_size - bpe.get_vocab_size())])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", clean_up_tokenization_spaces=False)
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    tokenizer.save_pretrained(out)


def built_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerFast | None:
    """The data's tokenizer if it has been trained already (tokenizer_for trains it), else None."""
    final = _tokenizer_dir(cfg)
    return PreTrainedTokenizerFast.from_pretrained(final) if final.is_dir() else None


def tokenizer_digest(tokenizer: PreTrainedTokenizerFast) -> str:
    """A content hash of the tokenizer's model, pre-/post-processing and special tokens."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)  # runtime settings that transformers toggles per call
    state.pop("padding", None)
    return digest(state)


# ---- token streams ----------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Stream:
    """One split as a flat array of token ids, each document followed by <eos>."""

    tokens: np.ndarray  # read-only np.memmap [num_tokens], uint16 (vocab <= 65536) or uint32
    digest: str
    path: Path  # the directory holding tokens.bin and meta.json

    def rows(self, seq_len: int) -> int:
        """Number of full, non-overlapping rows of seq_len tokens (the tail is dropped)."""
        return len(self.tokens) // seq_len


def _stream_dir(cfg: DictConfig, split: str, tokenizer: PreTrainedTokenizerFast) -> tuple[Path, dict]:
    spec = {"format": FORMAT, "source": source_spec(cfg, split), "split": split,
            "tokenizer": tokenizer_digest(tokenizer), "max_tokens": cfg.data[f"max_{split}_tokens"]}
    return Path(cfg.paths.cache).expanduser() / "streams" / digest(spec), spec


def prepare(cfg: DictConfig, split: str, tokenizer: PreTrainedTokenizerFast) -> Stream:
    """Tokenise `split` once into {paths.cache}/streams/<digest>/ and map it read-only: the train split joined
    from its data.tasks parts when `prepare_part` has built them all (the same bytes), else here.

    `data.max_{split}_tokens` (when set) truncates the stream to that many tokens.
    """
    final, spec = _stream_dir(cfg, split, tokenizer)
    parts = [_part_dir(final, i, cfg.data.tasks) for i in range(cfg.data.tasks)] if split == "train" else []
    if len(parts) > 1 and all(p.is_dir() for p in parts):
        build_once(final, lambda tmp: _join(parts, spec, tmp))
    build_once(final, lambda tmp: _write_stream(cfg, split, tokenizer, spec, tmp))
    meta = json.loads((final / "meta.json").read_text())
    tokens = np.memmap(final / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
    return Stream(tokens=tokens, digest=final.name, path=final)


def _part_dir(final: Path, i: int, n: int) -> Path:
    return final.parent / f"{final.name}.parts" / f"{i:05d}-of-{n:05d}"


def prepare_part(cfg: DictConfig, tokenizer: PreTrainedTokenizerFast, i: int) -> Path:
    """Tokenise the train split's i-th of data.tasks blocks of files once (a SLURM array task of the tokenize
    stage), untruncated, beside its stream; `prepare` joins the parts in file order."""
    final, spec = _stream_dir(cfg, "train", tokenizer)
    part = (i, cfg.data.tasks)
    return build_once(_part_dir(final, *part), lambda tmp: _write_stream(cfg, "train", tokenizer,
                                                                           {**spec, "max_tokens": None}, tmp, part))


def _join(parts: list[Path], spec: dict, out: Path) -> None:
    """The stream from its parts, in order, truncated at spec's max_tokens: the bytes one process writes."""
    metas = [json.loads((p / "meta.json").read_text()) for p in parts]
    left = spec["max_tokens"]
    with open(out / "tokens.bin", "wb") as f:
        for part, meta in zip(parts, metas):
            if meta["num_tokens"] == 0 or left == 0:
                continue
            tokens = np.memmap(part / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
            if left is not None:
                tokens = tokens[:left]
                left -= len(tokens)
            tokens.tofile(f)
    num_tokens = (out / "tokens.bin").stat().st_size // np.dtype(metas[0]["dtype"]).itemsize
    if num_tokens == 0:
        raise ConfigError("the train split's parts hold no text")
    meta = {**spec, "dtype": metas[0]["dtype"], "num_tokens": num_tokens, "eos_token_id": metas[0]["eos_token_id"]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("joined %d parts of the train split: %d tokens", len(parts), num_tokens)


def train_tokens(cfg: DictConfig) -> tuple[int | None, bool]:
    """How many tokens the train stream holds, and whether that is exact: the built stream's count, else
    the smaller of data.max_train_tokens and data.train_tokens (an estimate; None if neither is set).
    Reads no text: a stream that is not built yet is not built here."""
    if _tokenizer_dir(cfg).is_dir():
        final, _ = _stream_dir(cfg, "train", PreTrainedTokenizerFast.from_pretrained(_tokenizer_dir(cfg)))
        if (final / "meta.json").exists():
            return json.loads((final / "meta.json").read_text())["num_tokens"], True
    bounds = [v for v in (cfg.data.max_train_tokens, cfg.data.get("train_tokens")) if v is not None]
    return (int(min(bounds)) if bounds else None), False


_WORKER_TOKENIZER: list = []


def _start_encoder(tokenizer_json: str) -> None:
    _WORKER_TOKENIZER[:] = [Tokenizer.from_str(tokenizer_json)]


def _encode(batch: list[str]) -> list[list[int]]:
    """One batch of documents' ids (a tokenizing worker's job)."""
    return [e.ids for e in _WORKER_TOKENIZER[0].encode_batch_fast(batch, add_special_tokens=False)]


def _encoded(cfg: DictConfig, split: str, tokenizer: PreTrainedTokenizerFast, part: tuple[int, int] = (0, 1)
             ) -> Iterator[list[list[int]]]:
    """The ids of `split`'s documents (of `part`), batch by batch in corpus order: encoded here, or by
    data.workers processes (ordered: the same stream, bit for bit)."""
    texts = documents(cfg, split, part)
    batches = iter(lambda: list(itertools.islice(texts, ENCODE_BATCH)), [])
    workers = cfg.data.workers
    if workers == 1:
        yield from ([e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(b, add_special_tokens=False)]
                    for b in batches)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _start_encoder, (tokenizer.backend_tokenizer.to_str(),)) \
            as pool:
        yield from pool.imap(_encode, batches)


def _write_stream(cfg: DictConfig, split: str, tokenizer: PreTrainedTokenizerFast, spec: dict, out: Path,
                  part: tuple[int, int] = (0, 1)) -> None:
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    eos, max_tokens = tokenizer.eos_token_id, spec["max_tokens"]
    num_tokens, start = 0, time.perf_counter()
    with open(out / "tokens.bin", "wb") as f, \
            Progress(desc=f"tokenize {split}" + (f" part {part[0]} of {part[1]}" if part[1] > 1 else ""),
                     unit="tok", unit_scale=True, total=max_tokens) as bar:
        for batch in _encoded(cfg, split, tokenizer, part):
            ids = np.fromiter(itertools.chain.from_iterable(doc + [eos] for doc in batch), dtype=dtype)
            if max_tokens is not None:
                ids = ids[: max_tokens - num_tokens]
            ids.tofile(f)
            num_tokens += len(ids)
            bar.update(len(ids))
            if num_tokens == max_tokens:
                break
    rate = num_tokens / (time.perf_counter() - start)
    log.info("tokenized %s: %d tokens at %.0f tokens/s, %.0f per worker (data.workers=%d)", split, num_tokens, rate,
             rate / cfg.data.workers, cfg.data.workers)
    if num_tokens == 0 and part[1] == 1:
        raise ConfigError(f"the {split} split of data.name={cfg.data.name} data.path={cfg.data.path} holds no text")
    meta = {**spec, "dtype": np.dtype(dtype).name, "num_tokens": num_tokens, "eos_token_id": eos}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
