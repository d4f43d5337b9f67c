"""The loader's throughput, side by side: what KD (top-k), HLDC (top-k + hidden) and HT (hidden) read, with
hidden states in bfloat16, float8_e4m3 and sr2, by one reader thread and by cache.readers, page cache warm; on the
job's device, as the trainer takes it: every micro-batch copied there and decoded (on a GPU, a round ends when
the device has done its copies and decodes)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from hldx import order
from hldx.bench.steps import method_flops, random_cache, reads
from hldx.device import device_of
from hldx.loader import Loader

METHODS = ("kd", "hldc", "ht")
HIDDEN = ("bfloat16", "float8_e4m3", "sr2")


def loader_runs(cfg: DictConfig) -> dict[str, tuple[str, str, int]]:
    """Name -> (method, hidden dtype, readers): loader_<method>[_float8_e4m3|_sr2][_readers<N>]."""
    readers = sorted({1, cfg.cache.readers})
    return {f"loader_{m}" + ("" if h == HIDDEN[0] or m == "kd" else f"_{h}") + ("" if n == 1 else f"_readers{n}"):
            (m, h, n) for m in METHODS for h in (HIDDEN[:1] if m == "kd" else HIDDEN) for n in readers}


def loader_bench(cfg: DictConfig, rows: order.Rows, tokenizer_digest: str, tmp: Path) -> dict:
    """tokens/s of Loader.get over every step of the rows, for each of loader_runs(), the runs taking turns
    round by round (the order rotating); the median over bench.steps rounds after bench.warmup; and the
    ratios: over the tokens/s a student at plan.mfu of plan.peak_flops consumes (loader_gpu_*, one reader)
    and of cache.readers readers over one (loader_readers*)."""
    b, t = cfg.bench, cfg.train
    batches = order.Batches(rows, t.batch_size)
    n, rounds = rows.count // t.batch_size, b.warmup + b.steps
    readers = {h: random_cache(cfg, rows, tmp / f"loader-{h}", tokenizer_digest, h) for h in HIDDEN}
    runs = loader_runs(cfg)
    # One loader per run for all rounds (its buffers and threads warm, as in training); round r reads steps
    # [r * n, (r + 1) * n): every row once, the positions past the rows wrapping to row 0 again.
    device = device_of(cfg)
    micro = t.micro_batch_size or t.batch_size
    loaders = {name: Loader(batches, readers[h], reads(cfg, readers[h].spec)[m], range(rounds * n), device,
                           cfg.cache.prefetch, k)
               for name, (m, h, k) in runs.items()}
    names, seconds = list(runs), {name: [] for name in runs}
    try:
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                start = time.perf_counter()
                for s in range(r * n, (r + 1) * n):
                    step = loaders[name].get(s)
                    for first in range(0, len(step), micro):
                        step.micro(first, micro)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[name].append(time.perf_counter() - start)
    finally:
        for loader in loaders.values():
            loader.close()
    tokens = n * t.batch_size * t.seq_len
    tps = {name: tokens / statistics.median(s[b.warmup:]) for name, s in seconds.items()}
    exact = method_flops(OmegaConf.merge(cfg, {"budget": {"accounting": "exact"}}))
    gpu = {m: cfg.plan.mfu * cfg.plan.peak_flops / exact[m] for m in METHODS}
    ratio = {name.replace("loader_", "loader_gpu_"): rate / gpu[runs[name][0]] for name, rate in tps.items()
             if runs[name][2] == 1}
    for name, (method, hidden, n) in runs.items():
        if n > 1:
            one = next(k for k, v in runs.items() if v == (method, hidden, 1))
            ratio[f"loader_readers{n}_vs_1_" + one.removeprefix("loader_")] = tps[name] / tps[one]
    return {"tokens_per_s": tps, "ratio": ratio, "loader_s_all": seconds, "gpu_tokens_per_s": gpu,
            "gpu_assumed": f"{cfg.plan.mfu:.0%} MFU of {cfg.plan.peak_flops / 1e12:g} TFLOP/s (plan.mfu, "
                           f"plan.peak_flops) on the exact FLOPs per token"}
