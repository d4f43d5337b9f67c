"""The teacher cache's build against the teacher's forward alone: the configured teacher (random weights of its
shape) run as hldx.teacher.OnlineTeacher on cache.batch_rows rows at a time, first alone over the rows, then
inside the whole build (hldx.teacher.build_cache: forward, top-k, encoding, hashing, writing)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from hldx import hidden, order
from hldx.device import device_of
from hldx.models import build_model
from hldx.store import CacheSpec, hidden_part
from hldx.teacher import OnlineTeacher, batch_rows, build_cache


def build_bench(cfg: DictConfig, rows: order.Rows, tokenizer_digest: str, tmp: Path) -> dict:
    """tokens/s of the teacher's forward alone (tokens_per_s.build_forward) and of the whole build of a cache
    of top-k and hidden states for the same rows (tokens_per_s.build); ratio.build_forward, the second over the
    first (1: the build costs only the forward). One warm-up batch first."""
    device, t, L = device_of(cfg), cfg.teacher.model, cfg.train.seq_len
    n = batch_rows(cfg, device)
    count = min(rows.count, n * max(1, cfg.bench.steps))
    tokens_NxL = torch.from_numpy(rows.tokens_RxL[:count].astype(np.int64))
    teacher = OnlineTeacher(cfg, build_model(t, cfg.seed).eval(), device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    layers = hidden.teacher_layers(cfg)
    teacher(tokens_NxL[:n].to(device), True, layers)  # warm-up
    sync()
    start = time.perf_counter()
    for a in range(0, count, n):
        teacher(tokens_NxL[a:a + n].to(device), True, layers)
    sync()
    forward_s = time.perf_counter() - start
    spec = CacheSpec(teacher_digest="bench", tokenizer_digest=tokenizer_digest, stream_digest=rows.digest, seq_len=L,
                     k=cfg.method.get("top_k", 128), vocab_size=cfg.student.vocab_size,
                     hidden_layer=t.num_hidden_layers // 2, hidden_size=t.hidden_size,
                     values_dtype=cfg.cache.values_dtype, hidden_dtype=cfg.cache.hidden_dtype,
                     rows_per_shard=cfg.cache.rows_per_shard)
    spec = dataclasses.replace(spec, extents={"topk": count} | {hidden_part(spec, layer): count for layer in layers})
    built = OmegaConf.merge(cfg, {"cache": {"dir": str(tmp / "build")}})
    start = time.perf_counter()
    build_cache(built, spec, order.Rows(rows.tokens_RxL[:count], rows.digest, rows.path), device, online=teacher)
    sync()
    build_s = time.perf_counter() - start
    tps = {"build_forward": count * L / forward_s, "build": count * L / build_s}
    return {"tokens_per_s": tps, "ratio": {"build_forward": tps["build"] / tps["build_forward"]},
            "build_rows": count, "build_batch_rows": n}
