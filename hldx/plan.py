"""`python -m hldx.plan`: a sweep's jobs priced before anything runs, no training.

    python -m hldx.plan -m method=kd,hldf lr=1e-4,4e-4 [plan.json=PATH]
    python -m hldx.plan -m +sweep=paper-123m                 # a study's grid from sweeps/, with its GPU-hours

Per distinct job (a method ignores the keys it does not use; duplicates are listed once): FLOPs per token
and against NLL's, tokens, steps and FLOPs of each phase, tokens/s per GPU and GPU-hours (hldx.budget says
how both accountings and the GPU-hours are counted), and the teacher cache's size on disk.
A bad value in any job ends with one line per bad job on stderr and exit status 2.
"""
from __future__ import annotations

import json
import sys

from hldx import config as C
from hldx import cli, data, hidden
from hldx import job as J
from hldx.budget import (RunPlan, accounting_bias, cache_storage, gpu_hours, memory_per_rank, parallel_mode,
                         throughput)
from hldx.errors import ConfigError
from hldx.stages import stages, table
from hldx.study import BadJob, expand_sweep, plan_jobs, refusal


def format_table(jobs: list[RunPlan], accounting: str, rates: list[dict[str, float]] | None = None,
                 rates_source: str = "", memory: list[tuple[str, float]] | None = None) -> str:
    """The human-readable plan; with `rates` (tokens/s per GPU of each job's phases), its GPU-hours; with
    `memory` ((engine, bytes per rank) of each job), its memory per rank."""
    lines = [f"accounting: {accounting}  |  budget: {jobs[0].budget}  |  {len(jobs)} unique jobs", ""]
    header = f"{'run_key':16}  {'job':44} {'C/token':>9} {'C/C_data':>8}  {'phase':5} {'tokens':>10} " \
             f"{'steps':>8} {'FLOPs':>9}" + (f" {'tok/s/GPU':>9} {'GPU-h':>8}" if rates else "") + \
             (f" {'engine':>6} {'GB/rank':>7}" if memory else "")
    lines += [header, "-" * len(header)]
    for j, job in enumerate(jobs):
        for i, p in enumerate(job.phases):
            c = job.flops_per_token[p.name]
            left = f"{job.run_key:16}  {job.name:44}" if i == 0 else " " * 62
            line = f"{left} {c:9.3g} {c / job.flops_per_token['data']:8.4f}  {p.name:5} {p.tokens:10.4g} " \
                   f"{p.steps:8d} {p.flops:9.3g}"
            if rates:
                line += f" {rates[j][p.name]:9.4g}" + (f" {gpu_hours(job, rates[j]):8.4g}" if i == 0 else " " * 9)
            if memory and i == 0:
                line += f" {memory[j][0]:>6} {memory[j][1] / 1e9:7.1f}"
            lines.append(line)
    total = sum(j.total_flops for j in jobs)
    lines += ["", f"total: {total:.4g} FLOPs over {len(jobs)} jobs"]
    if rates:
        hours = sum(gpu_hours(job, r) for job, r in zip(jobs, rates))
        lines.append(f"total: {hours:.4g} GPU-hours at the tokens/s per GPU {rates_source}")
    return "\n".join(lines)


def parts_line(storage: dict) -> str:
    """The teacher cache part by part: bytes per token, the tokens of the longest job reading it, bytes on disk."""
    return "teacher cache parts (bytes per token with checksums x tokens of the longest job reading it): " + " | ".join(
        f"{name}{'' if part['layer'] is None else ' (teacher layer %d)' % part['layer']} "
        f"{part['bytes_per_token']:.6g} B"
        f" x {part['tokens']:.4g} = {part['bytes'] / 1e12:.4g} TB" for name, part in storage["parts"].items())


def hidden_note(planned: list) -> str:
    """How the FLOPs count layer pairs and adapters, where a job's hidden path is not the paper's (or the
    paper's accounting is in force for an HLD job)."""
    hld = [c for _, c, _ in planned if c.method.name in hidden.HLD]
    if not hld or (all(not hidden.variant(c) for c in hld) and hld[0].budget.accounting != "paper"):
        return ""
    if hld[0].budget.accounting == "paper":
        return ("hidden path (budget.accounting=paper, extended to layer pairs): N_reg = 2 d_S d_T per pair with a "
                "learned adapter (identity: 0); C_HLDC = C_KD + 6 N_reg each; C_HT = 6N m_S/D_S + 6 N_reg each + "
                "C_teacher m_T/D_T, m the deepest paired layers (the middle pair: the paper's 3N and C_teacher/2)")
    return ("hidden path (budget.accounting=exact): each pair's adapter counted as built (linear d_S d_T, mlp "
            "e d_S (d_S + d_T), identity 0 matmul parameters, x6 per token), HLDF's phase 1 running the student (an "
            "online teacher too) up to the deepest paired layer")


BIAS_WARNING = 1e-3  # a method whose real compute differs from KD's by more than 0.1% is named


def bias_table(planned: list) -> str:
    """Under budget.accounting=paper: each distinct (student, method, p1, hidden path)'s real (exact) FLOPs against
    its KD partner's at the same budget, with a warning above BIAS_WARNING."""
    seen: dict[tuple, float] = {}
    for _, c, run in planned:
        key = (c.student.name, c.method.name, c.p1 if c.method.name == "hldf" else None, hidden.variant(c))
        if key not in seen and c.method.name != "kd":
            seen[key] = accounting_bias(c, run)
    lines = ["accounting bias (budget.accounting=paper): each method's real FLOPs (the exact accounting) against "
             "KD's at the same budget"]
    for (student, method, p1, path), bias in seen.items():
        flag = "  <- WARNING: above 0.1%" if abs(bias) > BIAS_WARNING else ""
        lines.append(f"  {student:12} {method:5} {'' if p1 is None else f'p1={p1:g}':9} {bias:+.3%}{flag}"
                     + (f"  ({path})" if path else ""))
    return "\n".join(lines)


@cli.command
def main(argv: list[str] | None = None) -> int:
    if (args := cli.sweep_args(argv, __doc__)) is None:
        return 0
    jobs = expand_sweep(args)
    planned, bad = plan_jobs(jobs)
    rates = []
    for job, cfg, _ in planned if not bad else []:
        try:
            rates.append(throughput(cfg)[0])
        except ConfigError as err:
            bad.append(BadJob(" ".join(job) or "(defaults)", str(err)))
    if bad:
        raise refusal(bad, len(jobs), "")
    cfg, jobs = planned[0][1], [run for _, _, run in planned]
    out = cli.output_file("plan.json", cfg.plan.json) if cfg.plan.json else None
    source = throughput(cfg)[1]
    ranks = cfg.plan.ranks or 1
    memory = [(parallel_mode(c, ranks), memory_per_rank(c, parallel_mode(c, ranks), ranks)) for _, c, _ in planned]
    print(format_table(jobs, cfg.budget.accounting, rates, source, [(m, b["total"]) for m, b in memory]))
    print(f"memory per rank: an estimate for {ranks} rank(s) per job (plan.ranks), jobs over plan.device_memory="
          f"{cfg.plan.device_memory / 1e9:g} GB refused")
    if cfg.budget.accounting == "paper":
        print(bias_table(planned))
    print("stages of the study (python -m hldx.run -m runs them; hydra.sweeper.dry_run=true: its sbatch plan):\n"
          + table(stages(planned)))
    tokens, exact = data.train_tokens(cfg)
    rows = None if tokens is None else tokens // cfg.train.seq_len
    passes = [J.epochs(c, run, rows) for _, c, run in planned]
    groups: dict[tuple[int, int], list[str]] = {}
    for (_, c, _), n in zip(planned, passes):
        if n is not None and n > 1:
            groups.setdefault((n, c.data.max_epochs), []).append(C.run_name(c))
    for (n, allowed), names in sorted(groups.items()):
        verdict = "allowed by" if n <= allowed else "refused at launch unless"
        shown = ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])}, ... ({len(names)} jobs)"
        print(f"{len(names)} job(s) make {n} passes over {'the' if exact else 'about'} {tokens:.4g} training tokens "
              f"({verdict} data.max_epochs={n}): {shown}")
    if note := hidden_note(planned):
        print(note)
    storage = cache_storage([c for _, c, _ in planned], jobs, rows)
    if storage:
        print(parts_line(storage))
        c = cfg.cache
        logits = "top-k" if storage["logits"] == "topk" else \
            f"sampled logits ({c.draws} draws, taus {'/'.join(f'{t:g}' for t in sorted(c.taus))})"
        print(f"teacher cache ({c.values_dtype} {storage['logits'].replace('topk', 'top-k')}, {c.hidden_dtype} hidden "
              f"states): {logits} for {storage['tokens']:.4g} tokens x {storage['logits_bytes_per_token']:.6g} B + "
              f"hidden states for "
              f"{storage['hidden_tokens']:.4g} tokens x {storage['hidden_bytes_per_token']:.6g} B = "
              f"{storage['bytes'] / 1e12:.4g} TB on disk")
    if out:
        hours = [gpu_hours(j, r) for j, r in zip(jobs, rates)]
        with open(out, "w") as f:
            json.dump({"accounting": cfg.budget.accounting, "throughput": source, "gpu_hours": sum(hours),
                       "teacher_cache": storage, "train_tokens": tokens, "train_tokens_exact": exact,
                       "jobs": [j.as_json() | {"gpu_hours": h, "tokens_per_s": r, "epochs": n, "parallel": m[0],
                                               "memory_per_rank": m[1], "ranks": ranks}
                                for j, h, r, n, m in zip(jobs, hours, rates, passes, memory)]}, f, indent=2)
        print(f"wrote {cfg.plan.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
