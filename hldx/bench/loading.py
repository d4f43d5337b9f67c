"""The loader's throughput, its two sides apart: what KD (top-k or sampled logits), HLDC (logits + hidden) and HT
(hidden) read, with hidden states in bfloat16, float8_e4m3 and sr2, page cache warm.

Host side: Loader.get over the steps of a round, on the host (page-locked where a GPU is): reading the shards,
checking every row's checksum, into the step's buffers, by one reader thread and by cache.readers; a round ends when
the reads it scheduled (cache.prefetch steps ahead) are done, so that each round reads its number of steps and no
read runs while another run is timed. What a CPU must hold to its budget: at least twice what the student consumes
at plan.mfu of plan.peak_flops.
Device side: one read step's buffers copied to the job's device and every micro-batch decoded there (Step.micro), as
the trainer takes them (on a GPU, a round ends when the device has done its copies and decodes; on a CPU there is no
copy, and the decode runs where a GPU would run it: a GPU measures it)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from hldx import order
from hldx.bench.steps import method_flops, random_cache, reads
from hldx.device import device_of
from hldx.loader import Loader, Step
from hldx.store import CacheReader

METHODS = ("kd", "hldc", "ht")
HIDDEN = ("bfloat16", "float8_e4m3", "sr2")
LOGITS = ("topk", "sampled")


def loader_runs(cfg: DictConfig) -> dict[str, tuple[str, str, str]]:
    """Name -> (method, hidden dtype, logits): <method>[_float8_e4m3|_sr2][_sampled] (KD reads no hidden states,
    HT no logits)."""
    return {m + ("" if h == HIDDEN[0] else f"_{h}") + ("" if g == LOGITS[0] else f"_{g}"): (m, h, g)
            for m in METHODS for h in (HIDDEN[:1] if m == "kd" else HIDDEN)
            for g in (LOGITS[:1] if m == "ht" else LOGITS)}


def loader_bench(cfg: DictConfig, rows: order.Rows, tokenizer_digest: str, tmp: Path) -> dict:
    """tokens/s of each of loader_runs(), its host side by one reader and by cache.readers (loader_host_<run>[
    _readers<N>]) and its device side (loader_device_<run>), the runs taking turns round by round (the order
    rotating), the median over bench.steps rounds after bench.warmup; what a student at plan.mfu of
    plan.peak_flops consumes (gpu_tokens_per_s, per method) and the ratios of each side to it (loader_gpu_host_*,
    one reader; loader_gpu_device_*), and of cache.readers readers over one (loader_readers<N>_vs_1_*)."""
    b, t = cfg.bench, cfg.train
    batches = order.Batches(rows, t.batch_size)
    # Steps per round: every row once, and enough steps for cache.prefetch reads in flight at once (past the rows,
    # the positions wrap to row 0 again).
    n, rounds = max(rows.count // t.batch_size, cfg.cache.prefetch + 1), b.warmup + b.steps
    runs, device = loader_runs(cfg), device_of(cfg)
    caches = {(h, g): random_cache(cfg, rows, tmp / f"loader-{h}-{g}", tokenizer_digest, h, g)
              for h, g in {(h, g) for _, h, g in runs.values()}}
    parts = {name: reads(cfg, caches[h, g].spec)[m] for name, (m, h, g) in runs.items()}
    micro, pin = t.micro_batch_size or t.batch_size, device.type == "cuda"
    counts = sorted({1, cfg.cache.readers})
    # One loader per run and reader count for all rounds (its buffers and threads warm, as in training); round r
    # reads steps [r * n, (r + 1) * n): every row once, the positions past the rows wrapping to row 0 again.
    hosts = {(name, k): Loader(batches, caches[runs[name][1:]], parts[name], range(rounds * n), torch.device("cpu"),
                               cfg.cache.prefetch, k, pin=pin) for name in runs for k in counts}
    timed: dict[str, Callable[[int], None]] = {}
    for (name, k), loader in hosts.items():
        timed[f"host_{name}" + ("" if k == 1 else f"_readers{k}")] = _host_side(loader, n)
    for name in runs:
        timed[f"device_{name}"] = _device_side(batches, caches[runs[name][1:]], parts[name], device, micro, n)
    seconds = {name: [] for name in timed}
    try:
        names = list(timed)
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                start = time.perf_counter()
                timed[name](r)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[name].append(time.perf_counter() - start)
    finally:
        for loader in hosts.values():
            loader.close()
    tokens = n * t.batch_size * t.seq_len
    tps = {f"loader_{name}": tokens / statistics.median(s[b.warmup:]) for name, s in seconds.items()}
    exact = method_flops(OmegaConf.merge(cfg, {"budget": {"accounting": "exact"}}))
    gpu = {m: cfg.plan.mfu * cfg.plan.peak_flops / exact[m] for m in METHODS}
    ratio = {f"loader_gpu_{side}_{name}": tps[f"loader_{side}_{name}"] / gpu[method]
             for name, (method, _, _) in runs.items() for side in ("host", "device")}
    for k in counts[1:]:
        ratio |= {f"loader_readers{k}_vs_1_{name}": tps[f"loader_host_{name}_readers{k}"] / tps[f"loader_host_{name}"]
                  for name in runs}
    return {"tokens_per_s": tps, "ratio": ratio, "loader_s_all": seconds, "gpu_tokens_per_s": gpu,
            "gpu_assumed": f"{cfg.plan.mfu:.0%} MFU of {cfg.plan.peak_flops / 1e12:g} TFLOP/s (plan.mfu, "
                           f"plan.peak_flops) on the exact FLOPs per token"}


def _host_side(loader: Loader, n: int) -> Callable[[int], None]:
    """Round r: steps [r * n, (r + 1) * n) handed out, then the reads scheduled ahead of them awaited."""
    def run(r: int) -> None:
        for s in range(r * n, (r + 1) * n):
            loader.get(s)
        for slot in loader.slots:
            for f in slot.pending:
                f.result()
    return run


def _device_side(batches: order.Batches, reader: CacheReader, parts: tuple[str, ...], device: torch.device,
                 micro: int, n: int) -> Callable[[int], None]:
    """n steps' copies to the device and decodes, of the first step's buffers (read once, here, page-locked on a
    GPU)."""
    with Loader(batches, reader, parts, range(1), torch.device("cpu"), pin=device.type == "cuda") as once:
        read = once.get(0)

    def run(_: int) -> None:
        for _ in range(n):
            step = Step(read.tokens.to(device, non_blocking=True),
                        {p: [a.to(device, non_blocking=True) for a in xs] for p, xs in read.arrays.items()}, reader)
            for first in range(0, len(step), micro):
                step.micro(first, micro)
    return run
