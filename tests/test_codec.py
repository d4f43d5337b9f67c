"""cache.hidden_dtype=sr2 (hldx.store.codec): the rotation against an independent Hadamard matrix, the
uniforms, unbiasedness, the round trip through a real cache, bit-identical rebuilds however the rows are
batched, checksums over it; the losses' linear form, a run's use of it, the refusal of a size 32 does not
divide, and the paper-123m study's cache under 150 TB."""
import hashlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from hldx import config as C
from hldx import losses, teacher
from hldx.errors import ConfigError
from hldx import store as cache
from hldx.job import execute
from hldx.plan import main as plan_main
from hldx.store import CacheError, codec
from cache_worker import Teacher, get, make_spec, row_tokens
from tests.test_cache import built, flip_bit, shard_file

L, D = 16, 96  # 3 blocks of 32 components; the Hadamard transform in blocks of 32


def test_the_rotation_is_the_orthonormal_hadamard_matrix_in_blocks():
    x = torch.randn(5, 2560, dtype=torch.float64)
    H = torch.tensor(scipy.linalg.hadamard(512), dtype=torch.float64) / 512**0.5  # 2560 = 5 x 512
    assert torch.allclose(codec.hadamard(x), (x.view(5, 5, 512) @ H).view(5, 2560), atol=1e-12)
    assert torch.allclose(codec.hadamard(codec.hadamard(x)), x, atol=1e-12)
    s = codec.signs(2560, torch.device("cpu"))
    assert set(s.tolist()) == {-1.0, 1.0} and abs(float(s.mean())) < 0.1


def test_uniforms_are_uniform_and_a_function_of_row_position_and_dimension():
    u = codec.uniforms(10**9, (64, 32, 96), torch.device("cpu"))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and torch.equal(u, (u * 2**24).floor() / 2**24)
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert ((counts - u.numel() / 16).abs() < 5 * (u.numel() / 16) ** 0.5).all()   # flat
    assert abs(float(torch.corrcoef(torch.stack([u[:, :, :-1].flatten(), u[:, :, 1:].flatten()]))[0, 1])) < 0.01
    assert torch.equal(codec.uniforms(10**9 + 3, (2, 32, 96), torch.device("cpu")), u[3:5])


def test_each_hidden_part_draws_bits_of_its_own_and_the_first_keeps_its_bits():
    """Stream 0 (the part `hidden`) gives the bits it gave before layer pairs existed (their digest on main); the
    stream of another layer's part is uncorrelated with it."""
    cpu = torch.device("cpu")
    u = codec.uniforms(1000, (3, 5, 64), cpu)
    assert hashlib.sha256(u.numpy().tobytes()).hexdigest()[:16] == "00be8cf87c8a6244"
    other = codec.uniforms(1000, (3, 5, 64), cpu, stream=6)
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1])) < 0.05


def test_the_code_is_unbiased_where_rounding_to_nearest_is_not():
    """E[decode(encode(t))] = t: the mean of 400 codes of the same unit vectors (rows 0..399) is within its
    Monte-Carlo error of t; rounding to nearest at the same bits (u = 1/2) is not."""
    t = torch.nn.functional.normalize(torch.randn(4, D) * torch.linspace(0.2, 5, D), dim=-1)
    many = t.expand(400, 4, D).contiguous()
    x = codec.decode(*codec.encode(many, codec.uniforms(0, many.shape, many.device)))
    se2 = x.var(0) / 400
    z2 = float(((x.mean(0) - t) ** 2).sum() / se2.sum())
    nearest = codec.decode(*codec.encode(t[None], torch.full((1, 4, D), 0.5)))[0]
    z2_nearest = float(((nearest - t) ** 2).sum() / se2.sum())
    print(f"\n||mean - t||^2 / its Monte-Carlo variance: stochastic {z2:.2f}, nearest {z2_nearest:.1f}")
    assert z2 < 1.5 and z2_nearest > 10
    assert float(((x - t) ** 2).sum(-1).mean()) < 0.5   # the noise energy against ||t||^2 = 1


def test_a_cache_round_trips_and_rebuilds_bit_identically(tmp_path):
    spec = make_spec(hidden_dtype="sr2", hidden_size=D, rows=20)   # shards [0,8) [8,16) [16,20)
    a = built(tmp_path, spec, "a")                                 # 3 rows per teacher call
    b = tmp_path / "b"
    assert cache.build(spec, b, Teacher(spec), row_tokens(spec), progress=False, batch_rows=5)
    for part, start, stop in (("hidden", 0, 8), ("hidden", 8, 16), ("hidden", 16, 20)):
        assert shard_file(a, part, start, stop).read_bytes() == shard_file(b, part, start, stop).read_bytes()
    assert cache.bytes_per_token(spec)["hidden"] == D / 4 + D / 32 + 16 / L
    rows = np.arange(20)
    _, _, got = get(cache.open_cache(a, spec), rows, topk=False, hidden=True)
    (hid,) = Teacher(spec)(row_tokens(spec)(rows), ("hidden",))["hidden"]
    t = torch.nn.functional.normalize(hid, dim=-1)
    codes = codec.encode(t, codec.uniforms(0, t.shape, t.device))
    assert torch.equal(got, codec.decode(*codes))
    assert not torch.equal(got, t) and float(torch.nn.functional.cosine_similarity(got, t, dim=-1).mean()) > 0.8
    flip_bit(shard_file(a, "hidden", 8, 16), 8 * L * D // 4 + 2 * L * D // 32 + 1)  # row 10's scales
    with pytest.raises(CacheError, match="scale of rows \\[10\\] fail their checksum"):
        get(cache.open_cache(a, spec), np.arange(8, 16), topk=False, hidden=True)


def test_a_hidden_size_the_blocks_do_not_divide_is_refused():
    with pytest.raises(ValueError, match="hidden_dtype=sr2 needs a hidden size divisible by 32, got 12"):
        make_spec(hidden_dtype="sr2")
    cfg = C.compose(["method=hldc", "cache.hidden_dtype=sr2", "teacher.model.hidden_size=100"])
    with pytest.raises(ConfigError, match="for a teacher of hidden size 100 \\(sr2: a multiple of 32\\)"):
        teacher.check(cfg, launch=False)


@pytest.mark.parametrize("kind", ["mse", "mse_sum", "cosine"])
def test_the_linear_loss_of_a_unit_target_is_the_papers_loss(kind):
    """For an exact unit target, c (1 - n(p).t) is the paper's loss, in value and gradient."""
    t = torch.nn.functional.normalize(torch.randn(2, 5, 64, dtype=torch.float64), dim=-1)
    got = []
    for unit in (False, True):
        p = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
        loss = losses.hidden_loss(p, t, kind, unit_target=unit)
        loss.backward()
        got.append((loss.detach(), p.grad))
    (l0, g0), (l1, g1) = got
    assert torch.allclose(l0, l1, rtol=1e-12) and torch.allclose(g0, g1, rtol=1e-9, atol=1e-15)


def test_a_run_on_an_sr2_cache_uses_its_targets_as_given(tiny, monkeypatch):
    """The trainer hands sr2's decoded targets to the hidden loss as unbiased unit targets (not renormalised)."""
    seen = []
    real = losses.hidden_loss

    def spy(pred, target, kind="mse", eps=1e-6, unit_target=False):
        seen.append((unit_target, float(target.norm(dim=-1).mean())))
        return real(pred, target, kind, eps, unit_target)

    monkeypatch.setattr(losses, "hidden_loss", spy)
    execute(C.compose(tiny + ["method=hldf", "p1=0.3", "cache.hidden_dtype=sr2"]))
    assert seen and all(unit for unit, _ in seen)
    assert all(1.05 < norm < 1.6 for _, norm in seen)  # E||t~||^2 = 1 + the noise energy: decoded, not unit


def test_the_paper_123m_studys_whole_cache_is_under_150_tb(hldx_cache, tmp_path):
    out = tmp_path / "plan.json"
    assert plan_main(["-m", "+sweep=paper-123m", f"plan.json={out}"]) == 0
    storage = json.loads(out.read_text())["teacher_cache"]
    assert storage["hidden_bytes_per_token"] == 720 + 16 / 512 and storage["bytes"] <= 150e12
