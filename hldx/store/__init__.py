"""The teacher-cache byte format: write, read, verify. It knows nothing of models, Hydra or the teacher: a
cache is filled by any function from token rows to top-k logits and hidden states.

Built once per teacher, tokenizer, data slice, k, hidden layer and dtypes; shared by every run of a
sweep. A *row* r is sequence r of the packed stream (tokens[r*L:(r+1)*L], L = seq_len); the cache is
keyed by row and is read back in whatever order the trainer draws rows.

A cache directory holds
    spec.json                      the CacheSpec the directory was started with (a build refuses another)
    shard-<start>-<end>.bin        rows [start, end): rows_per_shard rows, the last shard may be shorter
    shard-<start>-<end>.json       its record {file, start_row, end_row, hidden_rows, bytes, sha256},
                                   written after the shard (which is written to a temporary name first)
    manifest.json                  {"format", "spec", "index_dtype", "bytes_per_token", "shards": [records]},
                                   written once every shard exists
    locks/                         the builders' file locks (empty files)

A shard is a plain little-endian byte file (no pickle; np.memmap reads it): one record per row that
keeps its hidden state (rows < spec.hidden_rows come first), then one record per row that does not.
A record is, in this order:
    idx [L, K]  uint16 (int32 when V > 65536)        the teacher's top-k token ids per position
    val [L, K]  bfloat16 bits (uint16) | float32     their logits, as teacher_fn returned them
    crc         uint32                               zlib.crc32 of idx and val
    hid [L, D]  bfloat16 bits (uint16) | float32     hidden state after the teacher's hidden layer   } rows with
    crc         uint32                               zlib.crc32 of hid                               } hidden only
bfloat16 rounds float32 to nearest even (torch's `.to(torch.bfloat16)`): relative error <= 2**-8.
float32 stores float32 exactly, so a run from such a cache sees bit for bit what the teacher returned.

Storage (bytes_per_token): top-k k*(2 + 2) bytes per token with uint16 ids and bfloat16 logits (512 at
the paper's k=128, V=32000; 768 with float32 logits); hidden states d_T*2 (5,120 at d_T=2560; 10,240 in
float32) for the rows that keep them; plus 4 bytes of CRC per row and part.

Integrity. verify() and a resumed build check every shard's size and sha256. The reader checks every
shard's size when it opens the cache and every record's CRC when it reads the record, so damaged data
is never returned, at a cost proportional to what is read: hashing whole shards on first use would
instead stall the first steps of a randomly ordered epoch until most of the cache had been read.
"""
from hldx.store.read import Batch, CacheReader, open_cache, verify
from hldx.store.spec import (DTYPES, FORMAT, CacheError, CacheSpec, bytes_per_token, resolve_dir,
                             resolve_hidden_rows, shard_ranges, task_rows)
from hldx.store.write import RowTokensFn, TeacherFn, build

__all__ = ["Batch", "CacheError", "CacheReader", "CacheSpec", "DTYPES", "FORMAT", "RowTokensFn", "TeacherFn",
           "build", "bytes_per_token", "open_cache", "resolve_dir", "resolve_hidden_rows", "shard_ranges",
           "task_rows", "verify"]
