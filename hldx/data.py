"""Corpora, tokenizer, pre-tokenised token streams and deterministic, resumable, shardable batches.

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
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from hldx.config import digest
from hldx.errors import ConfigError

FORMAT = 1  # version of what is built; bump it to rebuild every cached tokenizer and stream
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2: Gemma3Config's pad/eos/bos defaults
CORPUS = Path(__file__).parent / "corpus"
SPLITS = ("train", "validation")
ENCODE_BATCH = 1000  # documents per encode call


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
    """Raise ConfigError for a bad data.name or data.path (both splits), without reading any text."""
    for split in SPLITS:
        source_spec(cfg, split)


def documents(cfg: DictConfig, split: str) -> Iterator[str]:
    """The texts of `split`, one per document, in corpus order."""
    _check_split(split)
    data = cfg.data
    if data.name == "embedded":
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

def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
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

def tokenizer_for(cfg: DictConfig) -> PreTrainedTokenizerFast:
    """The byte-level BPE of `cfg.data` with exactly `data.vocab_size` ids, trained once on the train split.

    Special tokens: <pad>=0, <eos>=1, <bos>=2. Nothing is added when encoding; `prepare` appends <eos>.
    """
    data = cfg.data
    if data.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"data.vocab_size={data.vocab_size} is invalid: expected at least "
                          f"{256 + len(SPECIAL_TOKENS)} (256 bytes and {len(SPECIAL_TOKENS)} special tokens)")
    spec = {"format": FORMAT, "source": source_spec(cfg, "train"), "vocab_size": data.vocab_size}
    if data.name == "c4":
        spec["documents"] = data.tokenizer_documents
    final = Path(cfg.paths.cache).expanduser() / "tokenizers" / digest(spec)
    return PreTrainedTokenizerFast.from_pretrained(_build_once(final, lambda tmp: _train_tokenizer(cfg, tmp)))


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


def prepare(cfg: DictConfig, split: str, tokenizer: PreTrainedTokenizerFast) -> Stream:
    """Tokenise `split` once into {paths.cache}/streams/<digest>/ and map it read-only.

    `data.max_{split}_tokens` (when set) truncates the stream to that many tokens.
    """
    source = source_spec(cfg, split)
    max_tokens = cfg.data[f"max_{split}_tokens"]
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"data.max_{split}_tokens={max_tokens} is invalid: expected null or an integer >= 1")
    spec = {"format": FORMAT, "source": source, "split": split,
            "tokenizer": tokenizer_digest(tokenizer), "max_tokens": max_tokens}
    key = digest(spec)
    final = Path(cfg.paths.cache).expanduser() / "streams" / key
    _build_once(final, lambda tmp: _write_stream(cfg, split, tokenizer, spec, tmp))
    meta = json.loads((final / "meta.json").read_text())
    tokens = np.memmap(final / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
    return Stream(tokens=tokens, digest=key, path=final)


def _write_stream(cfg: DictConfig, split: str, tokenizer: PreTrainedTokenizerFast, spec: dict, out: Path) -> None:
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    eos, max_tokens = tokenizer.eos_token_id, spec["max_tokens"]
    num_tokens = 0
    texts = documents(cfg, split)
    with open(out / "tokens.bin", "wb") as f, \
            tqdm(desc=f"tokenize {split}", unit="tok", unit_scale=True, total=max_tokens) as bar:
        while batch := list(itertools.islice(texts, ENCODE_BATCH)):
            encodings = tokenizer.backend_tokenizer.encode_batch_fast(batch, add_special_tokens=False)
            ids = np.fromiter(itertools.chain.from_iterable(e.ids + [eos] for e in encodings), dtype=dtype)
            if max_tokens is not None:
                ids = ids[: max_tokens - num_tokens]
            ids.tofile(f)
            num_tokens += len(ids)
            bar.update(len(ids))
            if num_tokens == max_tokens:
                break
    if num_tokens == 0:
        raise ConfigError(f"the {split} split of data.name={cfg.data.name} data.path={cfg.data.path} holds no text")
    meta = {**spec, "dtype": np.dtype(dtype).name, "num_tokens": num_tokens, "eos_token_id": eos}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


# ---- batches ------------------------------------------------------------------------------------------------

class Batches:
    """Deterministic, resumable, shardable batches of a Stream's rows.

    Training reads an endless sequence of rows: global position g = step * batch_size + j (j < batch_size)
    holds row perm_e[g % R] of epoch e = g // R, where R = stream.rows(seq_len) and perm_e is a permutation
    of range(R) seeded by (seed, e). Rank r of `world` takes j in [r * B/W, (r+1) * B/W). The order is a
    pure function of (seed, step), so resuming needs only the step; the row index keys the teacher cache.
    """

    def __init__(self, stream: Stream, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank={rank}, world={world}: expected 0 <= rank < world")
        if batch_size < 1 or batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the world size {world}")
        self.rows = stream.rows(seq_len)
        if self.rows == 0:
            raise ValueError(f"the stream at {stream.path} holds {len(stream.tokens)} tokens, "
                             f"fewer than one row of seq_len={seq_len}")
        self.tokens_RxL = stream.tokens[: self.rows * seq_len].reshape(self.rows, seq_len)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self._perms: dict[int, np.ndarray] = {}  # the permutations of the two epochs built last

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) == 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        return self._perms[epoch]

    def positions(self, step: int) -> np.ndarray:
        """This rank's row indices [batch_size // world] (int64) for optimizer step `step`."""
        if step < 0:
            raise ValueError(f"step={step}: expected >= 0")
        per_rank = self.batch_size // self.world
        g = step * self.batch_size + self.rank * per_rank + np.arange(per_rank, dtype=np.int64)
        epoch, index = np.divmod(g, self.rows)
        rows = np.empty(per_rank, dtype=np.int64)
        for e in np.unique(epoch):
            at = epoch == e
            rows[at] = self._perm(int(e))[index[at]]
        return rows

    def batch(self, step: int) -> tuple[torch.Tensor, np.ndarray]:
        """(tokens_BxL int64, row indices [B]) of this rank for step `step`, B = batch_size // world."""
        rows = self.positions(step)
        return torch.from_numpy(self.tokens_RxL[rows].astype(np.int64)), rows
