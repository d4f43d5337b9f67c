"""The training steps the bench times side by side: Trainer.step for NLL, KD, HLDC and HLDF's phase 1 (HT),
fed by the trainer's loader from a teacher cache of random values, and a bare PyTorch loop."""
from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from hldx.progress import Progress

from hldx import hidden, order
from hldx.budget import flops_per_token, shape_spec
from hldx.device import device_of
from hldx.loader import Loader
from hldx.methods import Phase, phases
from hldx.models import build_model, build_regressor, compile_layers
from hldx.store import CacheReader, CacheSpec, build, hidden_part, open_cache
from hldx.train import Trainer, _optimizer

STEPS = ("nll", "kd", "hldc", "ht", "bare")   # the trainer's steps (HT: HLDF's phase 1) and the bare loop


def reads(cfg: DictConfig, spec: CacheSpec) -> dict[str, tuple[str, ...]]:
    """The cache parts each step reads: the logits (top-k or sampled), and the hidden states after each teacher
    layer the pairs read."""
    layers = tuple(hidden_part(spec, t) for t in hidden.teacher_layers(cfg))
    return {"nll": (), "kd": (spec.logits,), "hldc": (spec.logits, *layers), "ht": layers}


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


def random_cache(cfg: DictConfig, rows: order.Rows, root: Path, tokenizer_digest: str,
                 hidden_dtype: str | None = None, logits: str | None = None) -> CacheReader:
    """A teacher cache of all training rows holding random logits (top-k: distinct ids, sorted values; sampled:
    draws from random logits over the vocabulary) and random hidden states of each teacher layer the pairs read,
    in the configured teacher's shapes and dtypes (hidden_dtype, logits: others), made and encoded on the job's
    device (as a build's teacher: drawing from 32k logits is a GPU's work)."""
    t, L = cfg.teacher.model, cfg.train.seq_len
    spec = shape_spec(OmegaConf.merge(cfg, {"cache": {"hidden_dtype": hidden_dtype or cfg.cache.hidden_dtype,
                                                      "logits": logits or cfg.cache.logits}}))
    spec = dataclasses.replace(spec, teacher_digest="random", tokenizer_digest=tokenizer_digest,
                               stream_digest=rows.digest)
    spec = dataclasses.replace(spec, extents={part: rows.count for part in reads(cfg, spec)["hldc"]})
    device = device_of(cfg)
    g = torch.Generator(device).manual_seed(cfg.seed)

    def outputs(part: str, n: int) -> tuple[torch.Tensor, ...]:
        V, K, on = spec.vocab_size, spec.k, {"generator": g, "device": device}
        if part == "topk":
            idx = (torch.randint(0, V, (n, L, 1), **on) + torch.arange(K, device=device) * (V // K)) % V  # distinct
            return idx, (10 * torch.rand(n, L, K, **on)).sort(-1, descending=True).values
        return (3 * torch.randn(n, L, V, **on),) if part == "sampled" else (torch.randn(n, L, t.hidden_size, **on),)

    def teacher_fn(tokens_NxL: torch.Tensor, parts: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, ...]]:
        return {part: outputs(part, len(tokens_NxL)) for part in parts}

    build(spec, root, teacher_fn, lambda r: torch.from_numpy(rows.tokens_RxL[r].astype(np.int64)),
          batch_rows=8, progress=False)
    return open_cache(root, spec)


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


def measure(runs: dict[str, Callable[[int], None]], rounds: int, warmup: int, device: torch.device,
            sync_debug: bool = False) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Call every run once per round, run i of round r at turn (i - r) mod n; return the seconds of each run's
    calls after `warmup` rounds and, on CUDA, the most memory allocated during them (GiB). sync_debug: on
    CUDA, a host-device synchronisation inside a measured call raises (torch.cuda.set_sync_debug_mode)."""
    names, cuda = list(runs), device.type == "cuda"
    marks: dict[str, list] = {name: [] for name in names}
    peak: dict[str, float] = {}
    for r in Progress(range(rounds), desc="bench rounds", unit="round", dynamic_ncols=True):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                if sync_debug and r >= warmup:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    runs[name](r)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, torch threads: {torch.get_num_threads()})"


def train_steps(cfg: DictConfig, chosen: list[str], rows: order.Rows, reader: CacheReader | None, tokenizer,
                device: torch.device, tmp: Path, sync_debug: bool = False
                ) -> tuple[dict[str, list[float]], dict[str, float], Trainer]:
    """Seconds per step of each chosen run (and peak GiB on CUDA), measured by `measure`."""
    t, b = cfg.train, cfg.bench
    rounds = b.warmup + b.steps
    batches = order.Batches(rows, t.batch_size)
    trainer = Trainer(cfg, None, batches, reader, tmp, tokenizer, None)  # only its step() is called
    model = build_model(cfg.student, cfg.seed).to(device).train()
    if t.compile:
        compile_layers(model)
    d_s, d_t = cfg.student.hidden_size, cfg.teacher.model.hidden_size
    step_phases = method_phases(cfg)
    regressors = {m: [build_regressor(step_phases[m].regressor, d_s, d_t, cfg.method.get("regressor_expansion", 4))
                      .to(device) for _ in hidden.pairs(cfg)] for m in ("hldc", "ht")}
    steps = [m for m in chosen if m != "bare"]
    engines = {m: trainer.engine(step_phases[m], model, regressors.get(m)) for m in steps}
    parts = reads(cfg, reader.spec) if reader is not None else {m: () for m in steps}
    loaders = {m: Loader(batches, reader, parts[m], range(rounds), device, cfg.cache.prefetch, cfg.cache.readers)
               for m in steps}
    # One AdamW for every trainer step: a step updates only what got gradients, so its cost is that of the
    # phase's own optimizer, and the bench holds one optimizer state (as a run does) instead of four.
    params = list({id(p): p for e in engines.values() for p in e.params}.values()) or list(model.parameters())
    extra = list({id(p): p for e in engines.values() for p in e.extra}.values())
    optimizer = _optimizer(cfg, params, extra, device)

    def trainer_run(method: str) -> Callable[[int], None]:
        return lambda r: trainer.step(step_phases[method], engines[method], optimizer, loaders[method].get(r))

    runs = {m: trainer_run(m) for m in loaders}
    if "bare" in chosen:
        bare_optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(t.betas), eps=t.eps,
                                           weight_decay=t.weight_decay, fused=device.type == "cuda" or None)
        autocast = trainer.autocast or torch.autocast("cpu", enabled=False)
        runs["bare"] = lambda r: bare_step(model, bare_optimizer, batches.batch(r)[0], trainer.micro, autocast,
                                           t.grad_clip)
    try:
        seconds, peak = measure(runs, rounds, b.warmup, device, sync_debug)
    finally:
        for loader in loaders.values():
            loader.close()
    return seconds, peak, trainer
