"""The training loop: phases, AdamW, warm-up + cosine schedule, precision, checkpoints and exact resume.

A run is resumable at every checkpoint: the data order and the schedule are pure functions of the step,
so a checkpoint holds the weights, the optimizer, the regressor and (phase, step). Started again with the
same command, a killed run ends with bitwise-identical weights on CPU.
"""
from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm import tqdm

from hldx import losses
from hldx.budget import PhasePlan, RunPlan
from hldx.data import Batches
from hldx.device import device_of, peak_flops, world
from hldx.errors import ConfigError
from hldx.loader import Loader, Micro, Step
from hldx.methods import Phase, phases
from hldx.models import bottom_parameters, build_model, build_regressor, compile_layers, forward, forward_to_layer, \
    load_model, middle_layer
from hldx.store import CacheReader
from hldx.teacher import OnlineTeacher

def _all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average tensors across ranks in one flat buffer (the gradients of a step, or logged sums)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class Preemption:
    """SIGUSR2 (SLURM's warning before a time limit or preemption) and SIGTERM only raise a flag; the
    loop checkpoints at the next step boundary, then hands SIGUSR2 to the handler that was there before
    (submitit's, which requeues the job) or exits. All ranks stop at the same step."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __enter__(self) -> Preemption:
        self.received, self.previous = 0, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._raise_flag) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _raise_flag(self, signum, _frame) -> None:
        self.received = signum

    def requested(self, device: torch.device) -> bool:
        if world()[1] == 1:
            return bool(self.received)
        flag = torch.tensor([float(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.received = int(flag.item())
        return bool(self.received)

    def stop(self) -> None:
        previous = self.previous.get(self.received)
        if self.received == signal.SIGUSR2 and callable(previous):
            previous(signal.SIGUSR2, None)  # submitit: checkpoint the job description and requeue
        raise SystemExit(f"stopped by signal {self.received} after a checkpoint; the same command resumes")


def lr_at(peak: float, final_fraction: float, phase: Phase, plan: PhasePlan, step: int) -> float:
    """Linear warm-up to the peak, then constant or cosine decay to final_fraction * peak.

    A cosine phase follows the decay of a reference schedule of `plan.lr_total` steps entered at
    `plan.lr_offset` (0 for a single-phase run): HLDF's phase 2 re-warms up, then joins KD's curve.
    """
    ramp = peak * min(1.0, (step + 1) / plan.warmup_steps)
    if phase.schedule == "constant":
        return ramp
    s = plan.lr_offset + step
    if s < plan.lr_warmup:
        return min(ramp, peak * (s + 1) / plan.lr_warmup)
    progress = min(1.0, (s - plan.lr_warmup) / max(1, plan.lr_total - plan.lr_warmup))
    return min(ramp, peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))))


def _optimizer(cfg: DictConfig, params: list[nn.Parameter], extra: list[nn.Parameter], device) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not. The regressor is a group of its own."""
    def groups(ps):
        return [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
                {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups(params) + (groups(extra) if extra else []), lr=cfg.lr,
                             betas=tuple(cfg.train.betas), eps=cfg.train.eps,
                             fused=device.type == "cuda" or None)


@dataclass
class Checkpoint:
    """What a resume needs besides the weights; stored next to an HF-format model directory."""
    phase: int = 0
    step: int = 0
    tracking_run_id: str | None = None
    optimizer: dict | None = None
    regressor: dict | None = None
    extra: dict = field(default_factory=dict)

    @staticmethod
    def load(run_dir: Path) -> Checkpoint | None:
        state = run_dir / "ckpt" / "state.pt"
        if not state.exists():
            return None
        return Checkpoint(**torch.load(state, map_location="cpu", weights_only=True))

    def save(self, run_dir: Path, model, tokenizer) -> None:
        """Atomic: written beside, then renamed over the previous checkpoint."""
        tmp, final, old = run_dir / "ckpt.tmp", run_dir / "ckpt", run_dir / "ckpt.old"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save(self.__dict__, tmp / "state.pt")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)


class Trainer:
    """Runs the phases of a plan on one student; `log(metrics, step)` receives the training curves."""

    def __init__(self, cfg: DictConfig, plan: RunPlan, batches: Batches, teacher: CacheReader | OnlineTeacher | None,
                 run_dir: Path, tokenizer, log: Callable[[dict, int], None] | None,
                 tracking_run_id: str | None = None):
        self.cfg, self.plan, self.batches = cfg, plan, batches
        self.reader = teacher if isinstance(teacher, CacheReader) else None   # the teacher cache, read ahead
        self.online = teacher if isinstance(teacher, OnlineTeacher) else None  # or the teacher, run each step
        self.run_dir, self.tokenizer, self.log = Path(run_dir), tokenizer, log
        self.tracking_run_id = tracking_run_id
        self.device = device_of(cfg)
        self.layer = middle_layer(cfg.student.num_hidden_layers, cfg.hidden.student_layer)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
            self.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")) else None
        self.rank, self.world = world()
        micro = cfg.train.micro_batch_size or cfg.train.batch_size // self.world
        local = cfg.train.batch_size // self.world
        if local % micro:
            raise ConfigError(f"train.micro_batch_size={micro} is invalid: expected a divisor of the per-rank batch "
                              f"{local} (train.batch_size={cfg.train.batch_size} over {self.world} ranks)")
        self.micro = micro

    def loss(self, phase: Phase, model, regressor, micro: Micro) -> dict[str, Tensor]:
        """The phase's objective on one micro-batch, with its parts for logging."""
        cfg = self.cfg
        if self.online is not None:
            micro.topk_idx_BxLxK, micro.topk_val_BxLxK, micro.hidden_BxLxD = self.online(
                micro.tokens_BxL, phase.needs_teacher_logits, phase.needs_teacher_hidden)
        tokens_BxL, idx, val, target = micro.tokens_BxL, micro.topk_idx_BxLxK, micro.topk_val_BxLxK, micro.hidden_BxLxD
        if phase.name == "ht":
            hidden = forward_to_layer(model, tokens_BxL, self.layer)
            ht = losses.hidden_mse(regressor(hidden), target)
            return {"loss": ht, "loss_ht": ht}
        logits, hidden = forward(model, tokens_BxL, self.layer if phase.name == "hldc" else None)
        if phase.name == "nll":
            nll = losses.nll(logits, tokens_BxL, chunk=cfg.train.loss_chunk)
            return {"loss": nll, "loss_nll": nll}
        total, nll, kd = losses.kd_objective(logits, tokens_BxL, idx, val, cfg.tau, cfg.alpha,
                                             chunk=cfg.train.loss_chunk)
        parts = {"loss": total, "loss_nll": nll, "loss_kd": kd}
        if phase.name == "hldc":
            emb = losses.hidden_mse(regressor(hidden), target)
            parts |= {"loss": total + cfg.gamma * emb, "loss_emb": emb}
        return parts

    def step(self, phase: Phase, model, regressor, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
             extra: list[nn.Parameter], batch: Step, sums: dict[str, Tensor]) -> None:
        """One optimizer step on one batch: forward and backward per micro-batch (the loss parts, averaged
        over micro-batches, are added into `sums`), gradient all-reduce across ranks, clipping, AdamW."""
        n_micro = len(batch) // self.micro
        for start in range(0, len(batch), self.micro):
            micro = batch.micro(start, self.micro)
            with self.autocast or torch.autocast("cpu", enabled=False):
                parts = self.loss(phase, model, regressor, micro)
            (parts["loss"] / n_micro).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / n_micro
        if self.world > 1:
            _all_reduce_mean([p.grad for p in params + extra if p.grad is not None])
        if self.cfg.train.grad_clip:
            nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
            if extra:
                nn.utils.clip_grad_norm_(extra, self.cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def fit(self) -> nn.Module:
        cfg, device = self.cfg, self.device
        resume = Checkpoint.load(self.run_dir)
        if resume is None:
            model = build_model(cfg.student, cfg.seed)
            resume = Checkpoint()
        else:
            model = load_model(str(self.run_dir / "ckpt" / "model"))
        model.to(device).train()
        if cfg.train.compile:
            compile_layers(model)
        resume.tracking_run_id = self.tracking_run_id
        self.state = resume
        all_phases = phases(cfg)
        total_steps = sum(p.steps for p in self.plan.phases)
        done = sum(p.steps for p in self.plan.phases[:resume.phase]) + resume.step
        bar = tqdm(total=total_steps, initial=done, unit="step", dynamic_ncols=True,
                   disable=None if self.rank == 0 else True)
        with Preemption() as self.preemption:
            for index in range(resume.phase, len(all_phases)):
                phase, plan = all_phases[index], self.plan.phases[index]
                start = resume.step if index == resume.phase else 0
                self._run_phase(index, phase, plan, model, start, bar)
        bar.close()
        return model

    def _checkpoint(self, model) -> None:
        if self.rank == 0:
            self.state.save(self.run_dir, model, self.tokenizer)
        if self.world > 1:
            dist.barrier()

    def _run_phase(self, index: int, phase: Phase, plan: PhasePlan, model, start: int, bar) -> None:
        cfg, device = self.cfg, self.device
        regressor = None
        if phase.regressor:
            with torch.random.fork_rng(devices=[]):  # the student's own initialisation stays untouched
                torch.manual_seed(cfg.seed + 1)
                regressor = build_regressor(phase.regressor, cfg.student.hidden_size,
                                            cfg.teacher.model.hidden_size,
                                            cfg.method.get("regressor_expansion", 4)).to(device)
            if self.state.regressor and start > 0:
                regressor.load_state_dict(self.state.regressor)
        params = bottom_parameters(model, self.layer) if phase.name == "ht" else list(model.parameters())
        extra = list(regressor.parameters()) if regressor is not None else []
        optimizer = _optimizer(cfg, params, extra, device)
        if self.state.optimizer and start > 0:
            optimizer.load_state_dict(self.state.optimizer)
        first_step = sum(p.steps for p in self.plan.phases[:index])   # data position continues across phases
        parts = [part for part, needed in (("topk", phase.needs_teacher_logits), ("hidden", phase.needs_teacher_hidden))
                 if needed and self.reader is not None]
        loader = Loader(self.batches, self.reader, parts, range(first_step + start, first_step + plan.steps), device,
                        cfg.cache.prefetch, cfg.cache.readers)
        with loader:
            self._steps(index, phase, plan, model, regressor, optimizer, params, extra, loader, start, bar)

    def _steps(self, index: int, phase: Phase, plan: PhasePlan, model, regressor, optimizer, params, extra,
               loader: Loader, start: int, bar) -> None:
        cfg, device = self.cfg, self.device
        first_step = sum(p.steps for p in self.plan.phases[:index])   # data position continues across phases
        flops_before = sum(p.flops for p in self.plan.phases[:index])
        token_flops = self.plan.flops_per_token[phase.name]
        step_tokens = cfg.train.batch_size * cfg.train.seq_len
        peak = peak_flops(device)
        sums: dict[str, Tensor] = {}
        window_start, window_steps = time.perf_counter(), 0
        for step in range(start, plan.steps):
            lr = lr_at(cfg.lr, cfg.train.final_lr_fraction, phase, plan, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            self.step(phase, model, regressor, optimizer, params, extra, loader.get(first_step + step), sums)
            bar.update(1)
            window_steps += 1
            last = step + 1 == plan.steps
            if (step + 1) % cfg.train.log_every == 0 or last:
                if self.world > 1:
                    names = sorted(sums)
                    values = [torch.as_tensor(sums[k], dtype=torch.float32, device=device) for k in names]
                    _all_reduce_mean(values)
                    sums = dict(zip(names, values))
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * step_tokens / elapsed
                metrics = {f"train/{k}": float(v) / window_steps for k, v in sums.items()}
                metrics |= {"train/lr": lr, "train/phase": index,
                            "train/tokens": (first_step + step + 1) * step_tokens,
                            "train/flops": flops_before + (step + 1) * step_tokens * token_flops,
                            "perf/tokens_per_s": tokens_per_s}
                if peak:
                    metrics["perf/mfu"] = tokens_per_s * token_flops / peak
                if self.log is not None:
                    self.log(metrics, first_step + step + 1)
                bar.set_postfix(phase=phase.name, loss=f"{metrics['train/loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            stop = self.preemption.requested(device)
            if stop or last or (step + 1) % cfg.train.ckpt_every == 0:
                self.state.phase, self.state.step = (index + 1, 0) if last else (index, step + 1)
                self.state.optimizer = None if last else optimizer.state_dict()
                self.state.regressor = None if (last or regressor is None) else regressor.state_dict()
                self._checkpoint(model)
            if stop:
                self.preemption.stop()
