"""What the cache's storage dtypes cost the losses, measured against float32 storage: top-k logits stored raw
or relative to their maximum (the KD loss), hidden states in bfloat16 or float8_e4m3 (L_emb and its gradient),
on the tiny teacher's real outputs and on paper-shaped data, and on tiny HLDC and HLDF runs' val_logppl; and what
the teacher's logits cost KD against its full distribution: top-k against sampled logits (the KD gradient's bias and
variance, the tail mass top-k drops, tiny KD and HLDC runs)."""
from __future__ import annotations

import pytest
import torch

from hldx import config as C
from hldx import data, losses
from hldx.budget import plan_run
from hldx.job import ensure_teacher, execute
from hldx.models import PhaseNet, build_model, build_regressor, forward
from hldx.store import (CacheSpec, bytes_per_token, codec, decode, decode_hidden, decode_logits, encode_hidden,
                        encode_sampled, encode_topk)
from hldx.teacher import load_teacher


def spec(hidden_size: int, values="bfloat16", hidden="bfloat16", k=128, vocab=32000) -> CacheSpec:
    return CacheSpec("t", "tok", "s", 8, k, vocab, 1, hidden_size, values, hidden)


def stored_topk(idx, val, dtype: str, relative: bool):
    """What a run reads back: relative to the max (format 2), or the raw logits rounded (format 1)."""
    if relative:
        return decode_logits(*encode_topk(spec(1, dtype, k=idx.shape[-1]), idx, val))
    return idx, val.to(getattr(torch, dtype)).float()


def kd_error(logits_S, idx, val, dtype: str, relative: bool) -> float:
    """|L_KD(stored) - L_KD(float32)| / L_KD(float32), tau = 1."""
    exact = losses.sparse_kd(logits_S, idx, val, 1.0)
    got = losses.sparse_kd(logits_S, *stored_topk(idx, val, dtype, relative), 1.0)
    return float((got - exact).abs() / exact)


def emb_error(pred, target, dtype: str) -> tuple[float, float]:
    """|dL_emb| / L_emb and |d grad| / |grad| (w.r.t. the prediction) of target stored in dtype."""
    s = spec(target.shape[-1], hidden=dtype)
    stored = decode_hidden(*encode_hidden(s, target, 0))
    out = []
    for t in (target, stored):
        p = pred.clone().requires_grad_()
        loss = losses.hidden_loss(p, t)
        loss.backward()
        out.append((loss.detach(), p.grad))
    (l0, g0), (l1, g1) = out
    return float((l1 - l0).abs() / l0), float((g1 - g0).norm() / g0.norm())


def outlier_states(g: torch.Generator, n: int, D: int = 2560) -> torch.Tensor:
    """Paper-shaped hidden states [n, D]: Gaussian, each token at its own scale, and LLM-like massive
    dimensions (two fixed ones ~60x the rest, one ~15x: about 70% of each vector's energy)."""
    x = torch.randn(n, D, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))
    x[:, [7, 1234]] *= 60
    x[:, 300] *= 15
    return x


def hint_gradients(pred_TxD, target_ExTxD, kind: str, unit: bool) -> torch.Tensor:
    """d hidden_loss / d pred [E, T, D], for each of E targets."""
    p = pred_TxD.expand_as(target_ExTxD).clone().requires_grad_()
    losses.hidden_loss(p, target_ExTxD, kind, unit_target=unit).backward()  # the mean over E x T tokens
    return p.grad * len(target_ExTxD)


def correlated(target: torch.Tensor, cos: float, g: torch.Generator) -> torch.Tensor:
    """A prediction whose per-token cosine with target is about `cos` (a student early or late in training)."""
    u = torch.nn.functional.normalize(target, dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(target.shape, generator=g), dim=-1)
    return cos * u + (1 - cos**2) ** 0.5 * noise


@pytest.fixture(scope="module")
def tiny_teacher(hldx_cache, tmp_path_factory):
    """The tiny teacher (pre-trained, as tests build it), its config and tokenizer."""
    cfg = C.compose(["train.seq_len=64", "data.max_train_tokens=32768", "teacher.build.tokens=8192",
                     f"paths.runs={tmp_path_factory.mktemp('runs')}"])
    ensure_teacher(cfg)
    return cfg, load_teacher(cfg), data.tokenizer_for(cfg)


SHARP = ["teacher.build.tokens=131072", "data.max_epochs=4"]  # 4 passes over the tests' 32k tokens: ~25 s


@pytest.fixture(scope="module")
def sharp_teacher(hldx_cache, tmp_path_factory):
    """A tiny teacher trained long enough to be sure of itself (entropy ~5.7 nats where the tiny teacher's is ~8.2
    of log 4096 = 8.3; the mini study's teacher: 5.0), its config and tokenizer."""
    cfg = C.compose(["train.seq_len=64", "data.max_train_tokens=32768", *SHARP,
                     f"paths.runs={tmp_path_factory.mktemp('runs')}"])
    ensure_teacher(cfg)
    return cfg, load_teacher(cfg), data.tokenizer_for(cfg)


def teacher_on(tiny_teacher, split: str, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [rows, 64], and the tiny teacher's logits and mid-layer states on them."""
    cfg, teacher, tokenizer = tiny_teacher
    tokens = torch.from_numpy(data.prepare(cfg, split, tokenizer).tokens[:rows * 64].astype("int64")).view(rows, 64)
    with torch.no_grad():
        middle = cfg.teacher.model.num_hidden_layers // 2
        logits, hidden = forward(teacher, tokens, [middle])
    return tokens, logits.float(), hidden[middle].float()


@pytest.fixture(scope="module")
def tiny_teacher_outputs(tiny_teacher):
    """The tiny teacher's logits and mid-layer states on held-out rows."""
    return teacher_on(tiny_teacher, "validation", 8)[1:]


def test_top_k_relative_to_the_maximum_cuts_the_kd_loss_error(tiny_teacher_outputs):
    g = torch.Generator().manual_seed(0)
    logits_T, _ = tiny_teacher_outputs
    paper_T = 20 + 3 * torch.randn(2, 256, 32000, generator=g)  # paper-shaped logits near 20 (V = 32k)
    rows = []
    for name, teacher in (("tiny teacher", logits_T), ("paper-shaped", paper_T)):
        val, idx = teacher.topk(128, dim=-1)
        student = teacher + 2 * torch.randn(teacher.shape, generator=g)
        raw = kd_error(student, idx, val, "bfloat16", relative=False)
        rel = kd_error(student, idx, val, "bfloat16", relative=True)
        f16 = kd_error(student, idx, val, "float16", relative=True)
        rows.append((name, raw, rel, f16))
        assert rel < 1e-3 and f16 < rel
    print("\nKD-loss error against float32 storage, |dL|/L: " + "; ".join(
        f"{n}: bf16 raw {a:.2e}, bf16 relative to max {b:.2e} ({a / b:.1f}x less), fp16 relative {c:.2e}"
        for n, a, b, c in rows))
    # Logits near 20 (the paper's teacher): rounding them raw costs ~10x more than rounding their distance to
    # the maximum; the tiny teacher's logits sit near 0, where raw bfloat16 is as fine already.
    assert rows[1][2] < rows[1][1] / 10


def test_float8_hidden_states_move_the_hint_loss_by_under_a_percent(tiny_teacher_outputs):
    g = torch.Generator().manual_seed(1)
    _, hidden_T = tiny_teacher_outputs
    paper = torch.randn(2, 512, 2560, generator=g) * (1 + 3 * torch.rand(2, 512, 1, generator=g))
    lines = []
    for name, target in (("tiny teacher", hidden_T), ("paper-shaped", paper)):
        for cos in (0.2, 0.9):
            pred = correlated(target, cos, g)
            for dtype in ("bfloat16", "float8_e4m3"):
                dl, dg = emb_error(pred, target, dtype)
                lines.append(f"{name} cos {cos}: {dtype} |dL|/L {dl:.2e}, |dgrad|/|grad| {dg:.2e}")
                assert dl < (1e-2 if dtype == "float8_e4m3" else 1e-3), lines[-1]
                assert dg < (0.2 if dtype == "float8_e4m3" else 0.02), lines[-1]
    print("\nL_emb against float32 storage:\n  " + "\n  ".join(lines))


@pytest.mark.parametrize("kind", ["mse", "mse_sum", "cosine"])
def test_sr2_gives_each_hidden_loss_an_unbiased_gradient_and_value(tiny_teacher_outputs, kind):
    """Over 256 independent sr2 codes (rows 0..255) of the same targets, the mean gradient w.r.t. the student's
    prediction is the float32 target's within its Monte-Carlo error (||mean - exact||^2 over its variance ~ 1),
    and so is the mean logged loss; the same statistic for rounding to nearest at the same bits is far off."""
    g, E = torch.Generator().manual_seed(2), 256
    lines = []
    for name, hidden_TxD in (("paper-shaped, outlier dims", outlier_states(g, 8)),
                             ("tiny teacher", tiny_teacher_outputs[1][3])):
        pred_TxD = correlated(hidden_TxD, 0.5, g)
        exact = hint_gradients(pred_TxD, hidden_TxD[None], kind, unit=False)[0]   # the float32 target's
        exact_loss = float(losses.hidden_loss(pred_TxD, hidden_TxD, kind))
        s = spec(hidden_TxD.shape[-1], hidden="sr2")
        codes = decode_hidden(*encode_hidden(s, hidden_TxD.expand(E, *hidden_TxD.shape), 0))
        grads = hint_gradients(pred_TxD, codes, kind, unit=True)
        var = float(grads.var(0).sum() / E)
        z2 = float(((grads.mean(0) - exact) ** 2).sum()) / var
        unit_TxD = torch.nn.functional.normalize(hidden_TxD, dim=-1)
        nearest = codec.decode(*codec.encode(unit_TxD[None], torch.full((1, *unit_TxD.shape), 0.5)))
        z2_nearest = float(((hint_gradients(pred_TxD, nearest, kind, unit=True)[0] - exact) ** 2).sum()) / var
        values = torch.stack([losses.hidden_loss(pred_TxD, c, kind, unit_target=True) for c in codes])
        z_loss = (float(values.mean()) - exact_loss) / float(values.std() / E**0.5)
        lines.append(f"{name}: gradient z2 {z2:.2f} (nearest {z2_nearest:.0f}), loss z {z_loss:+.2f}")
        assert z2 < 1.5 and z2_nearest > 10 and abs(z_loss) < 4, lines[-1]
    print(f"\n{kind}: " + "; ".join(lines))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hldc", "hldf"])
def test_float8_storage_leaves_a_tiny_run_where_bfloat16_leaves_it(tiny, method):
    common = tiny + [f"method={method}", "gamma=1", "p1=0.3", "budget.tokens=8192"]
    results = {d: execute(C.compose(common + [f"cache.hidden_dtype={d}"]))["eval/val_logppl"]
               for d in ("bfloat16", "float8_e4m3")}
    print(f"\n{method} val_logppl: bfloat16 {results['bfloat16']:.4f}, float8_e4m3 {results['float8_e4m3']:.4f}")
    assert results["float8_e4m3"] == pytest.approx(results["bfloat16"], abs=0.02)


def stored_unit(hidden_NxLxD: torch.Tensor, dtype: str, first_row: int = 0) -> torch.Tensor:
    """The target a run's hidden loss sees per token: sr2's code as it is, any other dtype normalised."""
    got = decode_hidden(*encode_hidden(spec(hidden_NxLxD.shape[-1], hidden=dtype), hidden_NxLxD, first_row))
    return got if dtype == "sr2" else torch.nn.functional.normalize(got, dim=-1, eps=1e-6)


def layout_row(name: str, hidden_NxLxD: torch.Tensor, dtype: str, g: torch.Generator, E: int = 64) -> str:
    """Noise energy E||t~ - t||^2 (||t|| = 1), and of the mse gradient w.r.t. a prediction at cos 0.5 with
    t: the bias |E g~ - g| / |g| (over E codes of the same targets) and the variance E||g~ - g||^2 / |g|^2."""
    t = torch.nn.functional.normalize(hidden_NxLxD, dim=-1, eps=1e-6)
    codes = torch.stack([stored_unit(hidden_NxLxD, dtype, e * len(hidden_NxLxD)) for e in range(E)])
    noise = float(((codes - t) ** 2).sum(-1).mean())
    pred = correlated(hidden_NxLxD, 0.5, g)
    exact = hint_gradients(pred, t[None], "mse", unit=True)[0]
    grads = hint_gradients(pred.repeat(E, 1, 1), codes.flatten(0, 1), "mse", unit=dtype == "sr2")
    grads = grads.view(E, *t.shape) / len(t)
    bias = float((grads.mean(0) - exact).norm() / exact.norm())
    var = float(((grads - exact) ** 2).sum((1, 2, 3)).mean() / exact.norm() ** 2)
    mc = f" (its Monte-Carlo error over {E} codes: {(var / E) ** 0.5:.1e})" if E > 1 else ""
    return f"| {name} | {dtype} | {noise:.4f} | {bias:.1e}{mc} | {var:.3f} |"


@pytest.mark.slow
def test_sr2_measured_side_by_side(tiny_teacher, tiny_teacher_outputs, tiny, monkeypatch):
    """The storage table's measurements, in one run: bytes per token at d_T = 2,560; per-token noise energy and
    the hint gradient's bias and variance from the code, on paper-shaped states with outlier dimensions and
    the tiny teacher's, for each layout and for sr2's alternatives (no rotation, blocks of 64 and 128); a toy
    phase 1 on the tiny teacher's states per layout and seed (held-out cosine, and the code's gradient variance
    against the minibatch's own); tiny HLDC and HLDF runs per layout and seed (val_logppl)."""
    g = torch.Generator().manual_seed(3)
    paper = outlier_states(g, 2 * 256).view(2, 256, 2560)
    tiny_T = tiny_teacher_outputs[1]
    print("\n| d_T=2560 | dtype | bytes/token |\n|---|---|---|")
    for dtype in ("float32", "bfloat16", "float8_e4m3", "sr2"):
        s = CacheSpec("t", "tok", "s", 512, 128, 32000, 1, 2560, "bfloat16", dtype)
        print(f"| hidden | {dtype} | {bytes_per_token(s)['hidden']:.2f} |")
    assert bytes_per_token(s)["hidden"] <= 800
    print("\n| states | layout | noise E|t~-t|^2 | grad bias | grad variance / |g|^2 |\n|---|---|---|---|---|")

    for name, hidden in (("paper-shaped", paper), ("tiny teacher", tiny_T)):  # sr2's choices, justified
        for dtype in ("float32", "bfloat16", "float8_e4m3", "sr2"):
            print(layout_row(name, hidden, dtype, g, E=1 if dtype != "sr2" else 64))
        with monkeypatch.context() as m:
            m.setattr(codec, "hadamard", lambda x: x)
            m.setattr(codec, "signs", lambda D, device: torch.ones(D, device=device))
            print(layout_row(name, hidden, "sr2", g).replace("sr2", "sr2, no rotation"))
        for block in (64, 128):
            with monkeypatch.context() as m:
                m.setattr(codec, "BLOCK", block)
                print(layout_row(name, hidden, "sr2", g).replace("sr2", f"sr2, blocks of {block}"))


    print("\n| toy phase 1 (tiny teacher's states) | held-out cosine, seed 0 / 1 | code variance / minibatch's |"
          "\n|---|---|---|")
    train = teacher_on(tiny_teacher, "train", 512)
    held_tokens, _, held_T = teacher_on(tiny_teacher, "validation", 8)
    cos = {}
    for dtype in ("float32", "float8_e4m3", "sr2"):
        cos[dtype] = [phase1(tiny_teacher[0], train[0], train[2], dtype, seed, held_tokens, held_T)
                      for seed in (0, 1)]
        ratios = "" if dtype != "sr2" else " / ".join(f"{r:.2f} at cos {c:.2f}" for r, c in cos[dtype][0][1])
        print(f"| {dtype} | {cos[dtype][0][0]:.4f} / {cos[dtype][1][0]:.4f} | {ratios} |")
    print("\n| tiny run val_logppl | seed 0 | seed 1 | minus float32's, seed 0 / 1 |\n|---|---|---|---|")
    for method in ("hldc", "hldf"):
        common = tiny + [f"method={method}", "gamma=1", "p1=0.3", "budget.tokens=8192"]
        ppl = {d: [execute(C.compose(common + [f"seed={seed}", f"cache.hidden_dtype={d}"]))["eval/val_logppl"]
                   for seed in (0, 1)] for d in ("float32", "float8_e4m3", "sr2")}
        for d, (a, b) in ppl.items():
            print(f"| {method} {d} | {a:.4f} | {b:.4f} | {a - ppl['float32'][0]:+.4f} / {b - ppl['float32'][1]:+.4f} |")
        assert abs(ppl["sr2"][0] - ppl["float32"][0]) < 0.1


def phase1(cfg, tokens_NxL, hidden_NxLxD, dtype: str, seed: int, held_NxL, held_NxLxD):
    """HLDF's phase-1 module (the tiny student's bottom and the MLP to d_T) trained on the teacher's states
    stored in dtype with the paper's mse, one pass over the rows in batches of 4 (a cache's code of a row is
    fixed: a second epoch would fit its noise): its held-out cosine with the teacher's float32 states; and for
    sr2, at init and at the end, the variance of the parameters' gradient on one batch over 16 codes against its
    variance over 16 batches (both as 1/batch: their ratio is the same at the paper's 262,144 tokens), with the
    batch's mean cosine."""
    s, target_NxLxD, unit = cfg.student, stored_unit(hidden_NxLxD, dtype), dtype == "sr2"
    net = PhaseNet(build_model(s, seed), [s.num_hidden_layers // 2],
                   [build_regressor("mlp", s.hidden_size, target_NxLxD.shape[-1])], bottom=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ratios, steps = [], len(tokens_NxL) // 4
    for step in range(steps + 1):
        if step in (0, steps) and unit:
            ratios.append(code_variance_ratio(net, tokens_NxL, hidden_NxLxD))
        if step < steps:
            batch = slice(4 * step, 4 * step + 4)
            losses.hidden_loss(net(tokens_NxL[batch])[1][0], target_NxLxD[batch], unit_target=unit).backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        held = torch.nn.functional.cosine_similarity(net(held_NxL)[1][0], held_NxLxD, dim=-1).mean()
    return float(held), ratios


def code_variance_ratio(net, tokens_NxL, hidden_NxLxD) -> tuple[float, float]:
    """E||G(t~) - G(t)||^2 over 16 sr2 codes of batch 0 / the variance of G(t) over 16 batches of 4 rows."""
    def grad(tokens, target):
        net.zero_grad()
        losses.hidden_loss(net(tokens)[1][0], target, unit_target=True).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    t = torch.nn.functional.normalize(hidden_NxLxD, dim=-1, eps=1e-6)
    batches = torch.stack([grad(tokens_NxL[4 * k:4 * k + 4], t[4 * k:4 * k + 4]) for k in range(16)])
    exact = batches[0]
    codes = torch.stack([grad(tokens_NxL[:4], stored_unit(hidden_NxLxD[:4], "sr2", 10**6 * (k + 1)))
                         for k in range(16)])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(net(tokens_NxL[:4])[1][0], t[:4], dim=-1).mean()
    net.zero_grad()
    return float(((codes - exact) ** 2).sum(1).mean() / batches.var(0).sum()), float(cos)


# ---- the teacher's logits: top-k against sampled, against the full distribution -------------------------------

def kd_gradient_rows(logits_T_NxLxV: torch.Tensor, logits_S_NxLxV: torch.Tensor, tau: float, ks=(128, 32, 8),
                     draws: int = 12, E: int = 100) -> list[dict]:
    """The KD loss's gradient w.r.t. the student's logits (hldx.losses.sparse_kd, a mean over the positions) from
    the teacher's top-k (each of ks), from `draws` sampled ids (over E independent draws: rows e N, e = 0..E-1) and
    from every id (dense: top-k with k = V): each one's bias ||E g~ - g|| / ||g|| and variance E||g~ - g||^2 / ||g||^2
    against the full distribution's gradient g = tau (s_tau - p_tau) / positions, and the teacher's mass at tau
    that top-k drops (the stored teacher: logits relative to the max in bfloat16, as either cache stores them)."""
    N, L, V = logits_T_NxLxV.shape
    r = (logits_T_NxLxV - logits_T_NxLxV.amax(-1, keepdim=True)).to(torch.bfloat16).double()
    s = logits_S_NxLxV.double()
    p = torch.softmax(r / tau, -1)
    exact = tau * (torch.softmax(s / tau, -1) - p) / (N * L)
    norm2 = float((exact**2).sum())

    def grad(idx, val, lse=None) -> torch.Tensor:
        z = s.clone().requires_grad_()
        losses.sparse_kd(z, idx, val.double(), tau, lse_BxLxT=lse, taus=(0.5, 1.0, 2.0)).backward()
        return z.grad

    every_val, every_idx = r.topk(V, -1)
    rows = [{"estimator": "dense (all V ids)", "tail": 0.0,
             "bias": float((grad(every_idx, every_val) - exact).norm()) / norm2**0.5, "var": 0.0}]
    for k in ks:
        val, idx = r.topk(k, -1)
        rows.append({"estimator": f"top-{k}", "tail": float(1 - p.gather(-1, idx).sum(-1).mean()),
                     "bias": float((grad(idx, val) - exact).norm()) / norm2**0.5, "var": 0.0})
    spec = CacheSpec("t", "tok", "s", L, draws, V, 1, 8, logits="sampled")
    total, squares = torch.zeros_like(exact), 0.0
    for e in range(E):
        g = grad(*decode("sampled", encode_sampled(spec, logits_T_NxLxV, e * N))) - exact
        total += g
        squares += float((g**2).sum())
    bias2 = float(((total / E) ** 2).sum())
    spread = (squares - E * bias2) / (E - 1)    # E||g~ - E g~||^2, unbiased
    rows.append({"estimator": f"sampled ({draws} draws)", "tail": 0.0, "bias": (bias2 / norm2) ** 0.5,
                 "var": squares / E / norm2, "mc": (spread / E / norm2) ** 0.5, "z2": bias2 / (spread / E)})
    return rows


@pytest.mark.slow
def test_sampled_logits_measured_side_by_side(sharp_teacher):
    """The KD gradient table, in one run, on a sure tiny teacher's logits (V = 4096, 2 rows of 64 training tokens, as
    a cache holds them): for top-k
    (k = 128, 32, 8), 12 sampled ids and every id, at tau 0.5, 1 and 2, against the full distribution: bias,
    variance and the mass top-k drops, for a student at its initialisation and one near the teacher (its logits
    plus unit noise). The draws' gradient is unbiased within its Monte-Carlo error (over 100 draws); top-k's bias
    (exact: it is deterministic) is not zero, and grows as k shrinks."""
    cfg = sharp_teacher[0]
    tokens, logits_T, _ = teacher_on(sharp_teacher, "train", 2)
    with torch.no_grad():
        init = build_model(cfg.student, 0)(input_ids=tokens).logits.float()
    near = logits_T + torch.randn(logits_T.shape, generator=torch.Generator().manual_seed(4))
    print("\n| student | tau | estimator | tail mass dropped | gradient bias ||E g~ - g||/||g|| | "
          "gradient variance E||g~ - g||^2/||g||^2 |\n|---|---|---|---|---|---|")
    for student, logits_S in (("at init", init), ("near the teacher", near)):
        for tau in (0.5, 1.0, 2.0):
            rows = kd_gradient_rows(logits_T, logits_S, tau)
            for row in rows:
                mc = f" (MC error {row['mc']:.1e}, z2 {row['z2']:.2f})" if "mc" in row else ""
                bias = f"{row['bias']:.2e}{mc}"
                print(f"| {student} | {tau:g} | {row['estimator']} | {row['tail']:.3f} | {bias} | {row['var']:.3g} |")
            dense, *top, draws = rows
            assert dense["bias"] < 1e-6 and draws["z2"] < 2.0, (student, tau, draws)
            assert all(t["bias"] > 1e-3 and t["tail"] > 0 for t in top), (student, tau, top)  # dense: ~1e-15
            assert [t["bias"] for t in top] == sorted(t["bias"] for t in top)  # k = 128, 32, 8: worse and worse


@pytest.mark.slow
def test_sampled_logits_tiny_runs_side_by_side(tiny, sharp_teacher):
    """Tiny KD and HLDC runs (seeds 0 and 1) from the teacher's top-k, its sampled logits and its full distribution
    (online, method.top_k = V, budget.tokens raised so that it takes the cached runs' steps: an online teacher's
    forward is charged to the budget): val_logppl side by side with the seed spread."""
    common = tiny + SHARP + ["budget.tokens=8192", "gamma=1"]
    sources = {"top-k": [], "sampled": ["cache.logits=sampled"],
               "dense": ["teacher.source=online", "method.top_k=4096"]}
    print("\n| tiny run | top-k | sampled | dense | sampled - dense | top-k - dense | seed spread (dense) |"
          "\n|---|---|---|---|---|---|---|")
    for method in ("kd", "hldc"):
        ppl = {}
        for name, extra in sources.items():
            overrides = common + [f"method={method}"] + extra
            if name == "dense":  # the cached runs' steps: the budget scaled by the online teacher's cost per token
                cached = plan_run(C.compose(common + [f"method={method}"]))
                online = plan_run(C.compose(overrides)).flops_per_token[method]
                overrides += [f"budget.tokens={8192 * online / cached.flops_per_token[method]}"]
                assert plan_run(C.compose(overrides)).phases[0].steps == cached.phases[0].steps
            ppl[name] = [execute(C.compose(overrides + [f"seed={seed}"]))["eval/val_logppl"] for seed in (0, 1)]
        d = ppl["dense"]
        print(f"| {method} | " + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in ppl.values()) +
              f" | {ppl['sampled'][0] - d[0]:+.4f} / {ppl['sampled'][1] - d[1]:+.4f} | "
              f"{ppl['top-k'][0] - d[0]:+.4f} / {ppl['top-k'][1] - d[1]:+.4f} | {abs(d[0] - d[1]):.4f} |")
        assert all(abs(a - b) < 0.1 for a, b in zip(ppl["sampled"], d))
