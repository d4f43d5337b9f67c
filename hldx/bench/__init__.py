"""`python -m hldx.bench`: speed, side by side in one process. The training step of NLL, KD, HLDC and HLDF's
phase 1 (HT), a bare PyTorch loop, and the loader that feeds them.

    python -m hldx.bench student=gemma3-123m teacher=gemma3-3.4b train.seq_len=512 train.batch_size=1 \\
        [bench.json=PATH] [bench.steps=5] [bench.warmup=3] [bench.methods=[kd,loader]] [train.compile=true]

Steps (bench.methods nll, kd, hldc, ht, bare): each is `Trainer.step` itself on the step that hldx.loader
reads ahead, as in training, from a real teacher cache (hldx.store) of random top-k logits and hidden states
in the configured teacher's shapes, so no trained teacher is needed. The bare loop is model(tokens).logits ->
cross-entropy -> backward -> clipping -> AdamW on the same model and batches. The runs take turns, one step
each per round, the order rotating every round; after bench.warmup rounds, a run's time is the median of
its bench.steps steps (CUDA events on a GPU, the host clock on a CPU); every step's time is kept too
(step_s_all), to judge the spread. On CUDA, a host-device synchronisation inside a measured step raises.

Loader (bench.methods loader, hldx/bench/loading.py): what KD, HLDC and HT read, top-k and sampled logits, hidden
states in bfloat16, float8_e4m3 and sr2, page cache warm, its two sides apart: the host's (Loader.get over every step
of the bench's rows: read, checksums, into page-locked buffers on a GPU; one reader thread and cache.readers:
tokens_per_s.loader_host_*) and the device's (a step's copies to the job's device and every micro-batch decoded
there: tokens_per_s.loader_device_*; on a CPU, the decode alone, which a GPU runs). gpu_tokens_per_s: what each
method's student consumes at plan.mfu of plan.peak_flops (an H100 at 40% by default, from the plan's FLOPs per
token), printed beside; ratio.loader_gpu_host_* and _device_* divide each side's rate (one reader) by it: a CPU
holds the host side to at least 2, a GPU (gpu-check) measures the device side; ratio.loader_readers*_vs_1_*
cache.readers' rate by one reader's.

Ranks (bench.methods ranks, on a CPU): the NLL step on one process at train.batch_size against two processes
at half of it each (torch's threads split between them), under DDP and under FSDP2, rounds taking turns:
tokens_per_s.ranks_*, ratio.ddp_single and ratio.fsdp_single (two ranks' rate over one's).

Build (bench.methods build): the teacher cache's build (hldx.teacher.build_cache: the configured teacher, random
weights, as OnlineTeacher on cache.batch_rows rows at a time; top-k, encoding, hashing, writing) over
bench.steps batches, against the teacher's forward alone on the same rows: tokens_per_s.build and
.build_forward, ratio.build_forward (the build's rate over the forward's).

Every run's needs are checked before any work (check): one line and exit status 2 for what cannot run.

Reported: tokens/s; step-time ratios to NLL per token next to the plan's FLOP ratios (budget.accounting;
a cached teacher costs no FLOPs); trainer/bare; on a GPU, MFU against the device's documented bf16 peak and
the peak memory allocated during each run's steps (everything the bench holds counts: weights, the one AdamW
state the trainer's steps share, the bare loop's own; measure one method alone with bench.methods=[kd] for a
run's footprint) beside the plan's estimate for that phase (plan_mem_gib).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from hldx import cli, data, job, order
from hldx import config as C
from hldx.bench.building import build_bench
from hldx.bench.loading import loader_bench
from hldx.bench.ranks import ranks_bench
from hldx.bench.steps import STEPS, device_name, measure, method_config, method_flops, random_cache, train_steps
from hldx.budget import memory_per_rank, parallel_mode
from hldx.device import device_of, join, peak_flops

RUNS = (*STEPS, "loader", "ranks", "build")
__all__ = ["bench", "check", "format_table", "main", "measure", "report"]


def check(cfg: DictConfig) -> list[str]:
    """What each chosen run needs, before any work; the runs, in order. The trainer's steps and the loader run
    one rank at train.batch_size in micro-batches; the ranks run two at half of it; an engine other than none
    wraps one phase's module at a time."""
    chosen, t = list(cfg.bench.methods), cfg.train
    if not chosen or any(m not in RUNS for m in chosen):
        raise C.ConfigError(f"bench.methods={chosen} is invalid: expected a non-empty list out of {list(RUNS)}")
    steps = [m for m in chosen if m in STEPS]
    micro = t.micro_batch_size or t.batch_size
    if (steps or "loader" in chosen) and t.batch_size % micro:
        raise C.ConfigError(f"train.micro_batch_size={micro} is invalid: expected a divisor of train.batch_size="
                            f"{t.batch_size} (the bench's steps run on one rank)")
    if "ranks" in chosen and (t.batch_size % 2 or (t.batch_size // 2) % (t.micro_batch_size or t.batch_size // 2)):
        raise C.ConfigError(f"train.batch_size={t.batch_size} is invalid for bench.methods=[..., ranks]: expected an "
                            f"even number whose half train.micro_batch_size={t.micro_batch_size} divides (two ranks "
                            f"take half each), or leave ranks out of bench.methods")
    if parallel_mode(cfg, 1) != "none" and len(steps) > 1:
        raise C.ConfigError(f"train.parallel={parallel_mode(cfg, 1)} wraps one phase's module at a time: bench one "
                            f"method (bench.methods=[{steps[0]}]), not {steps}")
    return [m for m in RUNS if m in chosen]


def bench(cfg: DictConfig) -> dict:
    """Measure every chosen run side by side; the results as a JSON-able dict (see the module docstring)."""
    job.check(cfg, launch=False)
    chosen, b, t = check(cfg), cfg.bench, cfg.train
    device = device_of(cfg)
    if b.threads:
        torch.set_num_threads(b.threads)
    join(cfg, alone=parallel_mode(cfg, 1) != "none")  # FSDP2 for the 3.4B preset: a process group of one
    tokenizer = data.tokenizer_for(cfg)
    full = order.training_rows(cfg, data.prepare(cfg, "train", tokenizer))
    # One step's rows, read again round after round: what the bench caches stays small at 512-row steps.
    count = min(full.count, t.batch_size)
    rows = order.Rows(full.tokens_RxL[:count], f"{full.digest}-{count}rows", full.path)
    setup = {"device": device_name(device), "torch": torch.__version__, "student": cfg.student.name,
             "teacher": cfg.teacher.model.name, "batch_size": t.batch_size, "seq_len": t.seq_len,
             "precision": "bf16" if t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda") else "fp32",
             "compile": bool(t.compile), "loss_chunk": t.loss_chunk, "accounting": cfg.budget.accounting,
             "warmup": b.warmup, "steps": b.steps, "cache_readers": cfg.cache.readers,
             "cache_prefetch": cfg.cache.prefetch}
    steps = [m for m in chosen if m in STEPS]
    result = setup | {"tokens_per_s": {}, "ratio": {}}
    with tempfile.TemporaryDirectory(prefix="hldx-bench-") as tmp:
        if steps:
            reader = random_cache(cfg, rows, Path(tmp) / "cache", data.tokenizer_digest(tokenizer)) \
                if set(steps) - {"nll", "bare"} else None
            seconds, peak, trainer = train_steps(cfg, steps, rows, reader, tokenizer, device, Path(tmp),
                                                 sync_debug=True)
            result |= {"micro_batch_size": trainer.micro} | report(cfg, seconds, peak_flops(device), peak)
        digest = data.tokenizer_digest(tokenizer)
        extra = ([loader_bench(cfg, rows, digest, Path(tmp))] if "loader" in chosen else []) \
            + ([ranks_bench(cfg, rows)] if "ranks" in chosen else []) \
            + ([build_bench(cfg, full, digest, Path(tmp))] if "build" in chosen else [])
        for part in extra:
            for key in ("tokens_per_s", "ratio"):
                part[key] = result[key] | part[key]
            result |= part
    return result


def report(cfg: DictConfig, seconds: dict[str, list[float]], peak: float | None,
           peak_mem_gib: dict[str, float]) -> dict:
    """Medians, rates and ratios of the measured seconds per step; MFU against `peak` FLOP/s when known."""
    t = cfg.train
    tokens = t.batch_size * t.seq_len
    step_s = {m: statistics.median(s) for m, s in seconds.items()}
    tps = {m: tokens / s for m, s in step_s.items()}
    costs = method_flops(cfg)
    flops = {m: costs["nll" if m == "bare" else m] for m in tps}
    pairs = {f"{m}_nll": m for m in ("kd", "hldc", "ht") if m in tps and "nll" in tps}
    ratio = {key: step_s[m] / step_s["nll"] for key, m in pairs.items()}
    if "nll" in tps and "bare" in tps:
        ratio["trainer_bare"] = tps["nll"] / tps["bare"]
    out = {"tokens_per_step": tokens, "step_s": step_s, "step_s_all": seconds, "tokens_per_s": tps,
           "flops_per_token": flops, "flop_ratio": {key: flops[m] / flops["nll"] for key, m in pairs.items()},
           "ratio": ratio}
    if peak:
        out["mfu"] = {m: tps[m] * flops[m] / peak for m in tps}
    if peak_mem_gib:
        out["peak_mem_gib"] = peak_mem_gib
        out["plan_mem_gib"] = {m: planned_mem_gib(cfg, m) for m in peak_mem_gib}
    return out


def planned_mem_gib(cfg: DictConfig, run: str) -> float:
    """The plan's estimate of one rank's memory in a run's phase (hldx.budget.memory_per_rank), GiB."""
    method, phase = {"bare": ("nll", "nll"), "ht": ("hldf", "ht")}.get(run, (run, run))
    c = method_config(cfg, method)
    return memory_per_rank(c, parallel_mode(c, 1), 1, phase=phase)["total"] / 2**30


def format_table(result: dict) -> str:
    """The human-readable summary."""
    head = (f"{result['device']} | {result['student']} | {result['batch_size']}x{result['seq_len']} tokens/step | "
            f"{result['precision']} | compile={result['compile']} | median of {result['steps']} rounds after "
            f"{result['warmup']} warm-up")
    lines = [head, ""]
    if "step_s" in result:
        lines.append(f"{'run':5} {'step s':>9} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'plan GiB':>9} "
                     f"{'time/NLL':>9} {'FLOP/NLL':>9}")
        mfu, mem, plan = result.get("mfu", {}), result.get("peak_mem_gib", {}), result.get("plan_mem_gib", {})
        step_s, flops = result["step_s"], result["flops_per_token"]
        for m, s in step_s.items():
            time_ratio = s / step_s["nll"] if "nll" in step_s else math.nan
            flop_ratio = flops[m] / flops["nll"] if "nll" in flops else math.nan
            mfu_text = f"{mfu[m]:6.1%}" if m in mfu else f"{'-':>6}"
            mem_text = f"{mem[m]:9.2f} {plan[m]:9.2f}" if m in mem else f"{'-':>9} {'-':>9}"
            lines.append(f"{m:5} {s:9.4f} {result['tokens_per_s'][m]:10.0f} {mfu_text} {mem_text} "
                         f"{time_ratio:9.3f} {flop_ratio:9.4f}")
    if "gpu_tokens_per_s" in result:
        lines += ["", loader_table(result)]
    for part in ("ranks", "build"):  # the rates of the rank groups and the cache build
        rates = {k: v for k, v in result["tokens_per_s"].items() if k.startswith(part + "_")}
        if rates:
            lines += ["", f"{part:38} {'tokens/s':>12}"] + [f"{k:38} {v:12,.0f}" for k, v in rates.items()]
    lines += ["", "ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in result["ratio"].items()  # the loader's: above
                                         if not k.startswith("loader_"))]
    return "\n".join(lines)


def loader_table(result: dict) -> str:
    """The loader's rates, tokens/s: each run's host side (one reader, cache.readers), device side, and beside them
    what its method's student consumes on the assumed GPU, with each side's ratio to it."""
    tps, gpu, n = result["tokens_per_s"], result["gpu_tokens_per_s"], result["cache_readers"]
    runs = [k.removeprefix("loader_device_") for k in tps if k.startswith("loader_device_")]
    many = n > 1
    lines = [f"loader (tokens/s; GPU: {result['gpu_assumed']})",
             f"{'run':24} {'host, 1 reader':>15}" + (f" {f'host, {n} readers':>16}" if many else "") +
             f" {'device':>13} {'GPU appetite':>13} {'host/GPU':>9} {'device/GPU':>10}"]
    for run in runs:
        appetite = gpu[run.split("_")[0]]
        host, device = tps[f"loader_host_{run}"], tps[f"loader_device_{run}"]
        lines.append(f"{run:24} {host:15,.0f}" + (f" {tps[f'loader_host_{run}_readers{n}']:16,.0f}" if many else "") +
                     f" {device:13,.0f} {appetite:13,.0f} {host / appetite:9.2f} {device / appetite:10.2f}")
    return "\n".join(lines)


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    cfg = C.compose(args)
    out = cli.output_file("bench.json", cfg.bench.json) if cfg.bench.json else None
    result = bench(cfg)
    print(format_table(result))
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {cfg.bench.json}")
    return 0
