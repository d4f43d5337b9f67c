"""FLOPs accounting against torch's FlopCounterMode, the paper's numbers, budgets and sweep planning."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Gemma3ForCausalLM

from hldx import config as C
from hldx.models import (build_model, build_regressor, count_parameters, forward_to_layer, gemma3_config,
                         hidden_states)
from hldx.budget import accounting_bias, flops_per_token, memory_per_rank, plan_run
from hldx.plan import main
from hldx.study import expand_sweep, plan_sweep

PAPER_123M = ["student=gemma3-123m", "teacher=gemma3-3.4b", "teacher.ckpt=/teacher", "budget=paper", "data=c4",
              "train=paper"]
TABLE_2 = ["method=nll,kd,hldc,hldf", "lr=1e-4,4e-4,1.6e-3", "tau=0.5,1", "alpha=0.7,0.9", "gamma=0.1,0.05",
           "p1=0.01,0.05"]


def test_parameter_counts_of_the_paper_students():
    assert count_parameters(C.compose(["student=gemma3-123m"]).student)["total"] == 120_806_016
    assert count_parameters(C.compose(["student=gemma3-735m"]).student)["total"] == 734_760_064


def test_paper_accounting_reproduces_appendix_a9_ratios():
    cfg = C.compose(PAPER_123M + ["method=hldc", "teacher.source=cache"])
    c = flops_per_token(cfg)
    assert c["hldc"] / c["data"] == pytest.approx(1.027, abs=0.002)
    c = flops_per_token(C.compose(PAPER_123M + ["method=hldf", "teacher.source=cache"]))
    assert c["kd"] / c["data"] == 1.0
    assert c["ht"] / c["data"] == pytest.approx(0.442, abs=0.002)


def test_online_teacher_forward_is_counted():
    cached = flops_per_token(C.compose(PAPER_123M + ["method=kd", "teacher.source=cache"]))
    online = flops_per_token(C.compose(PAPER_123M + ["method=kd", "teacher.source=online"]))
    teacher = count_parameters(C.compose(["student=gemma3-3.4b"]).student)["total"]
    assert online["kd"] - cached["kd"] == pytest.approx(2 * teacher)


@pytest.mark.parametrize("student, ot, tokens", [("gemma3-123m", 54, 108e9), ("gemma3-735m", 12, 168e9)])
def test_paper_budgets_in_tokens(student, ot, tokens):
    cfg = C.compose([f"student={student}", "method=nll", "budget=paper", f"budget.ot={ot}", "train=paper"])
    assert plan_run(cfg).phases[0].tokens == pytest.approx(tokens, rel=0.01)


def _counted(model_cfg, seq_len: int, run) -> float:
    """Matmul FLOPs per token of `run(model, tokens)` forward + backward, on the meta device (no compute)."""
    with torch.device("meta"):
        model = Gemma3ForCausalLM(gemma3_config(model_cfg, "eager"))
        tokens = torch.zeros(2, seq_len, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        run(model, tokens).float().sum().backward()
    return counter.get_total_flops() / tokens.numel()


def _mask(tokens):
    # An explicit all-ones mask keeps transformers' packed-sequence check (an .item()) off meta tensors.
    return torch.ones_like(tokens)


@pytest.mark.parametrize("student", ["gemma3-123m", "tiny"])
def test_exact_accounting_matches_flop_counter(student):
    cfg = C.compose([f"student={student}", "method=hldc", "teacher=gemma3-3.4b", "teacher.ckpt=/t",
                     "teacher.source=cache", "train.seq_len=512"])
    s, d_t, layer = cfg.student, cfg.teacher.model.hidden_size, cfg.student.num_hidden_layers // 2
    planned = flops_per_token(cfg)
    nll = _counted(s, 512, lambda m, x: m(input_ids=x, attention_mask=_mask(x)).logits)
    assert nll == pytest.approx(planned["data"], rel=0.02)

    def hldc(m, x):
        with torch.device("meta"):
            w_r = build_regressor("linear", s.hidden_size, d_t)
        out = m(input_ids=x, attention_mask=_mask(x), output_hidden_states=True)
        return out.logits.sum() + w_r(out.hidden_states[layer]).sum()
    assert _counted(s, 512, hldc) == pytest.approx(planned["hldc"], rel=0.02)


def test_hint_phase_runs_no_upper_layer_and_no_lm_head():
    cfg = C.compose(["student=gemma3-123m", "method=hldf", "teacher=gemma3-3.4b", "teacher.ckpt=/t",
                     "teacher.source=cache", "train.seq_len=512"])
    s, layer = cfg.student, cfg.student.num_hidden_layers // 2

    def ht(m, x):
        with torch.device("meta"):
            mlp = build_regressor("mlp", s.hidden_size, cfg.teacher.model.hidden_size)
        return mlp(forward_to_layer(m, x, layer, attention_mask=_mask(x)))

    counted = _counted(s, 512, ht)
    assert counted == pytest.approx(flops_per_token(cfg)["ht"], rel=0.02)
    # The LM head alone (3 * 2 * d_S * V per token) would add 12% of C_data: it is not there.
    assert counted < 0.5 * flops_per_token(cfg)["data"]


def test_exact_accounting_of_several_pairs_matches_flop_counter():
    """Pairs (1, 2) and (3, 5) of the tiny student: HLDC counts both adapters; HLDF's phase 1 the student up to
    layer 3 (no further layer, no head) and both adapters."""
    compose = C.Composer()
    for adapter in ("linear", "mlp"):
        base = ["train.seq_len=128", "teacher.source=cache", "hidden.pairs=[[1,2],[3,5]]", f"hidden.adapter={adapter}"]
        cfg = compose(base + ["method=hldc"])
        s, d_t = cfg.student, cfg.teacher.model.hidden_size
        with torch.device("meta"):
            adapters = [build_regressor(adapter, s.hidden_size, d_t) for _ in range(2)]

        def hldc(m, x):
            out = m(input_ids=x, attention_mask=_mask(x), output_hidden_states=True)
            return out.logits.sum() + adapters[0](out.hidden_states[1]).sum() + adapters[1](out.hidden_states[3]).sum()

        def ht(m, x):
            h = hidden_states(m, x, [1, 3], attention_mask=_mask(x))
            return adapters[0](h[1]).sum() + adapters[1](h[3]).sum()

        assert _counted(s, 128, hldc) == pytest.approx(flops_per_token(cfg)["hldc"], rel=0.02)
        assert _counted(s, 128, ht) == pytest.approx(flops_per_token(compose(base + ["method=hldf"]))["ht"], rel=0.02)


def test_six_n_formula_holds_for_short_sequences():
    """At T=16 attention is negligible, so the counted matmuls equal 6N + 6 d_S V within 1%."""
    cfg = C.compose(["student=gemma3-123m", "method=nll", "budget.accounting=paper"])
    counted = _counted(cfg.student, 16, lambda m, x: m(input_ids=x, attention_mask=_mask(x)).logits)
    assert counted == pytest.approx(flops_per_token(cfg)["data"], rel=0.01)


def test_sweep_deduplicates_ignored_keys():
    jobs, errors = plan_sweep(["method=kd,hldc,hldf", "lr=1e-4,4e-4,1.6e-3", "gamma=0.05,0.1", "p1=0.01,0.05"])
    assert not errors
    assert sorted(j.method for j in jobs).count("kd") == 3
    assert [j.method for j in jobs].count("hldc") == 6 and [j.method for j in jobs].count("hldf") == 6
    assert len(expand_sweep(["method=kd,hldc,hldf", "lr=1e-4,4e-4,1.6e-3", "gamma=0.05,0.1",
                             "p1=0.01,0.05"])) == 36


def test_table_2_grid_has_63_unique_jobs():
    jobs, errors = plan_sweep(PAPER_123M + TABLE_2)
    assert not errors
    counts = {m: sum(j.method == m for j in jobs) for m in C.METHODS}
    assert counts == {"nll": 3, "kd": 12, "hldc": 24, "hldf": 24}
    # Equal FLOPs: every job spends the budget to within one optimizer step of its most expensive phase.
    for job in jobs:
        step = max(job.flops_per_token[p.name] for p in job.phases) * 512 * 512
        assert abs(job.total_flops - job.budget_flops) <= step * len(job.phases)


def test_run_key_ignores_unused_hyperparameters():
    a = C.compose(["method=nll", "tau=0.5", "gamma=0.3"])
    b = C.compose(["method=nll", "tau=1", "p1=0.2"])
    assert C.run_key(a) == C.run_key(b)
    assert C.run_key(C.compose(["method=kd", "tau=0.5"])) != C.run_key(C.compose(["method=kd", "tau=1"]))
    assert C.hp_key(C.compose(["method=hldf", "lr=4e-4"])) == "lr=4e-4|tau=1|alpha=0.7"
    assert C.run_name(C.compose(["method=hldf", "lr=4e-4"])) == "hldf|lr=4e-4|tau=1|alpha=0.7|p1=0.05"


def test_plan_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["-m", "method=nll,kd", "lr=1e-4,4e-4", f"plan.json={out}", "teacher.source=cache"] + PAPER_123M) == 0
    plan = json.loads(out.read_text())
    assert plan["accounting"] == "paper" and len(plan["jobs"]) == 4
    kd = next(j for j in plan["jobs"] if j["method"] == "kd")
    assert kd["gamma"] is None and kd["p1"] is None and kd["tau"] == 1.0
    assert kd["phases"][0]["tokens"] == pytest.approx(1.08e11, rel=0.01)
    assert kd["total_flops"] == pytest.approx(sum(p["flops"] for p in kd["phases"]))
    assert "4 unique jobs" in capsys.readouterr().out
    # KD reads 512 B/token of top-k (k=128: uint16 ids + bfloat16 logits) from the cache, no hidden states.
    storage = plan["teacher_cache"]
    assert storage["logits"] == "topk" and storage["logits_bytes_per_token"] == 512 + 2 * 8 / 512  # + checksums
    assert plan["teacher_cache"]["bytes"] == round((512 + 2 * 8 / 512) * kd["phases"][0]["tokens"])
    assert plan["teacher_cache"]["hidden_rows"] == 0 and plan["teacher_cache"]["rows"] * 512 == kd["phases"][0]["tokens"]


def test_memory_estimate_against_what_torch_holds():
    """The estimate's model states are AdamW's real tensors; its activations within 20% of what autograd
    saves for the backward (saved-tensor hooks, each storage counted once) at the 123M student's shapes."""
    cfg = C.compose(["student=gemma3-123m", "train.seq_len=256", "train.batch_size=1", "method=nll"])
    est = memory_per_rank(cfg, "none", 1, gpu=False)
    model = build_model(cfg.student, 0).train()
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens_1xL = torch.randint(0, cfg.student.vocab_size, (1, 256))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(tokens_1xL, labels=tokens_1xL).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in params)
    assert est["activations"] == pytest.approx(activations, rel=0.2)
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    assert est["weights"] == sum(p.nbytes for p in model.parameters())
    assert est["gradients"] == sum(p.grad.nbytes for p in model.parameters())
    assert est["adamw"] == sum(s[k].nbytes for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))


def test_plan_refuses_a_job_that_cannot_fit_and_names_the_fixes(capsys):
    """The 3.4B teacher's pre-training: whole on one rank under DDP it needs 181 GB, refused before launch; under
    FSDP2 on 8 ranks at micro-batches of 8 (every layer's full float32 gradient kept between them), 52 GB per
    rank, planned."""
    teacher = ["method=nll", "student=gemma3-3.4b", "train=paper"]
    assert main(teacher + ["train.parallel=ddp"]) == 2
    err = capsys.readouterr().err
    assert "plan.device_memory=80 GB is too small" in err and "181.0 GB per rank under train.parallel=ddp" in err
    assert "train.parallel=fsdp" in err and "train.micro_batch_size" in err and "more ranks (now 1)" in err
    assert main(teacher + ["plan.ranks=8", "train.micro_batch_size=8"]) == 0  # auto: fsdp for the 3.4B model
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(tuple("0123456789abcdef"))
               and "nll|" in line)
    assert row.split()[-2:] == ["fsdp", "52.4"]


def test_the_papers_accounting_bias_is_stated(capsys):
    """Under budget.accounting=paper HLDC is charged 6 x 2 d_S d_T per token for a W_R that costs 6 d_S d_T: its
    tokens are C_data / (C_data + 12 d_S d_T) of KD's, its real FLOPs (E + 6 d_S d_T) / E of KD's per token (E:
    the real modules' data FLOPs). Under the exact accounting every method spends KD's real FLOPs."""
    common = ["student=gemma3-123m", "teacher=gemma3-3.4b", "train=paper", "budget.tokens=1e10"]
    paper = C.compose(common + ["method=hldc", "budget.accounting=paper"])
    d_s, d_t = paper.student.hidden_size, paper.teacher.model.hidden_size
    c_data = flops_per_token(paper)["data"]
    e_data = flops_per_token(C.compose(common + ["budget.accounting=exact"]))["data"]
    expected = c_data / (c_data + 12 * d_s * d_t) * (e_data + 6 * d_s * d_t) / e_data - 1
    assert accounting_bias(paper, plan_run(paper)) == pytest.approx(expected, rel=1e-3)  # steps are rounded
    for method in (["method=hldc"], ["method=hldf", "p1=0.05"]):
        exact = C.compose(common + method + ["budget.accounting=exact"])
        assert abs(accounting_bias(exact, plan_run(exact))) < 1e-4, method  # a step of ~37,700: rounding
    assert main(["-m", "method=kd,hldc,hldf", "p1=0.01,0.05", "budget.accounting=paper", *common]) == 0
    out = capsys.readouterr().out
    lines = {tuple(line.split()[1:3]): line for line in out.splitlines() if line.startswith("  gemma3-123m")}
    hldc = next(line for (method, _), line in lines.items() if method == "hldc")
    assert float(hldc.split()[2].rstrip("%")) / 100 == pytest.approx(expected, abs=2e-5)
    assert hldc.endswith("<- WARNING: above 0.1%")
    assert "WARNING" not in lines["hldf", "p1=0.01"] and lines["hldf", "p1=0.05"].endswith("WARNING: above 0.1%")
