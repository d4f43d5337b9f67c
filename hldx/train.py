"""The training loop: phases, AdamW, warm-up + cosine schedule, precision, and on several ranks DDP or FSDP2.

Each phase trains one module (hldx.models.PhaseNet) on the engine hldx.parallel wraps it in, fed by hldx.loader;
checkpoints and exact resume are hldx.checkpoint's. Started again with the same command, a killed run ends
with bitwise-identical weights on CPU.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn
from hldx.progress import Progress

from hldx import hidden, losses
from hldx.budget import PhasePlan, RunPlan, parallel_mode
from hldx.checkpoint import Checkpoint, Preemption, barrier, latest, save_start, start_dir
from hldx.order import Batches
from hldx.device import device_of, peak_flops, world
from hldx.errors import ConfigError, RunFailed
from hldx.loader import Loader, Micro, Step
from hldx.methods import Phase, phases
from hldx.models import PhaseNet, build_model, build_regressor, compile_layers, load_model
from hldx.parallel import Engine
from hldx.store import UNIT_CODES, CacheReader, hidden_part
from hldx.teacher import OnlineTeacher


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


def adam_sqrt_v_percentiles(optimizer: torch.optim.AdamW, qs: tuple[float, ...] = (0.1, 0.5)) -> list[float]:
    """Percentiles of sqrt(v_hat), AdamW's bias-corrected second-moment root (what train.eps is added to), over
    every element of the trained parameters that a gradient has reached (embedding rows of tokens not seen yet
    are left out; under FSDP2, over this rank's shard)."""
    roots = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" in state:
                v = state["exp_avg_sq"]
                v = v.to_local() if hasattr(v, "to_local") else v
                v_N = v.flatten().float()
                roots.append((v_N[v_N > 0] / (1 - group["betas"][1] ** float(state["step"]))).sqrt())
    all_N = torch.cat(roots) if roots else torch.empty(0)
    if not all_N.numel():
        return [math.nan] * len(qs)
    return [float(all_N.kthvalue(max(1, math.ceil(q * all_N.numel()))).values) for q in qs]


class Guard:
    """Stops a diverged run: each step's loss parts and gradient norm are checked on the device (no host sync),
    the first step where one is not finite is kept there with its values, and `check()` (at log steps and
    before a checkpoint, where the host waits anyway) raises RunFailed naming them."""

    def __init__(self, device: torch.device, lr_of: Callable[[int], float], where: str):
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.values: Tensor | None = None
        self.names: list[str] = []
        self.lr_of, self.where = lr_of, where

    def watch(self, step: int, parts: dict[str, Tensor]) -> None:
        """Step `step` (1-based, of the run) ended with these loss parts and gradient norm."""
        self.names = sorted(parts)
        values = torch.stack([torch.as_tensor(parts[k]).float().reshape(()) for k in self.names])
        first = ~torch.isfinite(values).all() & (self.first < 0)
        self.first = torch.where(first, step, self.first)
        self.values = values if self.values is None else torch.where(first, values, self.values)

    def check(self) -> None:
        step = int(self.first)
        if step >= 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names, self.values.tolist()))
            raise RunFailed(f"diverged at step {step} ({self.where}): {shown} at lr={self.lr_of(step):.3g}")


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
        self.pairs, self.weights = hidden.pairs(cfg), hidden.weights(cfg)  # NLL and KD ignore them
        self.teacher_layers = hidden.teacher_layers(cfg)
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else None  # CPU: on request
        self.rank, self.world = world()
        self.mode = parallel_mode(cfg, self.world)
        if self.mode != "none" and not dist.is_initialized():
            raise ConfigError(f"train.parallel={self.mode} needs the job's process group: start the ranks with "
                              f"torchrun, or as tasks of a SLURM job")
        micro = cfg.train.micro_batch_size or cfg.train.batch_size // self.world
        local = cfg.train.batch_size // self.world
        if local % micro:
            raise ConfigError(f"train.micro_batch_size={micro} is invalid: expected a divisor of the per-rank batch "
                              f"{local} (train.batch_size={cfg.train.batch_size} over {self.world} ranks)")
        self.micro = micro

    def engine(self, phase: Phase, model: nn.Module, regressors: list[nn.Module] | None) -> Engine:
        """The phase's module on this job's ranks: with the adapters of a hidden phase, one per layer pair."""
        taps = [s for s, _ in self.pairs] if regressors else []
        return Engine(PhaseNet(model, taps, regressors or [], bottom=phase.name == "ht"), self.mode, self.device,
                      bf16=self.autocast is not None)

    def loss(self, phase: Phase, engine: Engine, micro: Micro) -> dict[str, Tensor]:
        """The phase's objective on one micro-batch, with its parts for logging."""
        cfg = self.cfg
        if self.online is not None:
            micro.topk_idx_BxLxK, micro.topk_val_BxLxK, micro.hidden = self.online(
                micro.tokens_BxL, phase.needs_teacher_logits, self.teacher_layers if phase.needs_teacher_hidden else ())
        tokens_BxL, idx, val = micro.tokens_BxL, micro.topk_idx_BxLxK, micro.topk_val_BxLxK
        logits, predicted = engine.module(tokens_BxL)
        if phase.name == "ht":
            ht, per_pair = self.hidden_loss(predicted, micro.hidden)
            return {"loss": ht, "loss_ht": ht} | {f"loss_ht_{name}": v for name, v in per_pair.items()}
        if phase.name == "nll":
            nll = losses.nll(logits, tokens_BxL, chunk=cfg.train.loss_chunk)
            return {"loss": nll, "loss_nll": nll}
        total, nll, kd = losses.kd_objective(logits, tokens_BxL, idx, val, cfg.tau, cfg.alpha,
                                             chunk=cfg.train.loss_chunk, lse_BxLxT=micro.lse_BxLxT,
                                             taus=self.reader.spec.taus if self.reader else ())
        parts = {"loss": total, "loss_nll": nll, "loss_kd": kd}
        if phase.name == "hldc":
            emb, per_pair = self.hidden_loss(predicted, micro.hidden)
            parts |= {"loss": total + cfg.gamma * emb, "loss_emb": emb} | {
                f"loss_emb_{name}": v for name, v in per_pair.items()}
        return parts

    def hidden_loss(self, predicted: list[Tensor], targets: dict[int, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The hidden loss: each pair's loss between its adapter's prediction and its teacher layer's states,
        weighted (hidden.weights) and summed; with several pairs also each pair's own, named s<student>_t<teacher>.
        An unbiased code of the unit target (cache.hidden_dtype=sr2): the losses are linear in it, so each loss and
        its gradient have the float32 target's as their expectation."""
        unit = self.reader is not None and self.reader.spec.hidden_dtype in UNIT_CODES
        each = [losses.hidden_loss(p, targets[t], self.cfg.hidden.loss, unit_target=unit)
                for p, (_, t) in zip(predicted, self.pairs)]
        total = sum(w * loss for w, loss in zip(self.weights, each))
        return total, {f"s{s}_t{t}": loss for (s, t), loss in zip(self.pairs, each)} if len(each) > 1 else {}

    def step(self, phase: Phase, engine: Engine, optimizer: torch.optim.Optimizer, batch: Step) -> dict[str, Tensor]:
        """One optimizer step on one batch: forward and backward per micro-batch (gradients are reduced across
        ranks after the last one), clipping, AdamW; the loss parts averaged over micro-batches and the gradient
        norm, as device tensors."""
        n_micro, step_parts = len(batch) // self.micro, {}
        for i, start in enumerate(range(0, len(batch), self.micro)):
            micro = batch.micro(start, self.micro)
            with engine.micro(last=i + 1 == n_micro), self.autocast or torch.autocast("cpu", enabled=False):
                parts = self.loss(phase, engine, micro)
                (parts["loss"] / n_micro).backward()
            for k, v in parts.items():
                step_parts[k] = step_parts.get(k, 0.0) + v.detach() / n_micro
        step_parts["grad_norm"] = engine.clip(self.cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_parts

    def fit(self) -> Path:
        """Train every phase left (from the checkpoint, if there is one); where the student's final weights are
        (HF format, written by rank 0: whoever needs them loads them, one copy on a node's host)."""
        cfg, n = self.cfg, len(self.plan.phases)
        resume = Checkpoint.load(self.run_dir) or Checkpoint(ranks=self.world)
        resume.check_ranks(self.run_dir, self.world)  # hldx.job checks it first; the Trainer stands alone too
        resume.tracking_run_id = self.tracking_run_id
        self.state = resume
        if resume.phase == 0 and resume.step == 0:
            save_start(lambda: build_model(cfg.student, cfg.seed), start_dir(self.run_dir, 0, n))
        done = sum(p.steps for p in self.plan.phases[:resume.phase]) + resume.step
        bar = Progress(total=sum(p.steps for p in self.plan.phases), initial=done, unit="step", dynamic_ncols=True,
                       disable=None if self.rank == 0 else True, line_every_s=math.inf)  # off a tty: a line per log
        with Preemption() as self.preemption, bar:
            for index in range(resume.phase, n):
                start = resume.step if index == resume.phase else 0
                self._run_phase(index, phases(cfg)[index], self.plan.phases[index], start, bar)
        return start_dir(self.run_dir, n, n)

    def _run_phase(self, index: int, phase: Phase, plan: PhasePlan, start: int, bar) -> None:
        cfg, device, n = self.cfg, self.device, len(self.plan.phases)
        model = self._start_model(index).train()
        if cfg.train.compile:
            compile_layers(model)
        regressors = None
        if phase.regressor:
            with torch.random.fork_rng(devices=[]):  # the student's own initialisation stays untouched
                torch.manual_seed(cfg.seed + 1)  # the pairs' adapters in turn: one pair's as before pairs existed
                regressors = [build_regressor(phase.regressor, cfg.student.hidden_size, cfg.teacher.model.hidden_size,
                                              cfg.method.get("regressor_expansion", 4)).to(device) for _ in self.pairs]
        engine = self.engine(phase, model, regressors)
        optimizer = _optimizer(cfg, engine.params, engine.extra, device)
        if start > 0:
            engine.load(latest(self.run_dir) / "dcp", optimizer)
        first_step = sum(p.steps for p in self.plan.phases[:index])   # data position continues across phases
        parts = [] if self.reader is None else ([self.reader.spec.logits] if phase.needs_teacher_logits else []) + (
            [hidden_part(self.reader.spec, t) for t in self.teacher_layers] if phase.needs_teacher_hidden else [])
        loader = Loader(self.batches, self.reader, parts, range(first_step + start, first_step + plan.steps), device,
                        cfg.cache.prefetch, cfg.cache.readers)
        held_out = first_step + plan.steps  # HLDF: the step after phase 1, on rows phase 1 never trains on
        if phase.name == "ht" and start == 0:
            self._log({f"hidden/cosine_start{k}": v for k, v in self.held_out_cosine(engine, held_out).items()},
                      first_step)
        with loader:
            stop = self._steps(index, phase, plan, engine, optimizer, loader, start, bar)
        if phase.name == "ht":
            self._log({f"hidden/cosine_end{k}": v for k, v in self.held_out_cosine(engine, held_out).items()},
                      held_out)
        # The phase's end: the student's weights, gathered on rank 0, are where the next phase (or the run) starts.
        state = engine.student_state()

        def end() -> nn.Module:
            model = load_model(str(start_dir(self.run_dir, index, n)))
            model.load_state_dict(state, strict=False)  # HLDF's phase 1: its bottom; the rest as it was
            return model

        save_start(end, start_dir(self.run_dir, index + 1, n))
        self.state.phase, self.state.step = index + 1, 0
        self.state.save(self.run_dir)
        if self.rank == 0:
            shutil.rmtree(start_dir(self.run_dir, index, n), ignore_errors=True)
        barrier()
        if stop:
            self.preemption.stop()

    def held_out_cosine(self, engine: Engine, step: int) -> dict[str, float]:
        """HLDF phase 1's held-out fit: the mean cosine of each pair's adapter output with its teacher layer's
        hidden states over the tokens of training step `step` (every rank's rows; sr2's unbiased code t~: the mean
        of n(p).t~, unbiased for it); under "" the pairs' mean weighted as the loss weighs them, and with several
        pairs each pair's under "_s<student>_t<teacher>"."""
        parts = [] if self.reader is None else [hidden_part(self.reader.spec, t) for t in self.teacher_layers]
        unit = self.reader is not None and self.reader.spec.hidden_dtype in UNIT_CODES
        total_P = torch.zeros(len(self.pairs), device=self.device)
        with Loader(self.batches, self.reader, parts, range(step, step + 1), self.device, 1, 1) as loader, \
                torch.no_grad():
            batch = loader.get(step)
            for start in range(0, len(batch), self.micro):
                micro = batch.micro(start, self.micro)
                if self.online is not None:
                    micro.hidden = self.online(micro.tokens_BxL, False, self.teacher_layers)[2]
                with self.autocast or torch.autocast("cpu", enabled=False):
                    _, predicted = engine.module(micro.tokens_BxL)
                total_P += torch.stack([1 - losses.hidden_loss(p, micro.hidden[t], "cosine", unit_target=unit)
                                        for p, (_, t) in zip(predicted, self.pairs)])
        total_P /= len(batch) // self.micro
        if self.world > 1:
            dist.all_reduce(total_P)
            total_P /= self.world
        each = total_P.tolist()
        return {"": sum(w * c for w, c in zip(self.weights, each))} | (
            {f"_s{s}_t{t}": c for (s, t), c in zip(self.pairs, each)} if len(each) > 1 else {})

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.log is not None:
            self.log(metrics, step)

    def _start_model(self, index: int) -> nn.Module:
        """The student at the start of phase `index`, on the device: rank 0 loads it; under DDP or FSDP2 the other
        ranks build one of its shape in place on the device, whose weights the engine sets to rank 0's (DDP's
        broadcast, Engine's for FSDP2): one copy of the weights on a node's host, not one per rank."""
        if self.rank == 0 or self.mode == "none":
            return load_model(str(start_dir(self.run_dir, index, len(self.plan.phases)))).to(self.device)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.device(self.device):
            return build_model(self.cfg.student, self.cfg.seed)

    def _steps(self, index: int, phase: Phase, plan: PhasePlan, engine: Engine, optimizer, loader: Loader,
               start: int, bar) -> bool:
        """The phase's steps from `start`; whether a stop was asked for at its last one (the phase ends first)."""
        cfg, device = self.cfg, self.device
        first_step = sum(p.steps for p in self.plan.phases[:index])
        flops_before = sum(p.flops for p in self.plan.phases[:index])
        token_flops = self.plan.flops_per_token[phase.name]
        step_tokens = cfg.train.batch_size * cfg.train.seq_len
        peak = peak_flops(device)
        sums: dict[str, Tensor] = {}
        guard = Guard(device, lambda s: lr_at(cfg.lr, cfg.train.final_lr_fraction, phase, plan, s - first_step - 1),
                      f"phase {index + 1} of {len(self.plan.phases)} ({phase.name})")
        window_start, window_steps = time.perf_counter(), 0
        for step in range(start, plan.steps):
            lr = lr_at(cfg.lr, cfg.train.final_lr_fraction, phase, plan, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_parts = self.step(phase, engine, optimizer, loader.get(first_step + step))
            guard.watch(first_step + step + 1, step_parts)
            if phase.name == "hldc" and step in (0, plan.steps - 1):  # the hidden path's fit, first and last step
                names = [k for k in sorted(step_parts) if k.startswith("loss_emb")]  # in all, and each pair's
                emb = torch.stack([step_parts[k] for k in names])
                if self.world > 1:
                    dist.all_reduce(emb)
                    emb /= self.world
                when = "start" if step == 0 else "end"
                self._log({f"hidden/loss_emb_{when}{k.removeprefix('loss_emb')}": v for k, v in zip(names, emb.tolist())},
                          first_step + step + 1)
            for k, v in step_parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            window_steps += 1
            last = step + 1 == plan.steps
            if (step + 1) % cfg.train.log_every == 0 or last:
                guard.check()  # a host sync the logging below makes anyway
                names = sorted(sums)
                values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=device) for k in names])
                if self.world > 1:
                    dist.all_reduce(values)
                    values /= self.world
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * step_tokens / elapsed
                metrics = {f"train/{k}": float(v) / window_steps for k, v in zip(names, values.tolist())}
                metrics |= {"train/lr": lr, "train/phase": index,
                            "train/tokens": (first_step + step + 1) * step_tokens,
                            "train/flops": flops_before + (step + 1) * step_tokens * token_flops,
                            "perf/tokens_per_s": tokens_per_s}
                if peak:
                    metrics["perf/mfu"] = tokens_per_s * token_flops / peak
                if phase.name == "ht":  # is AdamW's eps of the order of sqrt(v) (hidden.loss=mse)?
                    p10, p50 = adam_sqrt_v_percentiles(optimizer)
                    metrics |= {"train/adam_sqrt_v_p10": p10, "train/adam_sqrt_v_p50": p50}
                self._log(metrics, first_step + step + 1)
                bar.set_postfix(phase=phase.name, loss=f"{metrics['train/loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            stop = self.preemption.requested()
            if last:
                return stop
            if stop or (step + 1) % cfg.train.ckpt_every == 0:
                guard.check()  # never a checkpoint of diverged weights
                self.state.phase, self.state.step = index, step + 1
                self.state.save(self.run_dir, lambda path: engine.save(path, optimizer))
            if stop:
                self.preemption.stop()
        return False
