"""The teacher-cache byte format: write, read, verify. It knows nothing of models, Hydra or the teacher: a
cache is filled by any function from token rows to the outputs of its parts.

A *part* is one kind of teacher output (spec.KINDS): the logits (the top-k, or ids drawn from the teacher's
distribution: spec.logits, one or the other per cache), or the hidden states after one teacher layer (one part per
layer a study reads). A *row* r is row r of the training order (hldx.order.Rows): a run reads
rows in sequence, so the rows of its first n steps are a prefix, and a cache holds exactly a prefix of rows per
part: rows [0, spec.extents[part]). A cache directory is named by its spec's identity (teacher, tokenizer,
training order, seq_len, k, the layer of the part `hidden`, d_T, dtypes, rows_per_shard), not by its extents nor
by the layers it holds: a job that reads further, or another layer, grows it in place, writing only the shards
its parts lack (those of the other parts are never opened for writing). A sampled cache's identity adds its
logits and taus (its k: the draws per position).

A cache directory holds
    spec.json                      {"format": FORMAT, the identity}; a build refuses a directory of another
    topk/<start>-<end>.bin         rows [start, end) of the top-k part, inside one block of rows_per_shard rows
    sampled/<start>-<end>.bin      the same for the sampled logits (a cache of spec.logits=sampled, instead of topk)
    hidden/<start>-<end>.bin       the same for the hidden states after layer spec.hidden_layer (the teacher's
                                   middle: the part every cache has had, and the layer the paper reads)
    hidden-<l>/<start>-<end>.bin   the same for the hidden states after teacher layer l (0: the embedding)
    locks/                         the builders' file locks (empty files)
Shards are immutable (hldx.store.shards): written under a name of their writer's own, flushed, then published
by a link that never replaces a file. A grown extent adds shards: [1024, 1168) once, [1168, 2048) later; a
reader resolves, from row 0, the shard that holds each row and reaches furthest. Format 2 caches (aligned
shards, each with a .json record) are read as they are and grown the same way.

A shard of n rows is a plain little-endian byte file (no pickle): each array of its part for all n rows in
turn, then an n x (number of arrays) table of uint64 checksums, xxh3_64 of each row of each array:
    top-k    ids     [n, L, K]  uint16 (int32 when V > 65536)   the teacher's top-k token ids per position
             values  [n, L, K]  bfloat16 | float16 | float32   their logits minus the position's largest
    sampled  ids     [n, L, K]  as top-k's                     K = spec.k ids drawn per position (sampled.py)
             values  [n, L, K]  as top-k's                     their logits minus the position's largest
             lse     [n, L, T]  float32                        log-normalisers at each of spec.taus
    hidden   hidden  [n, L, D]  bfloat16 | float32 | float8_e4m3fn   hidden state after the teacher's layer
             scale   [n, L]     bfloat16 (float8_e4m3 only)    per token: its largest |component| / 448
        sr2: hidden  [n, L, D/4]  uint8                        2-bit codes of the unit vector (codec.py)
             scale   [n, L, D/32] uint8                        per block of 32: its scale's code
Logits relative to their maximum lose nothing for KD (softmax over the k is shift-invariant) and keep the
finest steps of a narrow dtype for the values that carry the probability: bfloat16 rounds them to nearest
(relative error <= 2**-8 of each value's distance from the maximum). float32 stores float32 exactly. In
float8_e4m3 each token's vector is divided by its scale, so its largest component sits at the top of the
format's range instead of its bottom (a unit vector's components are ~1/sqrt(d_T) ~ 0.02). sr2 stores each
token's unit vector t in an unbiased code (E[decoded] = t; hldx.store.codec), to be used as decoded, never
renormalised: the hidden losses are linear in it (hldx.losses.hidden_loss(unit_target=True)).

Storage (bytes_per_token, checksums included): top-k k*(2 + 2) + 16/L (512.03 at the paper's k=128, V=32000,
L=512; 768 with float32 logits); sampled k*(2 + 2) + 4 T + 24/L (60.05 at k=12 draws and T=3 taus); hidden
d_T*2 (5,120 at d_T=2560), d_T + 2 in float8_e4m3 (2,562), d_T/4 + d_T/32 in sr2 (720), + 8/L per array.

Integrity. Every row of every array is checked against its checksum as it is read, so damaged data is never
returned, at a cost proportional to what is read (xxh3 runs at > 10 GB/s); verify() checks every row of every
shard, and that the shards of each part chain from row 0. A build trusts a published shard whose size is
right; a killed build leaves at most a temporary file, which `python -m hldx.cache gc` (or the next build on
the same host) removes.
"""
from hldx.store.read import CacheReader, open_cache, verify
from hldx.store.shards import FORMAT, gc
from hldx.store.spec import (HIDDEN_DTYPES, KINDS, LOGITS, UNIT_CODES, VALUE_DTYPES, CacheError, CacheSpec,
                             bytes_per_token, decode, decode_hidden, decode_logits, encode_hidden, encode_sampled,
                             encode_topk, hidden_part, part_kind, part_layer, shard_ranges)
from hldx.store.write import RowTokensFn, TeacherFn, build, built_extent, task_shards

__all__ = ["CacheError", "CacheReader", "CacheSpec", "FORMAT", "HIDDEN_DTYPES", "KINDS", "LOGITS", "RowTokensFn",
           "TeacherFn", "UNIT_CODES", "VALUE_DTYPES", "build", "built_extent", "bytes_per_token", "decode",
           "decode_hidden", "decode_logits", "encode_hidden", "encode_sampled", "encode_topk", "gc", "hidden_part",
           "open_cache", "part_kind", "part_layer", "shard_ranges", "task_shards", "verify"]
