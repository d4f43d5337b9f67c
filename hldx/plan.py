"""FLOPs per token of each method, and the budget turned into tokens and steps per phase (paper A.8-A.9).

Two accountings. `paper` is A.9 verbatim: C_data = 6N + 6 d_S V, C_KD = C_data + C_teacher,
C_HT = 3N + 6 N_reg + C_teacher / 2, C_HLDC = C_KD + 6 N_reg, with N the backbone parameters and
N_reg = 2 d_S d_T (the only reading that reproduces the paper's 0.442 and 1.027 for the 123M student).
`exact` counts the matrix multiplications the real modules perform (what torch's FlopCounterMode sees):
projections, attention scores and values over the full sequence, the LM head, and the regressor that is
actually built (linear for HLDC, the MLP for HLDF). A training step costs 3x its forward (backward = 2x).
An online teacher's forward is counted; a cached teacher costs nothing.

    python -m hldx.plan -m method=kd,hldf lr=1e-4,4e-4 [plan.json=PATH]
    python -m hldx.plan -m +sweep=paper-123m                 # a study's grid from sweeps/, with its GPU-hours

GPU-hours: each phase's tokens at a stated tokens/s per GPU, measured by `python -m hldx.bench` (plan.bench=
its bench.json) or else assumed: plan.mfu (default 40%) of plan.peak_flops (default 989e12, an H100's dense
bf16 peak) spent on the FLOPs the real modules perform per token (exact accounting, attention included).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from hldx import config as C
from hldx.methods import phases
from hldx.models import count_parameters, middle_layer

CHINCHILLA_TOKENS_PER_PARAM = 20


def _forward_matmul_flops(m: DictConfig, seq_len: int, layers: int, head: bool) -> float:
    """Forward matmul FLOPs per token of the first `layers` decoder layers (+ the LM head)."""
    d, hd = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * hd, m.num_key_value_heads * hd
    params = d * q + 2 * d * kv + q * d + 3 * d * m.intermediate_size
    attention = 2 * 2 * seq_len * q  # scores Q K^T and the weighted sum A V, full T x T
    return 2.0 * layers * params + layers * attention + (2.0 * d * m.vocab_size if head else 0.0)


def _regressor_params(kind: str, d_s: int, d_t: int, expansion: int) -> int:
    return d_s * d_t if kind == "linear" else d_s * expansion * d_s + expansion * d_s * d_t


def flops_per_token(cfg: DictConfig) -> dict[str, float]:
    """FLOPs per training token: `data` (NLL) and one entry per phase name of the method."""
    s, t = cfg.student, cfg.teacher.model
    accounting, seq_len = cfg.budget.accounting, cfg.train.seq_len
    online = cfg.method.name in C.DISTILLED and cfg.teacher.source == "online"
    d_s, d_t = s.hidden_size, t.hidden_size
    if accounting == "paper":
        n = count_parameters(s)["backbone"]
        data = 6.0 * n + 6.0 * d_s * s.vocab_size
        teacher = 2.0 * count_parameters(t)["total"] if online else 0.0
        n_reg = 2.0 * d_s * d_t
        costs = {"nll": data, "kd": data + teacher, "hldc": data + teacher + 6 * n_reg,
                 "ht": 3.0 * n + 6 * n_reg + teacher / 2}
    else:
        D, Dt = s.num_hidden_layers, t.num_hidden_layers
        m_s = middle_layer(D, cfg.hidden.student_layer)
        m_t = middle_layer(Dt, cfg.hidden.teacher_layer)
        data = 3.0 * _forward_matmul_flops(s, seq_len, D, head=True)
        teacher_full = _forward_matmul_flops(t, seq_len, Dt, head=True) if online else 0.0
        teacher_half = _forward_matmul_flops(t, seq_len, m_t, head=False) if online else 0.0
        expansion = cfg.method.get("regressor_expansion", 4)
        costs = {"nll": data, "kd": data + teacher_full,
                 "hldc": data + teacher_full + 6.0 * _regressor_params("linear", d_s, d_t, expansion),
                 "ht": 3.0 * _forward_matmul_flops(s, seq_len, m_s, head=False)
                 + 6.0 * _regressor_params("mlp", d_s, d_t, expansion) + teacher_half}
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
    C.validate(cfg)
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
                   described, total)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's own expansion of a sweep into one override list per job, as hldx's sweeper launches it: the
    grid of a sweep config (hydra.sweeper.params, e.g. from +sweep=NAME), then the command line's
    overrides (a=1,2 b=x,y), which win for a key given in both."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    sources = [o.input_line for o in parser.parse_overrides(overrides)  # what can set hydra.sweeper.params
               if not o.is_sweep_override() and o.key_or_group.split(".")[0] in ("sweep", "hydra")]
    params = C.compose(sources, with_hydra=True).hydra.sweeper.get("params") or {}
    parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def plan_jobs(jobs: list[list[str]]) -> tuple[list[tuple[list[str], DictConfig, RunPlan]], list[str]]:
    """The distinct jobs (the first of each run_key) with their config and plan, and an error line per bad job."""
    planned, errors, seen, compose = [], [], set(), C.Composer()
    for job in jobs:
        try:
            cfg = compose(job)
            run = plan_run(cfg)
        except Exception as err:  # noqa: BLE001 - every bad job is reported, then we stop
            errors.append(f"  {' '.join(job) or '(defaults)'}: {err}")
            continue
        if run.run_key not in seen:
            seen.add(run.run_key)
            planned.append((job, cfg, run))
    return planned, errors


def plan_sweep(overrides: list[str]) -> tuple[list[RunPlan], list[str]]:
    """Unique jobs of a sweep (deduplicated by run_key) and one error line per bad job."""
    planned, errors = plan_jobs(expand_sweep(overrides))
    return [run for _, _, run in planned], errors


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


def cache_storage(configs: list[DictConfig], jobs: list[RunPlan]) -> dict | None:
    """Disk the shared teacher cache needs for the sweep: bytes per token x the most tokens a job reads."""
    from hldx.cache import CacheSpec, bytes_per_token

    readers = [(cfg, job) for cfg, job in zip(configs, jobs)
               if cfg.method.name in C.DISTILLED and cfg.teacher.source == "cache"]
    if not readers:
        return None
    cfg = readers[0][0]
    t = cfg.teacher.model
    per_token = bytes_per_token(CacheSpec("", "", "", cfg.train.seq_len, 1, cfg.method.top_k, t.vocab_size, 1,
                                          t.hidden_size, 0, cfg.cache.values_dtype, cfg.cache.hidden_dtype))
    tokens = max(sum(p.tokens for p in job.phases) for _, job in readers)
    hidden = any(c.method.name in ("hldc", "hldf") for c, _ in readers)
    return {"topk_bytes_per_token": per_token["topk"], "hidden_bytes_per_token": per_token["hidden"] if hidden else 0,
            "tokens": tokens, "bytes": tokens * (per_token["topk"] + (per_token["hidden"] if hidden else 0))}


def format_table(jobs: list[RunPlan], accounting: str, rates: list[dict[str, float]] | None = None,
                 rates_source: str = "") -> str:
    """The human-readable plan; with `rates` (tokens/s per GPU of each job's phases), its GPU-hours."""
    lines = [f"accounting: {accounting}  |  budget: {jobs[0].budget}  |  {len(jobs)} unique jobs", ""]
    header = f"{'run_key':16}  {'job':44} {'C/token':>9} {'C/C_data':>8}  {'phase':5} {'tokens':>10} " \
             f"{'steps':>8} {'FLOPs':>9}" + (f" {'tok/s/GPU':>9} {'GPU-h':>8}" if rates else "")
    lines += [header, "-" * len(header)]
    for j, job in enumerate(jobs):
        name = "|".join([job.method] + [f"{k}={C.short(v)}" for k, v in job.hp.items() if v is not None])
        for i, p in enumerate(job.phases):
            c = job.flops_per_token[p.name]
            left = f"{job.run_key:16}  {name:44}" if i == 0 else " " * 62
            line = f"{left} {c:9.3g} {c / job.flops_per_token['data']:8.4f}  {p.name:5} {p.tokens:10.4g} " \
                   f"{p.steps:8d} {p.flops:9.3g}"
            if rates:
                line += f" {rates[j][p.name]:9.4g}" + (f" {gpu_hours(job, rates[j]):8.4g}" if i == 0 else "")
            lines.append(line)
    total = sum(j.total_flops for j in jobs)
    lines += ["", f"total: {total:.4g} FLOPs over {len(jobs)} jobs"]
    if rates:
        hours = sum(gpu_hours(job, r) for job, r in zip(jobs, rates))
        lines.append(f"total: {hours:.4g} GPU-hours at the tokens/s per GPU {rates_source}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-m", "--multirun")]
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        jobs = expand_sweep(args)
    except HydraException as err:  # e.g. +sweep=NAME with no sweeps/NAME.yaml
        print(err, file=sys.stderr)
        return 2
    planned, errors = plan_jobs(jobs)
    rates = []
    for job, cfg, _ in planned if not errors else []:
        try:
            rates.append(throughput(cfg)[0])
        except C.ConfigError as err:
            errors.append(f"  {' '.join(job) or '(defaults)'}: {err}")
    if errors:
        print(f"{len(errors)} invalid job(s):\n" + "\n".join(errors), file=sys.stderr)
        return 2
    cfg, jobs = planned[0][1], [run for _, _, run in planned]
    source = throughput(cfg)[1]
    print(format_table(jobs, cfg.budget.accounting, rates, source))
    storage = cache_storage([c for _, c, _ in planned], jobs)
    if storage:
        print(f"teacher cache: {storage['topk_bytes_per_token']} B/token of top-k + "
              f"{storage['hidden_bytes_per_token']} B/token of hidden states (cache.hidden_rows=all) x "
              f"{storage['tokens']:.4g} tokens = {storage['bytes'] / 1e12:.4g} TB on disk")
    if cfg.plan.json:
        hours = [gpu_hours(j, r) for j, r in zip(jobs, rates)]
        with open(cfg.plan.json, "w") as f:
            json.dump({"accounting": cfg.budget.accounting, "throughput": source, "gpu_hours": sum(hours),
                       "teacher_cache": storage,
                       "jobs": [j.as_json() | {"gpu_hours": h, "tokens_per_s": r}
                                for j, h, r in zip(jobs, hours, rates)]}, f, indent=2)
        print(f"wrote {cfg.plan.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
