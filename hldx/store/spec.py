"""What a teacher cache holds (its spec), how its values are encoded, and where each byte of a shard lies."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import torch
import xxhash

from hldx.errors import UserError
from hldx.store import codec, sampled

VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HIDDEN_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float8_e4m3": torch.float8_e4m3fn,
                 "sr2": torch.uint8}
UNIT_CODES = ("sr2",)  # hidden dtypes holding an unbiased code of each token's unit vector (hldx.store.codec)
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
# What a part of a cache holds: the teacher's logits (its top-k, or ids drawn from its distribution: the spec's
# `logits`), or its hidden states after one layer. A part is a directory of shards named by its kind (`topk`,
# `sampled`; `hidden-<layer>`, `hidden` for the spec's hidden_layer). A new kind of part is a name here, its arrays
# in `fields`, its codec in `encode` / `decode`, its outputs' check in hldx.store.write.
LOGITS = ("topk", "sampled")  # cache.logits: the kinds of part that hold the teacher's logits, one per cache
KINDS = (*LOGITS, "hidden")
SAMPLED = ("logits", "taus")  # the identity of a sampled cache (hldx.store.sampled), beyond a top-k cache's


class CacheError(UserError, RuntimeError):
    """A cache that cannot serve the request: built for something else, incomplete, or damaged."""


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """A cache of a teacher's outputs on the rows of a training order, in parts (KINDS): its logits (`logits`: the
    top k ids and logits, or k ids drawn per position with the log-normalisers at `taus`), the hidden state after
    each teacher layer a study reads; `extents` says for which rows [0, n) of each part a job needs it. Every field
    but the extents is the cache's identity (its directory; a top-k cache's without the sampled fields, as before
    sampled caches existed), which names no layer but `hidden_layer`, the layer of the part called `hidden` (the
    teacher's middle: the part every cache has had): a cache holds any layers, and grows in place to larger
    extents and to further layers."""

    teacher_digest: str
    tokenizer_digest: str
    stream_digest: str        # the training rows (hldx.order.Rows), in their order
    seq_len: int
    k: int                    # ids per position: the top k, or the draws of a sampled cache (cache.draws)
    vocab_size: int
    hidden_layer: int
    hidden_size: int
    values_dtype: str = "bfloat16"
    hidden_dtype: str = "bfloat16"
    rows_per_shard: int = 1024
    logits: str = "topk"                       # the part holding the teacher's logits (LOGITS)
    taus: tuple[float, ...] = (0.5, 1.0, 2.0)  # sampled: the grid whose log-normalisers are stored, increasing
    extents: dict[str, int] = dataclasses.field(default_factory=dict)   # part -> rows [0, n): not the identity

    def __post_init__(self) -> None:
        for key in ("seq_len", "k", "vocab_size", "hidden_layer", "hidden_size", "rows_per_shard"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CacheSpec.{key} must be a positive integer, got {value!r}")
        if self.logits not in LOGITS:
            raise ValueError(f"cache.logits={self.logits!r}: choose one of {', '.join(LOGITS)}")
        if self.k > self.vocab_size:
            key = "method.top_k" if self.logits == "topk" else "cache.draws"
            raise ValueError(f"CacheSpec.k={self.k} ({key}) exceeds vocab_size={self.vocab_size}")
        taus = tuple(sorted({float(t) for t in self.taus}))
        if not taus or taus[0] <= 0:
            raise ValueError(f"cache.taus={list(self.taus)!r}: a non-empty list of temperatures > 0")
        object.__setattr__(self, "taus", taus)
        for key, allowed in (("values_dtype", VALUE_DTYPES), ("hidden_dtype", HIDDEN_DTYPES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"cache.{key}={getattr(self, key)!r}: choose one of {sorted(allowed)}")
        if self.hidden_dtype == "sr2" and self.hidden_size % codec.BLOCK:
            raise ValueError(f"cache.hidden_dtype=sr2 needs a hidden size divisible by {codec.BLOCK}, "
                             f"got {self.hidden_size}")
        for part, n in self.extents.items():
            if not is_part(self, part):
                raise ValueError(f"CacheSpec.extents: no part is called {part!r} (topk, hidden, hidden-<layer>)")
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"CacheSpec.extents[{part!r}] must be a row count >= 0, got {n!r}")

    def identity(self) -> dict:
        """Every field but the extents; a top-k cache's as it was before sampled caches existed (without
        SAMPLED)."""
        skip = {"extents", *(SAMPLED if self.logits == "topk" else ())}
        return {k: list(v) if k == "taus" else v for k, v in dataclasses.asdict(self).items() if k not in skip}

    @property
    def digest(self) -> str:
        """Content address of the cache: a hash of its identity (not of its extents)."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def extent(self, part: str) -> int:
        return self.extents.get(part, 0)


def hidden_part(spec: CacheSpec, layer: int) -> str:
    """The part holding the hidden states after teacher layer `layer` (HF hidden_states index): `hidden` for
    spec.hidden_layer, `hidden-<layer>` for any other."""
    return "hidden" if layer == spec.hidden_layer else f"hidden-{layer}"


def part_kind(part: str) -> str:
    return part.partition("-")[0]


def part_layer(spec: CacheSpec, part: str) -> int | None:
    """The teacher layer of a hidden part (None for another kind)."""
    kind, _, layer = part.partition("-")
    return None if kind != "hidden" else int(layer) if layer else spec.hidden_layer


def is_part(spec: CacheSpec, name: str) -> bool:
    """Whether `name` (a directory of a cache) is one of its parts."""
    kind, _, layer = name.partition("-")
    if kind != "hidden":  # a part of another kind is named by its kind alone: the cache's logits
        return name == spec.logits
    return not layer or layer.isdigit() and name == hidden_part(spec, int(layer))


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of a part: per row `shape` values of `dtype` (the torch dtype a reader allocates)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    row_bytes: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        size = int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()
        object.__setattr__(self, "row_bytes", size)


def fields(spec: CacheSpec, part: str) -> list[Field]:
    """The arrays of a part, in file order. A shard file of n rows holds each array for all n rows in turn,
    then n x len(fields) uint64 checksums: xxh3_64 of each row of each array."""
    L, kind = spec.seq_len, part_kind(part)
    if kind in LOGITS:
        ids = torch.int16 if spec.vocab_size <= 65536 else torch.int32  # uint16 bits | int32
        logits = [Field("ids", ids, (L, spec.k)), Field("values", VALUE_DTYPES[spec.values_dtype], (L, spec.k))]
        return logits + ([Field("lse", torch.float32, (L, len(spec.taus)))] if kind == "sampled" else [])
    D = spec.hidden_size
    if spec.hidden_dtype == "sr2":
        return [Field("hidden", torch.uint8, (L, D // 4)), Field("scale", torch.uint8, (L, D // codec.BLOCK))]
    hidden = [Field("hidden", HIDDEN_DTYPES[spec.hidden_dtype], (L, D))]
    return hidden + ([Field("scale", torch.bfloat16, (L,))] if spec.hidden_dtype == "float8_e4m3" else [])


def bytes_per_token(spec: CacheSpec) -> dict[str, float]:
    """Bytes on disk per token of a part of each kind the spec has (its logits, and hidden: every layer's alike),
    checksums included (8 bytes per row and array)."""
    return {kind: sum(f.row_bytes + 8 for f in fields(spec, kind)) / spec.seq_len for kind in (spec.logits, "hidden")}


def shard_ranges(spec: CacheSpec, part: str, extent: int | None = None) -> list[range]:
    """Row ranges of a part's shards, in order: [i * S, (i + 1) * S), the last one ending at the extent."""
    n, step = spec.extent(part) if extent is None else extent, spec.rows_per_shard
    return [range(start, min(start + step, n)) for start in range(0, n, step)]


def shard_name(part: str, r: range) -> str:
    return f"{part}/{r.start:010d}-{r.stop:010d}"


def shard_bytes(spec: CacheSpec, part: str, n: int) -> int:
    return n * sum(f.row_bytes + 8 for f in fields(spec, part))


def offsets(spec: CacheSpec, part: str, n: int) -> tuple[list[int], int]:
    """Byte offsets of each array in a shard of n rows, and of its checksum table."""
    out, at = [], 0
    for f in fields(spec, part):
        out.append(at)
        at += n * f.row_bytes
    return out, at


def row_digests(array_NxB: np.ndarray) -> np.ndarray:
    """xxh3_64 of each row of a uint8 array [n, bytes]."""
    return np.fromiter((xxhash.xxh3_64_intdigest(row) for row in array_NxB), dtype="<u8", count=len(array_NxB))


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor [n, ...] as its uint8 bytes [n, row bytes], without a copy."""
    return t.view(torch.uint8).numpy().reshape(len(t), -1) if t.dtype != torch.uint8 else t.numpy().reshape(len(t), -1)


# ---- codecs: what is stored for the teacher's outputs, and back -----------------------------------------------

def encode(spec: CacheSpec, part: str, outputs: tuple[torch.Tensor, ...], first_row: int) -> list[torch.Tensor]:
    """A part's arrays for rows [first_row, first_row + N) from the teacher's outputs for it: top-k (ids [N, L, K],
    logits [N, L, K]); sampled (all logits [N, L, V],), its draws a function of the row; hidden (states
    [N, L, D],), sr2's random bits a stream of their own per layer (the part `hidden` keeps the stream it has
    always had)."""
    if part_kind(part) == "topk":
        return encode_topk(spec, *outputs)
    if part_kind(part) == "sampled":
        return encode_sampled(spec, *outputs, first_row)
    stream = 0 if part == "hidden" else part_layer(spec, part) + 1
    return encode_hidden(spec, *outputs, first_row, stream)


def decode(part: str, arrays: list[torch.Tensor]):
    """A part's stored arrays (on any device), decoded: top-k (ids long, logits float32); sampled (ids long,
    logits float32, log-normalisers float32); hidden states float32."""
    return decode_hidden(*arrays) if part_kind(part) == "hidden" else decode_logits(*arrays)


def _stored_ids(spec: CacheSpec, idx: torch.Tensor) -> torch.Tensor:
    """Token ids as a logits part stores them: uint16's bits in int16 (V <= 65536), else int32."""
    dtype = fields(spec, spec.logits)[0].dtype
    ids = idx.to(torch.int32)
    return ((ids - 65536 * (ids > 32767)).to(dtype) if dtype == torch.int16 else ids).contiguous()


def encode_topk(spec: CacheSpec, idx_NxLxK: torch.Tensor, val_NxLxK: torch.Tensor) -> list[torch.Tensor]:
    """Top-k ids, and logits relative to each position's largest (so the values that matter most keep the
    finest steps of a narrow dtype; KD's softmax over the k does not change)."""
    rel = val_NxLxK.float() - val_NxLxK.float().amax(-1, keepdim=True)
    return [_stored_ids(spec, idx_NxLxK), rel.to(VALUE_DTYPES[spec.values_dtype]).contiguous()]


def encode_sampled(spec: CacheSpec, logits_NxLxV: torch.Tensor, first_row: int) -> list[torch.Tensor]:
    """spec.k ids per position drawn from the teacher's logits of rows [first_row, first_row + N), their
    logits relative to the max, and the log-normalisers at spec.taus (hldx.store.sampled)."""
    ids, val, lse = sampled.draw(logits_NxLxV, first_row, spec.k, spec.taus, VALUE_DTYPES[spec.values_dtype])
    return [_stored_ids(spec, ids), val.contiguous(), lse.contiguous()]


def decode_logits(ids: torch.Tensor, values: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Stored top-k or draws (on any device) as ids [.., K] long and logits relative to the max [.., K] float32
    (draws: and their log-normalisers [.., T] float32)."""
    idx = ids.to(torch.int64)
    if ids.dtype == torch.int16:
        idx &= 0xFFFF
    return idx, values.float(), *(t.float() for t in rest)


def encode_hidden(spec: CacheSpec, hid_NxLxD: torch.Tensor, first_row: int, stream: int = 0) -> list[torch.Tensor]:
    """Hidden states of rows [first_row, first_row + N) in the storage dtype; float8_e4m3: each token scaled so
    its largest component uses the format's range, the scale kept beside it in bfloat16; sr2: each token's
    unit vector in hldx.store.codec's unbiased 2-bit code, its random bits a function of the row (and `stream`)."""
    x = hid_NxLxD.float()
    if spec.hidden_dtype == "sr2":
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float64).float()  # any device's
        t = x / norm.clamp_min(1e-6)                               # as hldx.losses.hidden_loss normalises
        return list(codec.encode(t, codec.uniforms(first_row, t.shape, t.device, stream)))
    if spec.hidden_dtype != "float8_e4m3":
        return [x.to(HIDDEN_DTYPES[spec.hidden_dtype]).contiguous()]
    scale = (x.abs().amax(-1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
    q = (x / scale.float()[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return [q.contiguous(), scale.contiguous()]


def decode_hidden(hidden: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stored hidden states (on any device) as float32 [.., D]; sr2 (uint8 codes): the unbiased, not unit,
    estimate of each token's unit vector, to be used as it is."""
    if hidden.dtype == torch.uint8:
        return codec.decode(hidden, scale)
    x = hidden.float()
    return x if scale is None else x * scale.float()[..., None]
