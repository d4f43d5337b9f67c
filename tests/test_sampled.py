"""Sampled teacher logits (cache.logits=sampled, hldx/store/sampled.py): the KD gradient from the draws against the
dense one at every tau of the grid, their determinism, their bytes, the cache and run identities they make (today's
unchanged), their refusals, and a cache of them read by the loader. The side-by-side measurement against top-k and
the dense teacher (bias, variance, tail mass, tiny runs) is tests/test_storage_error.py's."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hldx import config as C
from hldx import losses, teacher
from hldx.budget import plan_run
from hldx.errors import ConfigError
from hldx.job import check
from hldx.loader import Loader
from hldx.order import Batches, Rows
from hldx.plan import main as plan_main
from hldx.stages import stages
from hldx.store import CacheSpec, build, bytes_per_token, decode, encode_sampled, open_cache, verify
from hldx.study import expand_sweep, plan_jobs
from cache_worker import Teacher, make_spec, online, row_tokens

compose = C.Composer()
TAUS = (0.5, 1.0, 2.0)


def zipf_logits(g: torch.Generator, P: int, V: int) -> torch.Tensor:
    """Teacher logits [1, P, V] shaped like a language model's: log-Zipf over a random order of the ids, plus noise
    (the largest probability ~0.1-0.3, a long tail)."""
    rank = torch.stack([torch.randperm(V, generator=g) for _ in range(P)]) + 1
    return (-1.1 * rank.double().log() + 0.5 * torch.randn(P, V, generator=g, dtype=torch.float64)).float()[None]


def kd_gradients(z_ExPxV: torch.Tensor, ids, val, tau: float, lse=None) -> tuple[torch.Tensor, torch.Tensor]:
    """d sparse_kd / d z of each of E replicates (each its own mean over P positions), and each one's loss."""
    z = z_ExPxV.clone().requires_grad_()
    per = [losses.sparse_kd(z[e:e + 1], ids[e:e + 1], val[e:e + 1], tau, lse_BxLxT=None if lse is None else
                            lse[e:e + 1], taus=TAUS) for e in range(len(z))]
    torch.stack(per).sum().backward()
    return z.grad, torch.stack(per).detach()


def test_the_kd_gradient_from_draws_is_unbiased_at_every_tau_and_top_k_is_not():
    """Over 400 independent draws (rows 0..399 of the same teacher logits), the mean gradient of the KD loss w.r.t.
    the student's logits is the dense teacher's, tau (s_tau - p_tau) / P, within its Monte-Carlo error at each tau
    of the grid (||mean - dense||^2 over its variance ~ 1), and so is the mean loss, tau^2 KL(p_tau || s_tau);
    top-k (k = 12 and 64 of 512) at tau >= 1 is biased by far more than that error. Dense: the stored (bfloat16-rounded)
    teacher's full distribution."""
    g = torch.Generator().manual_seed(0)
    P, V, E = 4, 512, 400
    t = zipf_logits(g, P, V)
    s = (t + torch.randn(t.shape, generator=g)).double()  # a student near the teacher
    spec = CacheSpec("t", "tok", "s", P, 12, V, 1, 8, logits="sampled", taus=TAUS)
    stored = [decode("sampled", encode_sampled(spec, t, e)) for e in range(E)]
    ids, val, lse = (torch.cat(x) for x in zip(*stored))
    r = (t - t.amax(-1, keepdim=True)).to(torch.bfloat16).double()[0]  # the stored teacher
    for tau in TAUS:
        p, q = torch.softmax(r / tau, -1), torch.softmax(s[0] / tau, -1)
        dense = tau * (q - p) / P
        kl = tau**2 * float((p * (p.log() - q.log())).sum(-1).mean())
        grads, values = kd_gradients(s.expand(E, P, V), ids, val.double(), tau, lse.double())
        var = float(grads.var(0).sum()) / E
        z2 = float(((grads.mean(0) - dense) ** 2).sum()) / var
        z_loss = (float(values.mean()) - kl) / float(values.std() / E**0.5)
        assert z2 < 1.5 and abs(z_loss) < 4, (tau, z2, z_loss)
        for k in (12, 64):
            top_val, top_idx = r.topk(k, -1)
            (top,), _ = kd_gradients(s, top_idx[None], top_val[None], tau)
            assert tau < 1 or float(((top - dense) ** 2).sum()) / var > 10, (tau, k)  # at 0.5 the tail is tiny


def test_a_rebuilt_row_is_bit_identical_and_its_draws_depend_on_its_row_alone():
    g = torch.Generator().manual_seed(1)
    spec = CacheSpec("t", "tok", "s", 8, 12, 300, 1, 8, logits="sampled")
    logits = torch.cat([zipf_logits(g, 8, 300) for _ in range(4)])   # rows 10..13
    whole = encode_sampled(spec, logits, 10)
    again = encode_sampled(spec, logits, 10)
    alone = encode_sampled(spec, logits[2:3], 12)
    for a, b, c in zip(whole, again, alone):
        assert bytes(a.view(torch.uint8).numpy()) == bytes(b.view(torch.uint8).numpy()) and torch.equal(a[2:3], c)
    other = encode_sampled(spec, logits[2:3], 13)[0]  # the same logits in another row: other draws
    assert not torch.equal(other, alone[0])
    # Stratified: an id of probability q under the proposal is drawn at least floor(12 q) - 1 times (its CDF
    # interval holds as many whole strata).
    ids, val, lse = decode("sampled", whole)
    r = (logits - logits.amax(-1, keepdim=True)).to(torch.bfloat16).float()
    q = sum(torch.softmax(r / t, -1) for t in spec.taus) / len(spec.taus)
    counts = torch.zeros_like(q).scatter_add_(-1, ids, torch.ones_like(val))
    assert (counts >= (12 * q - 1e-4).floor() - 1).all() and (counts.sum(-1) == 12).all()
    assert torch.equal(val, r.gather(-1, ids))  # the drawn ids' stored logits, relative to the max
    torch.testing.assert_close(lse, torch.stack([torch.logsumexp(r / t, -1) for t in spec.taus], -1))


def test_the_paper_123m_studys_whole_cache_with_sampled_logits_is_under_90_tb(hldx_cache, tmp_path, capsys):
    """12 draws and 3 taus: 60.05 B/token (top-k: 512.03) at V = 32000, L = 512, checksums included; with the
    sweep's sr2 hidden states the paper-123m study's whole cache is under 90 TB (top-k's: 134.9 TB), and plan's
    cache line keeps its form."""
    paper = CacheSpec("t", "tok", "s", 512, 12, 32000, 17, 2560, logits="sampled")
    assert bytes_per_token(paper)["sampled"] == 12 * 4 + 3 * 4 + 3 * 8 / 512 <= 64
    out = tmp_path / "plan.json"
    assert plan_main(["-m", "+sweep=paper-123m", "cache.logits=sampled", f"plan.json={out}"]) == 0
    storage = json.loads(out.read_text())["teacher_cache"]
    assert storage["logits"] == "sampled" and storage["logits_bytes_per_token"] == bytes_per_token(paper)["sampled"]
    assert storage["bytes"] <= 90e12
    text = capsys.readouterr().out
    assert "teacher cache parts (bytes per token with checksums x tokens of the longest job reading it): sampled " \
           "60.0469 B x " in text
    line = next(x for x in text.splitlines() if x.startswith("teacher cache (bfloat16 sampled, sr2 hidden states): "))
    assert re.fullmatch(r"teacher cache \(bfloat16 sampled, sr2 hidden states\): sampled logits \(12 draws, taus "
                        r"0.5/1/2\) for \S+ tokens x 60.0469 B \+ hidden states for \S+ tokens x 720.031 B = "
                        r"(\S+) TB on disk", line), line


def test_sampled_logits_are_part_of_the_cache_and_run_identity_and_topk_keeps_todays(monkeypatch, tmp_path):
    """A KD (HLDC, HLDF) run from sampled logits is another run than from top-k, with another cache and cache stage;
    cache.logits=topk, and draws or taus with it, leave the run key, the cache's identity and the stage names as
    they were; a sampled run ignores method.top_k, an online teacher ignores cache.logits."""
    monkeypatch.setattr(teacher, "teacher_digest", lambda path: "teacher-digest")
    monkeypatch.setattr(teacher, "tokenizer_digest", lambda tokenizer: "tokenizer-digest")
    rows = Rows(np.zeros((4096, 1), dtype=np.uint16), "rows-digest", Path("/nowhere"))

    def keys(*overrides):
        cfg = compose(list(overrides))
        return C.run_key(cfg), teacher.cache_spec(cfg, None, rows, plan_run(cfg)).digest

    def stage_names(*overrides):
        sweep = ["method=kd,hldc", "paths.cache=/c", f"paths.runs={tmp_path}", *overrides]
        planned, bad = plan_jobs(expand_sweep(sweep))
        assert not bad
        return [s.job_name for s in stages(planned) if s.name in ("teacher", "cache")]

    for method in ("kd", "hldc", "hldf"):
        today = keys(f"method={method}")
        assert keys(f"method={method}", "cache.logits=topk", "cache.draws=7", "cache.taus=[3]") == today
        sampled = keys(f"method={method}", "cache.logits=sampled")
        assert sampled[0] != today[0] and sampled[1] != today[1]
        assert keys(f"method={method}", "cache.logits=sampled", "method.top_k=64") == sampled
        assert keys(f"method={method}", "cache.logits=sampled", "cache.draws=16")[0] != sampled[0]
        assert keys(f"method={method}", "cache.logits=sampled", "cache.taus=[0.5,1]")[0] != sampled[0]
        online = ["teacher.source=online", f"method={method}"]
        assert C.run_key(compose(online + ["cache.logits=sampled"])) == C.run_key(compose(online))
    assert C.run_key(compose(["method=nll", "cache.logits=sampled"])) == C.run_key(compose(["method=nll"]))
    assert stage_names("cache.logits=topk", "cache.draws=7") == stage_names()
    assert stage_names("cache.logits=sampled") != stage_names()
    kd = plan_run(compose(["method=kd"]))
    spec = teacher.cache_spec(compose(["method=kd", "cache.logits=sampled"]), None, rows, kd)
    assert spec.identity()["logits"] == "sampled" and spec.identity()["taus"] == [0.5, 1.0, 2.0] and spec.k == 12
    assert {"logits", "taus"}.isdisjoint(teacher.cache_spec(compose(["method=kd"]), None, rows,
                                                            plan_run(compose(["method=kd"]))).identity())
    name = C.run_name(compose(["method=kd", "cache.logits=sampled", "seed=1"]))
    assert name == "kd|lr=4e-4|tau=1|alpha=0.7|logits=sampled(12,[0.5,1,2])|seed=1"


@pytest.mark.parametrize("overrides, message", [
    (["cache.draws=0"], "cache.draws=0 is invalid: expected an integer >= 1"),
    (["cache.draws=5000"], "cache.draws=5000 is invalid: expected a number of ids drawn per position in [1, 4096]"),
    (["tau=3"], "tau=3 is invalid: expected one of cache.taus=[0.5, 1.0, 2.0]"),
    (["cache.taus=[0.5,-1]"], "cache.taus=[0.5, -1] is invalid: expected a non-empty list of numbers, each > 0"),
])
def test_an_impossible_sampled_cache_is_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as err:
        check(compose(["method=kd", "cache.logits=sampled", *overrides]), launch=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_loader_hands_out_a_sampled_caches_draws(tmp_path):
    """A sampled cache built from a teacher's logits, verified whole, and read by the loader: each micro-batch's
    ids, logits and log-normalisers are the rows' own draws."""
    spec = make_spec(rows=12, hidden_rows=0, layers=(), logits="sampled", k=6)
    out = tmp_path / "c"
    assert build(spec, out, Teacher(spec), row_tokens(spec), batch_rows=5, progress=False)
    assert verify(out, progress=False) == []
    reader = open_cache(out, spec)
    rows = Rows(row_tokens(spec)(np.arange(12)).numpy().astype(np.uint16), "rows-a", tmp_path)
    idx, values, _ = online(spec, range(12))
    with Loader(Batches(rows, 4), reader, ["sampled"], range(3), torch.device("cpu"), readers=1) as loader:
        for step in range(3):
            micro = [loader.get(step).micro(m, 2) for m in (0, 2)]
            at = slice(4 * step, 4 * step + 4)
            assert torch.equal(torch.cat([m.topk_idx_BxLxK for m in micro]), idx[at])
            assert torch.equal(torch.cat([torch.cat([m.topk_val_BxLxK, m.lse_BxLxT], -1) for m in micro]), values[at])
