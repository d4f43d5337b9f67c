"""What a job costs: FLOPs per token of each method, the budget as tokens and steps per phase (paper
A.8-A.9), and GPU-hours and cache bytes for a list of jobs.

Two accountings. `paper` is A.9 verbatim: C_data = 6N + 6 d_S V, C_KD = C_data + C_teacher,
C_HT = 3N + 6 N_reg + C_teacher / 2, C_HLDC = C_KD + 6 N_reg, with N the backbone parameters and
N_reg = 2 d_S d_T (the only reading that reproduces the paper's 0.442 and 1.027 for the 123M student).
Several layer pairs (hldx.hidden) extend it the obvious way: N_reg per pair with a learned adapter (none for
identity), and C_HT's halves become the share of the layers phase 1 runs, 3N -> 6N m_S / D_S and C_teacher / 2
-> C_teacher m_T / D_T, m the deepest paired layers (the paper's middle pair gives back its own formula).
`exact` counts the matrix multiplications the real modules perform (what torch's FlopCounterMode sees):
projections, attention scores and values over the full sequence, the LM head, and the adapters that are
actually built, one per pair (linear for HLDC, the MLP for HLDF by default), with HLDF's phase 1 running the
student (and an online teacher) up to the deepest paired layer. A training step costs 3x its forward
(backward = 2x). An online teacher's forward is counted; a cached teacher costs nothing.

GPU-hours: each phase's tokens at a stated tokens/s per GPU, measured by `python -m hldx.bench` (plan.bench=
its bench.json) or else assumed: plan.mfu (default 40%) of plan.peak_flops (default 989e12, an H100's dense
bf16 peak) spent on the FLOPs the real modules perform per token (exact accounting, attention included).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hldx import config as C
from hldx import hidden
from hldx.methods import phases
from hldx.models import count_parameters
from hldx.store import CacheSpec, bytes_per_token, hidden_part, part_kind, part_layer

CHINCHILLA_TOKENS_PER_PARAM = 20


def _forward_matmul_flops(m: DictConfig, seq_len: int, layers: int, head: bool) -> float:
    """Forward matmul FLOPs per token of the first `layers` decoder layers (+ the LM head)."""
    d, hd = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * hd, m.num_key_value_heads * hd
    params = d * q + 2 * d * kv + q * d + 3 * d * m.intermediate_size
    attention = 2 * 2 * seq_len * q  # scores Q K^T and the weighted sum A V, full T x T
    return 2.0 * layers * params + layers * attention + (2.0 * d * m.vocab_size if head else 0.0)


def adapter_params(cfg: DictConfig) -> int:
    """The matmul parameters of an HLD job's adapters, one per layer pair (what each multiplies a token by; 0
    for NLL and KD)."""
    if cfg.method.name not in hidden.HLD:
        return 0
    d_s, d_t, e = cfg.student.hidden_size, cfg.teacher.model.hidden_size, cfg.method.get("regressor_expansion", 4)
    one = {"linear": d_s * d_t, "mlp": d_s * e * d_s + e * d_s * d_t, "identity": 0}[hidden.adapter(cfg)]
    return one * len(hidden.pairs(cfg))


def flops_per_token(cfg: DictConfig) -> dict[str, float]:
    """FLOPs per training token: `data` (NLL) and one entry per phase name of the method."""
    s, t = cfg.student, cfg.teacher.model
    accounting, seq_len = cfg.budget.accounting, cfg.train.seq_len
    online = cfg.method.name in C.DISTILLED and cfg.teacher.source == "online"
    d_s, d_t = s.hidden_size, t.hidden_size
    D, Dt = s.num_hidden_layers, t.num_hidden_layers
    hld = cfg.method.name in hidden.HLD
    m_s, m_t = (hidden.deepest(cfg), max(hidden.teacher_layers(cfg))) if hld else (D, Dt)
    if accounting == "paper":
        n = count_parameters(s)["backbone"]
        data = 6.0 * n + 6.0 * d_s * s.vocab_size
        teacher = 2.0 * count_parameters(t)["total"] if online else 0.0
        learned = len(hidden.pairs(cfg)) if hld and hidden.adapter(cfg) != "identity" else 0  # N_reg per pair
        n_reg = 2.0 * d_s * d_t * learned
        costs = {"nll": data, "kd": data + teacher, "hldc": data + teacher + 6 * n_reg,
                 "ht": 6.0 * n * m_s / D + 6 * n_reg + teacher * m_t / Dt}
    else:
        data = 3.0 * _forward_matmul_flops(s, seq_len, D, head=True)
        teacher_full = _forward_matmul_flops(t, seq_len, Dt, head=True) if online else 0.0
        teacher_bottom = _forward_matmul_flops(t, seq_len, m_t, head=False) if online else 0.0
        adapters = 6.0 * adapter_params(cfg)
        costs = {"nll": data, "kd": data + teacher_full, "hldc": data + teacher_full + adapters,
                 "ht": 3.0 * _forward_matmul_flops(s, seq_len, m_s, head=False) + adapters + teacher_bottom}
    return {"data": data, **{p.name: costs[p.name] for p in phases(cfg)}}


def budget_flops(cfg: DictConfig, data_flops_per_token: float) -> tuple[float, str]:
    """Total training FLOPs of every method of the run, and how the budget was given."""
    b = cfg.budget
    if b.flops is not None:
        return float(b.flops), f"budget.flops={b.flops:.3g}"
    if b.ot is not None:
        tokens = b.ot * CHINCHILLA_TOKENS_PER_PARAM * count_parameters(cfg.student)["backbone"]
        return tokens * data_flops_per_token, f"budget.ot={b.ot:g} (OT_{b.ot:g} = {tokens:.4g} NLL tokens)"
    return float(b.tokens) * data_flops_per_token, f"budget.tokens={b.tokens:.4g} (NLL tokens)"


@dataclass(frozen=True)
class PhasePlan:
    name: str
    tokens: int
    steps: int
    flops: float
    warmup_steps: int
    lr_offset: int    # steps of the reference (KD) schedule already spent when this phase starts
    lr_total: int     # length of the reference schedule the phase's decay follows
    lr_warmup: int    # warm-up of that reference schedule


@dataclass(frozen=True)
class RunPlan:
    method: str
    student: str
    run_key: str
    hp: dict
    flops_per_token: dict
    phases: list[PhasePlan]
    budget: str
    budget_flops: float
    name: str = ""    # the MLflow run name (hldx.config.run_name)

    @property
    def total_flops(self) -> float:
        return sum(p.flops for p in self.phases)

    def as_json(self) -> dict:
        return {"method": self.method, "student": self.student, **self.hp, "run_key": self.run_key,
                "flops_per_token": {"data": self.flops_per_token["data"],
                                    "method": self.flops_per_token[self.phases[-1].name]} | {
                    f"phase_{p.name}": self.flops_per_token[p.name] for p in self.phases},
                "phases": [asdict(p) for p in self.phases], "total_flops": self.total_flops,
                "budget_flops": self.budget_flops}


def _warmup(cfg: DictConfig, steps: int) -> int:
    """Warm-up steps of a phase: train.warmup_steps, capped at warmup_cap of the phase for tiny budgets."""
    return max(1, min(int(cfg.train.warmup_steps), int(cfg.train.warmup_cap * steps)))


def plan_run(cfg: DictConfig) -> RunPlan:
    """The run's phases with tokens, steps and FLOPs; raises ConfigError if a phase gets no step."""
    C.check(cfg)
    costs = flops_per_token(cfg)
    total, described = budget_flops(cfg, costs["data"])
    step_tokens = cfg.train.batch_size * cfg.train.seq_len
    plans = []
    for phase in phases(cfg):
        steps = round(total * phase.fraction / costs[phase.name] / step_tokens)
        if steps < 1:
            raise C.ConfigError(
                f"{described} is too small for one optimizer step of phase {phase.name!r} "
                f"({step_tokens} tokens = {step_tokens * costs[phase.name]:.3g} FLOPs): raise the budget")
        plans.append((phase, steps))
    result = []
    for phase, steps in plans:
        # A decaying phase follows the schedule of a run spending the whole budget on this phase's cost,
        # entered where the earlier phases left it: HLDF and KD at the same point end at the same lr.
        reference = round(total / costs[phase.name] / step_tokens)
        offset = max(0, reference - steps) if phase.schedule == "cosine" else 0
        result.append(PhasePlan(phase.name, steps * step_tokens, steps, steps * step_tokens * costs[phase.name],
                                _warmup(cfg, steps), offset, offset + steps, _warmup(cfg, offset + steps)))
    return RunPlan(cfg.method.name, cfg.student.name, C.run_key(cfg), C.hparams(cfg), costs, result,
                   described, total, C.run_name(cfg))



def real_flops(cfg: DictConfig, plan: RunPlan) -> float:
    """The FLOPs the run's modules really perform (the exact accounting) over the tokens its plan gives it."""
    exact = flops_per_token(OmegaConf.merge(cfg, {"budget": {"accounting": "exact"}}))
    return sum(p.tokens * exact[p.name] for p in plan.phases)


def accounting_bias(cfg: DictConfig, plan: RunPlan) -> float:
    """The run's real FLOPs over its KD partner's at the same budget, minus 1: 0 under the exact accounting;
    under the paper's, HLDC pays for twice its W_R and HLDF's phase-1 MLP is charged as 2 d_S d_T."""
    kd = C.as_kd(cfg)
    return real_flops(cfg, plan) / real_flops(kd, plan_run(kd)) - 1


def throughput(cfg: DictConfig) -> tuple[dict[str, float], str]:
    """Training tokens/s of one GPU in each phase of cfg's method, and where the numbers come from: measured
    by `python -m hldx.bench` (plan.bench=its bench.json), else assumed, plan.mfu of plan.peak_flops spent
    on the FLOPs that the real modules perform per token (the exact accounting, whatever the budget's)."""
    names = [p.name for p in phases(cfg)]
    if cfg.plan.bench:
        path = Path(cfg.plan.bench).expanduser()
        try:
            bench = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise C.ConfigError(f"plan.bench={path} is not a readable hldx.bench result ({err}): write one with "
                                f"python -m hldx.bench bench.json={path}, or drop plan.bench") from None
        measured = bench.get("tokens_per_s", {})
        missing = [n for n in names if n not in measured]
        if bench.get("student") != cfg.student.name or missing:
            raise C.ConfigError(f"plan.bench={path} measured student {bench.get('student')} ({', '.join(measured)}); "
                                f"this job needs student {cfg.student.name} ({', '.join(names)}): bench that")
        return {n: float(measured[n]) for n in names}, f"measured by hldx.bench on {bench.get('device')} ({path})"
    exact = flops_per_token(OmegaConf.merge(cfg, {"budget": {"accounting": "exact"}}))
    mfu, peak = float(cfg.plan.mfu), float(cfg.plan.peak_flops)
    if not 0 < mfu <= 1 or peak <= 0:
        raise C.ConfigError(f"plan.mfu={mfu} and plan.peak_flops={peak} must be in (0, 1] and > 0")
    return ({n: mfu * peak / exact[n] for n in names},
            f"assumed: {mfu:.0%} MFU of {peak / 1e12:g} TFLOP/s (plan.mfu, plan.peak_flops; plan.bench=PATH "
            f"takes hldx.bench's measured tokens/s instead)")


def gpu_hours(run: RunPlan, tokens_per_s: dict[str, float]) -> float:
    """GPU-hours of the run at the given tokens/s per GPU of each phase."""
    return sum(p.tokens / tokens_per_s[p.name] for p in run.phases) / 3600


def rows_read(cfg: DictConfig, plan: RunPlan) -> dict[str, int]:
    """Rows of the training order a job reads, in sequence from row 0: in all, and up to which row it reads
    the teacher's logits and hidden states (HLDF: hidden states in phase 1 and on the step after it,
    the held-out rows of phase 1's fit (hldx.train); logits in phase 2)."""
    need, end, batch = {"all": 0, "logits": 0, "hidden": 0}, 0, cfg.train.batch_size
    for i, (phase, p) in enumerate(zip(phases(cfg), plan.phases)):
        end += p.steps * batch
        need["all"] = end
        if cfg.method.name in C.DISTILLED and phase.needs_teacher_logits:
            need["logits"] = end
        if cfg.method.name in C.DISTILLED and phase.needs_teacher_hidden:
            need["hidden"] = end + (batch if i + 1 < len(plan.phases) else 0)
    return need


def cache_extents(cfg: DictConfig, plan: RunPlan, rows: int | None = None) -> tuple[int, int]:
    """The (logits, hidden) extents of the job's teacher cache, in rows (the hidden one: of each layer it reads):
    cache.rows and cache.hidden_rows (auto: what the job reads, all: hidden states wherever there are logits), at
    most the `rows` the order holds."""
    need, c = rows_read(cfg, plan), cfg.cache
    top = need["logits"] if c.rows == "auto" else int(c.rows)
    states = need["hidden"] if c.hidden_rows == "auto" else top if c.hidden_rows == "all" else int(c.hidden_rows)
    return (top, states) if rows is None else (min(top, rows), min(states, rows))


def shape_spec(cfg: DictConfig) -> CacheSpec:
    """The cache's shapes, dtypes and logits for cfg's teacher, no teacher, tokenizer or rows: what its parts are
    called and cost per token."""
    t, c = cfg.teacher.model, cfg.cache
    k = cfg.method.get("top_k", 128) if c.logits == "topk" else c.draws  # ids per position
    return CacheSpec("", "", "", cfg.train.seq_len, k, t.vocab_size, t.num_hidden_layers // 2, t.hidden_size,
                     c.values_dtype, c.hidden_dtype, c.rows_per_shard, c.logits, tuple(c.taus))


def cache_parts(cfg: DictConfig, plan: RunPlan, rows: int | None = None) -> dict[str, int]:
    """The parts of the job's teacher cache (named as hldx.store names them) and the rows [0, n) it needs of each:
    its logits (top-k or sampled), and the hidden states after each teacher layer its pairs read."""
    top, states = cache_extents(cfg, plan, rows)
    layers = hidden.teacher_layers(cfg) if cfg.method.name in hidden.HLD else []
    spec = shape_spec(cfg)
    return {spec.logits: top} | {hidden_part(spec, layer): states for layer in layers}


def cache_storage(configs: list[DictConfig], jobs: list[RunPlan], rows: int | None = None) -> dict | None:
    """Disk the shared teacher cache needs for the sweep: per part, the extent of its longest job x its bytes per
    token (checksums included), and in all; the logits part's name and bytes per token, the hidden states' summed
    over the layers, their tokens the layers' average. `rows`: what the training order holds, when known."""
    readers = [(cfg, job) for cfg, job in zip(configs, jobs)
               if cfg.method.name in C.DISTILLED and cfg.teacher.source == "cache"]
    if not readers:
        return None
    parts: dict[str, int] = {}
    for c, job in readers:
        for part, n in cache_parts(c, job, rows).items():
            parts[part] = max(parts.get(part, 0), n)
    cfg = readers[0][0]
    spec, seq = shape_spec(cfg), cfg.train.seq_len
    per_token = bytes_per_token(spec)
    top = parts.pop(spec.logits)
    parts = dict(sorted(parts.items(), key=lambda item: part_layer(spec, item[0])))  # the hidden ones, by layer
    layers = list(parts.values())
    return {"rows": top, "hidden_rows": max(layers, default=0), "logits": spec.logits,
            "logits_bytes_per_token": per_token[spec.logits],
            "hidden_bytes_per_token": per_token["hidden"] * len(layers), "tokens": top * seq,
            "hidden_tokens": seq * sum(layers) / len(layers) if layers else 0,
            "bytes": round(seq * (top * per_token[spec.logits] + sum(layers) * per_token["hidden"])),
            "parts": {part: {"layer": part_layer(spec, part), "rows": n, "tokens": n * seq,
                             "bytes_per_token": (b := per_token[part_kind(part)]), "bytes": round(seq * n * b)}
                      for part, n in {spec.logits: top, **parts}.items()}}


def layer_activation_bytes(m: DictConfig, gpu: bool) -> float:
    """What one token's forward keeps for the backward in one Gemma3 decoder layer, as saved-tensor hooks count
    it (tests/test_gpu_path.py): its six RMSNorms keep their float32 input and normalised output (4 of width d,
    q and k per head: 32 d + 8 (q + kv) bytes); attention keeps q, k, v and its output, the GeGLU MLP its gate,
    up, activation and down input (2 q + 2 kv and 4 I values in the compute dtype); under bf16 autocast each of
    the five matmuls fed by a norm casts its input anew (10 d), in float32 two more d-vectors stay (8 d); and a
    float32 rsqrt per norm and head, the attention's log-sum-exp per head."""
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    half = 2 if gpu else 4
    per_head = 4 * (4 + 2 * m.num_attention_heads + m.num_key_value_heads)
    return 32 * m.hidden_size + 8 * (q + kv) + half * (2 * q + 2 * kv + 4 * m.intermediate_size) \
        + (10 if gpu else 8) * m.hidden_size + per_head


def _activation_bytes_per_token(cfg: DictConfig, phase: str, gpu: bool) -> float:
    """What one token's forward keeps for the backward: the decoder layers it runs (layer_activation_bytes);
    at the head the logits and their gradient (the compute dtype); each adapter's outputs (float32: the MLP's
    hidden layer and d_T, linear's d_T)."""
    s, t = cfg.student, cfg.teacher.model
    half = 2 if gpu else 4
    layer = layer_activation_bytes(s, gpu)
    adapters = 0
    if phase in ("ht", "hldc"):
        kind = hidden.adapter(cfg)
        width = cfg.method.get("regressor_expansion", 4) * s.hidden_size if kind == "mlp" else 0
        adapters = len(hidden.pairs(cfg)) * 4 * (width + (t.hidden_size if kind != "identity" else 0))
    if phase == "ht":
        return hidden.deepest(cfg) * layer + adapters
    head = 2 * half * s.vocab_size + 4 * s.hidden_size
    return s.num_hidden_layers * layer + head + adapters


def _input_bytes(cfg: DictConfig, phase, rows: int, micro: int) -> float:
    """The loader's copies on the device (hldx.loader): two steps of this rank's rows as stored (a step's copies
    are issued while the one before computes) and one micro-batch decoded (int64 ids and float32 values of the
    top-k or the draws, the draws' float32 log-normalisers, float32 hidden states)."""
    t = cfg.teacher.model
    stored, decoded = 4.0, 8.0  # the tokens: int32 as stored, int64 on the device
    if cfg.method.name in C.DISTILLED and cfg.teacher.source == "cache":
        spec = shape_spec(cfg)
        per_token = bytes_per_token(spec)
        if phase.needs_teacher_logits:
            lse = 4 * len(spec.taus) if spec.logits == "sampled" else 0
            stored, decoded = stored + per_token[spec.logits], decoded + 12 * spec.k + lse
        if phase.needs_teacher_hidden:
            layers = len(hidden.teacher_layers(cfg))
            stored, decoded = stored + layers * per_token["hidden"], decoded + layers * 4 * t.hidden_size
    return cfg.train.seq_len * (2 * rows * stored + micro * decoded)


def memory_per_rank(cfg: DictConfig, mode: str, ranks: int, gpu: bool = True, phase: str | None = None
                    ) -> dict[str, float]:
    """Bytes per rank of each phase of cfg's job under parallel `mode` on `ranks` ranks, the largest phase's:
    weights (float32; under FSDP2 a shard, plus a layer and the root unsharded in bf16 for compute),
    gradients (float32, DDP's buckets are their views), AdamW's two moments, the activations of one
    micro-batch (train.micro_batch_size, else the rank's share of train.batch_size) and, on a GPU, the
    loader's copies of its inputs. `phase`: that phase's alone. An estimate, to refuse
    what cannot fit before launch; the GPU bench measures the real peak beside it."""
    s, t = cfg.student, cfg.train
    n = count_parameters(s)
    micro = t.micro_batch_size or max(1, t.batch_size // ranks)
    shard = ranks if mode == "fsdp" else 1
    layer = (n["backbone"] - 2 * s.hidden_size) / s.num_hidden_layers  # one decoder layer's parameters
    worst: dict[str, float] = {}
    for each in phases(cfg):
        if phase is not None and each.name != phase:
            continue
        reg = adapter_params(cfg) if each.regressor else 0
        p = n["total"] + reg
        out = {"weights": 4 * p / shard, "gradients": 4 * p / shard, "adamw": 8 * p / shard,
               "activations": micro * t.seq_len * _activation_bytes_per_token(cfg, each.name, gpu),
               "inputs": _input_bytes(cfg, each, t.batch_size // ranks, micro) if gpu else 0.0}
        if mode == "fsdp":
            out["weights"] += (2 if gpu else 4) * (2 * layer + n["embedding"] + reg)  # unsharded for compute
            # Gradients are reduce-scattered after the last micro-batch only (set_requires_gradient_sync): until
            # then every layer keeps its full gradient, upcast to float32; with one micro-batch, one layer's.
            out["gradients"] += 4 * (p if micro < t.batch_size // ranks else layer)
        out["total"] = sum(out.values())
        if out["total"] > worst.get("total", 0):
            worst = out
    return worst


def parallel_mode(cfg: DictConfig, ranks: int) -> str:
    """train.parallel, auto resolved: fsdp when DDP's estimate per rank exceeds plan.device_memory or its model
    states alone (weights, gradients, AdamW) take half of it (the 3.4B teacher), else ddp with several ranks
    and none with one."""
    if cfg.train.parallel != "auto":
        return cfg.train.parallel
    ddp = memory_per_rank(cfg, "ddp", ranks)
    if ddp["total"] > cfg.plan.device_memory or ddp["total"] - ddp["activations"] > cfg.plan.device_memory / 2:
        return "fsdp"
    return "ddp" if ranks > 1 else "none"


def check_memory(cfg: DictConfig, ranks: int) -> None:
    """Refuse, before launch, a job on `ranks` GPUs whose estimated memory per rank exceeds plan.device_memory,
    naming the fix."""
    mode = parallel_mode(cfg, ranks)
    need = memory_per_rank(cfg, mode, ranks)
    if need["total"] <= cfg.plan.device_memory:
        return
    parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in need.items() if k != "total")
    fixes = [] if mode == "fsdp" else ["train.parallel=fsdp (shards weights, gradients and AdamW)"]
    fixes += [f"a smaller train.micro_batch_size (now {cfg.train.micro_batch_size or cfg.train.batch_size // ranks})",
              f"more ranks (now {ranks})"]
    raise C.ConfigError(f"plan.device_memory={cfg.plan.device_memory / 1e9:g} GB is too small for this job: "
                        f"{need['total'] / 1e9:.1f} GB per rank under train.parallel={mode} on {ranks} rank(s) "
                        f"({parts} GB); try " + ", or ".join(fixes))
