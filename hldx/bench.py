"""Speed, side by side in one process: the training step of NLL, KD, HLDC and HLDF's phase 1 (HT), a bare
PyTorch loop, and the data-and-cache loader.

    python -m hldx.bench student=gemma3-123m teacher=gemma3-3.4b train.seq_len=512 train.batch_size=1 \\
        [bench.json=PATH] [bench.steps=5] [bench.warmup=3] [bench.methods=[kd]] [train.compile=true]

Each method's step is `Trainer.step` itself after `Batches.batch`, as in the training loop; teacher outputs
come through the trainer's cache reader from a real teacher cache (hldx.store) filled with random top-k
logits and hidden states of the configured teacher's shapes, so no trained teacher is needed. The bare loop
is model(tokens).logits -> cross-entropy -> backward -> clipping -> AdamW on the same model and batches.
The methods take turns, one step each per round, the order rotating every round; after bench.warmup rounds,
a method's time is the median of its bench.steps steps (CUDA events on a GPU, the host clock on a CPU);
every step's time is kept too (step_s_all), to judge the spread.

Reported: tokens/s; step-time ratios to NLL per token next to the plan's FLOP ratios (budget.accounting;
a cached teacher costs no FLOPs); trainer/bare and loader/trainer throughput ratios; on a GPU, MFU against
the device's documented bf16 peak and the peak memory allocated during each method's steps (everything the
bench holds counts: weights, the one AdamW state the trainer's steps share, the bare loop's own; measure
one method alone with bench.methods=[kd] for a run's footprint). The loader's rate is Batches.batch plus
CacheReader.get of what the method reads, on the host, from rows the trainer has just read (the page cache
holds them); ratio.loader_trainer is its smallest over methods.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from hldx import config as C
from hldx import cli, data, job
from hldx.budget import flops_per_token
from hldx.device import device_of, peak_flops
from hldx.methods import Phase, phases
from hldx.models import bottom_parameters, build_model, build_regressor, compile_layers, middle_layer
from hldx.store import CacheReader, CacheSpec, build, open_cache
from hldx.teacher import CachedTeacher
from hldx.train import Trainer, _optimizer

RUNS = ("nll", "kd", "hldc", "ht", "bare")   # the trainer's steps (HT: HLDF's phase 1) and the bare loop
READS = {"nll": (False, False), "kd": (True, False), "hldc": (True, True), "ht": (False, True)}  # (top-k, hidden)


def method_config(cfg: DictConfig, method: str) -> DictConfig:
    """cfg with another method and a cached teacher (the bench's teacher)."""
    return OmegaConf.merge(cfg, {"method": {"name": method}, "teacher": {"source": "cache"}})


def method_phases(cfg: DictConfig) -> dict[str, Phase]:
    """The phase each method trains in: HT from HLDF, the others from their own method."""
    return {p.name: p for m in ("nll", "kd", "hldc", "hldf") for p in phases(method_config(cfg, m))}


def method_flops(cfg: DictConfig) -> dict[str, float]:
    """FLOPs per token of each step, as the plan counts them."""
    return {"nll": flops_per_token(cfg)["data"]} | {
        name: cost for m in ("kd", "hldc", "hldf")
        for name, cost in flops_per_token(method_config(cfg, m)).items() if name != "data"}


class BenchTeacher(CachedTeacher):
    """The trainer's cache reader over a given cache."""

    def __init__(self, reader: CacheReader, device: torch.device):
        self.reader, self.device = reader, device


def random_cache(cfg: DictConfig, stream: data.Stream, rows: int, hidden: bool, root: Path,
                 tokenizer_digest: str) -> CacheReader:
    """A teacher cache of the stream's first `rows` rows holding random top-k logits (distinct ids, sorted
    values) and, when `hidden`, random hidden states, in the configured teacher's shapes and dtypes."""
    t, seq_len = cfg.teacher.model, cfg.train.seq_len
    spec = CacheSpec(teacher_digest="random", tokenizer_digest=tokenizer_digest, stream_digest=stream.digest,
                     seq_len=seq_len, rows=rows, k=cfg.method.get("top_k", 128), vocab_size=cfg.student.vocab_size,
                     hidden_layer=middle_layer(t.num_hidden_layers, cfg.hidden.teacher_layer) if hidden else None,
                     hidden_size=t.hidden_size if hidden else 0, hidden_rows=rows if hidden else 0,
                     values_dtype=cfg.cache.values_dtype, hidden_dtype=cfg.cache.hidden_dtype,
                     rows_per_shard=cfg.cache.rows_per_shard)
    g = torch.Generator().manual_seed(cfg.seed)

    def teacher_fn(tokens_NxL: torch.Tensor):
        n = len(tokens_NxL)
        val_NxLxK, idx_NxLxK = (10 * torch.rand(n, seq_len, spec.vocab_size, generator=g)).topk(spec.k, dim=-1)
        return idx_NxLxK, val_NxLxK, torch.randn(n, seq_len, t.hidden_size, generator=g) if hidden else None

    tokens_RxL = stream.tokens[: rows * seq_len].reshape(rows, seq_len)
    build(spec, root, teacher_fn, lambda r: torch.from_numpy(tokens_RxL[r].astype(np.int64)), batch_rows=1,
          progress=False)
    return open_cache(root, spec, prefetch=cfg.cache.prefetch)


def bare_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens_BxL: torch.Tensor, micro: int,
              autocast, grad_clip: float | None) -> None:
    """The plain PyTorch step the trainer is compared with: forward, cross-entropy, backward, clip, AdamW."""
    tokens_BxL = tokens_BxL.to(next(model.parameters()).device, non_blocking=True)
    n_micro = tokens_BxL.shape[0] // micro
    for tokens_m in tokens_BxL.split(micro):
        with autocast:
            logits = model(input_ids=tokens_m).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens_m[:, 1:].flatten())
        (loss / n_micro).backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(runs: dict[str, Callable[[int], None]], rounds: int, warmup: int, device: torch.device
            ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Call every run once per round, run i of round r at turn (i - r) mod n; return the seconds of each run's
    calls after `warmup` rounds and, on CUDA, the most memory allocated during them (GiB)."""
    names, cuda = list(runs), device.type == "cuda"
    marks: dict[str, list] = {name: [] for name in names}
    peak: dict[str, float] = {}
    for r in tqdm(range(rounds), desc="bench rounds", unit="round", dynamic_ncols=True):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runs[name](r)
                end.record()
                marks[name].append((start, end))
                if r >= warmup:
                    peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            else:
                t0 = time.perf_counter()
                runs[name](r)
                marks[name].append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
        marks = {name: [s.elapsed_time(e) / 1e3 for s, e in pairs] for name, pairs in marks.items()}
    return {name: times[warmup:] for name, times in marks.items()}, peak


def host_seconds(fn: Callable[[int], None], rounds: int, warmup: int) -> list[float]:
    """Host-clock seconds of fn(r) for each round after `warmup`."""
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, torch threads: {torch.get_num_threads()})"


def _methods(cfg: DictConfig) -> list[str]:
    chosen = list(cfg.bench.methods)
    if not chosen or any(m not in RUNS for m in chosen):
        raise C.ConfigError(f"bench.methods={chosen} is invalid: expected a non-empty list out of {list(RUNS)}")
    return [m for m in RUNS if m in chosen]


def bench(cfg: DictConfig) -> dict:
    """Measure every chosen run side by side; the results as a JSON-able dict (see the module docstring)."""
    job.check(cfg, launch=False)
    chosen, b, t = _methods(cfg), cfg.bench, cfg.train
    if b.steps < 1 or b.warmup < 0:
        raise C.ConfigError(f"bench.steps={b.steps}, bench.warmup={b.warmup} are invalid: expected steps >= 1 "
                            "and warmup >= 0")
    if b.threads:
        torch.set_num_threads(b.threads)
    rounds, device = b.warmup + b.steps, device_of(cfg)
    tokenizer = data.tokenizer_for(cfg)
    full = data.prepare(cfg, "train", tokenizer)
    rows = min(full.rows(t.seq_len), t.batch_size * rounds)   # the rows the bench reads (and caches)
    stream = data.Stream(full.tokens[: rows * t.seq_len], f"{full.digest}-{rows}rows", full.path)
    batches = data.Batches(stream, t.seq_len, t.batch_size, cfg.seed)
    reads = [READS[m] for m in chosen if m != "bare"]
    with tempfile.TemporaryDirectory(prefix="hldx-bench-") as tmp:
        reader = random_cache(cfg, stream, rows, any(hidden for _, hidden in reads), Path(tmp) / "cache",
                              data.tokenizer_digest(tokenizer)) if any(map(any, reads)) else None
        teacher = BenchTeacher(reader, device) if reader is not None else None
        trainer = Trainer(cfg, None, batches, teacher, Path(tmp), tokenizer, None)  # only its step() is called
        model = build_model(cfg.student, cfg.seed).to(device).train()
        if t.compile:
            compile_layers(model)
        d_s, d_t = cfg.student.hidden_size, cfg.teacher.model.hidden_size
        regressors = {"hldc": build_regressor("linear", d_s, d_t).to(device),
                      "ht": build_regressor("mlp", d_s, d_t, cfg.method.get("regressor_expansion", 4)).to(device)}
        # One AdamW for every trainer step: a step updates only what got gradients, so its cost is that of the
        # phase's own optimizer, and the bench holds one optimizer state (as a run does) instead of four.
        everything = list(model.parameters())
        optimizer = _optimizer(cfg, everything, [p for r in regressors.values() for p in r.parameters()], device)
        step_phases = method_phases(cfg)

        def trainer_run(method: str) -> Callable[[int], None]:
            regressor = regressors.get(method)
            params = bottom_parameters(model, trainer.layer) if method == "ht" else everything
            extra = list(regressor.parameters()) if regressor is not None else []

            def run(r: int) -> None:
                tokens_BxL, rows_B = batches.batch(r)
                trainer.step(step_phases[method], model, regressor, optimizer, params, extra, rows_B, tokens_BxL, {})
            return run

        runs = {m: trainer_run(m) for m in chosen if m != "bare"}
        if "bare" in chosen:
            bare_optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(t.betas), eps=t.eps,
                                               weight_decay=t.weight_decay, fused=device.type == "cuda" or None)
            autocast = trainer.autocast or torch.autocast("cpu", enabled=False)
            runs["bare"] = lambda r: bare_step(model, bare_optimizer, batches.batch(r)[0], trainer.micro, autocast,
                                               t.grad_clip)
        seconds, peak = measure(runs, rounds, b.warmup, device)

        def load(method: str) -> Callable[[int], None]:
            topk, hidden = READS[method]
            return lambda r: (reader.get(batches.batch(r)[1], topk=topk, hidden=hidden) if topk or hidden
                              else batches.batch(r))

        loader = {m: host_seconds(load(m), rounds, b.warmup) for m in chosen if m != "bare"}
    setup = {"device": device_name(device), "torch": torch.__version__, "student": cfg.student.name,
             "teacher": cfg.teacher.model.name, "batch_size": t.batch_size, "seq_len": t.seq_len,
             "micro_batch_size": trainer.micro, "precision": "fp32" if trainer.autocast is None else "bf16",
             "compile": bool(t.compile), "loss_chunk": t.loss_chunk, "accounting": cfg.budget.accounting,
             "warmup": b.warmup, "steps": b.steps}
    return setup | report(cfg, seconds, loader, peak_flops(device), peak)


def report(cfg: DictConfig, seconds: dict[str, list[float]], loader_seconds: dict[str, list[float]],
           peak: float | None, peak_mem_gib: dict[str, float]) -> dict:
    """Medians, rates and ratios of the measured seconds per step; MFU against `peak` FLOP/s when known."""
    t = cfg.train
    tokens = t.batch_size * t.seq_len
    step_s = {m: statistics.median(s) for m, s in seconds.items()}
    tps = {m: tokens / s for m, s in step_s.items()}
    loader = {m: tokens / statistics.median(s) for m, s in loader_seconds.items()}
    costs = method_flops(cfg)
    flops = {m: costs["nll" if m == "bare" else m] for m in tps}
    pairs = {f"{m}_nll": m for m in ("kd", "hldc", "ht") if m in tps and "nll" in tps}
    ratio = {key: step_s[m] / step_s["nll"] for key, m in pairs.items()}
    if "nll" in tps and "bare" in tps:
        ratio["trainer_bare"] = tps["nll"] / tps["bare"]
    if loader:
        ratio["loader_trainer"] = min(loader[m] / tps[m] for m in loader)
    out = {"tokens_per_step": tokens, "step_s": step_s, "step_s_all": seconds, "tokens_per_s": tps,
           "loader_tokens_per_s": loader, "flops_per_token": flops,
           "flop_ratio": {key: flops[m] / flops["nll"] for key, m in pairs.items()}, "ratio": ratio}
    if peak:
        out["mfu"] = {m: tps[m] * flops[m] / peak for m in tps}
    if peak_mem_gib:
        out["peak_mem_gib"] = peak_mem_gib
    return out


def format_table(result: dict) -> str:
    """The human-readable summary."""
    head = (f"{result['device']} | {result['student']} | {result['batch_size']}x{result['seq_len']} tokens/step | "
            f"{result['precision']} | compile={result['compile']} | median of {result['steps']} steps after "
            f"{result['warmup']} warm-up")
    lines = [head, "", f"{'run':5} {'step s':>9} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'time/NLL':>9} "
                       f"{'FLOP/NLL':>9} {'loader tok/s':>13}"]
    mfu, mem = result.get("mfu", {}), result.get("peak_mem_gib", {})
    step_s, flops = result["step_s"], result["flops_per_token"]
    for m, s in step_s.items():
        time_ratio = s / step_s["nll"] if "nll" in step_s else math.nan
        flop_ratio = flops[m] / flops["nll"] if "nll" in flops else math.nan
        mfu_text = f"{mfu[m]:6.1%}" if m in mfu else f"{'-':>6}"
        mem_text = f"{mem[m]:9.2f}" if m in mem else f"{'-':>9}"
        loader = result["loader_tokens_per_s"].get(m)
        lines.append(f"{m:5} {s:9.4f} {result['tokens_per_s'][m]:10.0f} {mfu_text} {mem_text} {time_ratio:9.3f} "
                     f"{flop_ratio:9.4f} {'-' if loader is None else f'{loader:.0f}':>13}")
    lines += ["", "ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in result["ratio"].items())]
    return "\n".join(lines)


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    cfg = C.compose(args)
    result = bench(cfg)
    print(format_table(result))
    if cfg.bench.json:
        Path(cfg.bench.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {cfg.bench.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
