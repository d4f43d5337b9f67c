"""hldx.losses against independent dense computations (float64 references, torch.nn.functional)."""
import pytest
import torch
import torch.nn.functional as F

from hldx.losses import gathered_log_softmax, hidden_loss, kd_objective, nll, sparse_kd

B, L, V = 2, 5, 11


def _teacher(k: int, seed: int = 1, dtype=torch.float64):
    """Teacher top-k (indices, values) of random teacher logits, as the cache stores them."""
    g = torch.Generator().manual_seed(seed)
    t_BxLxV = 3 * torch.randn(B, L, V, generator=g, dtype=dtype)
    val, idx = t_BxLxV.topk(k, dim=-1)
    return t_BxLxV, idx, val


def _student(seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(B, L, V, generator=g, dtype=dtype)).requires_grad_()


def _dense_kd(z_BxLxV, idx, val, tau):
    """Reference: the teacher's top-k probabilities scattered into a dense [B, L, V] distribution."""
    p_dense = torch.zeros_like(z_BxLxV).scatter(-1, idx, torch.softmax(val / tau, dim=-1))
    kl_BxL = F.kl_div(torch.log_softmax(z_BxLxV / tau, dim=-1), p_dense, reduction="none").sum(-1)
    return tau**2 * kl_BxL.mean()


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("k", [1, 4, V])
def test_sparse_kd_matches_dense_kl_and_its_gradients(tau, k):
    _, idx, val = _teacher(k)
    val.requires_grad_()
    z = _student()
    ours = sparse_kd(z, idx, val, tau)
    ref = _dense_kd(z, idx, val, tau)
    assert abs(ours.item() - ref.item()) < 1e-6 * max(1.0, abs(ref.item()))
    g_ours = torch.autograd.grad(ours, (z, val))
    g_ref = torch.autograd.grad(ref, (z, val))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_full_vocabulary_kd_is_zero_with_zero_gradient_when_student_equals_teacher():
    t, idx, val = _teacher(V)
    z = t.clone().requires_grad_()
    loss = sparse_kd(z, idx, val, tau=1.5)
    (g,) = torch.autograd.grad(loss, z)
    assert abs(loss.item()) < 1e-12
    assert g.abs().max().item() < 1e-12


def test_top_k_kd_is_zero_when_student_puts_all_mass_on_the_teachers_top_k():
    t, idx, val = _teacher(4)
    z = torch.full_like(t, float("-inf")).scatter(-1, idx, val).requires_grad_()
    loss = sparse_kd(z, idx, val, tau=1.0)
    (g,) = torch.autograd.grad(loss, z)
    assert abs(loss.item()) < 1e-12
    assert g.abs().max().item() < 1e-12
    # With mass left outside the top-k the same logits on the top-k no longer suffice.
    assert sparse_kd(t, idx, val, tau=1.0).item() > 1e-3


@pytest.mark.parametrize("seed", range(5))
def test_kd_is_nonnegative(seed):
    _, idx, val = _teacher(3, seed=seed, dtype=torch.float32)
    z = _student(seed + 10, dtype=torch.float32).detach()
    for tau in (0.5, 1.0, 3.0):
        assert sparse_kd(z, idx, val, tau).item() >= 0


def test_nll_matches_cross_entropy_on_shifted_tokens_with_gradients():
    z = _student()
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(3))
    ours = nll(z, tokens)
    ref = F.cross_entropy(z[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
    assert abs(ours.item() - ref.item()) < 1e-12
    torch.testing.assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(ref, z)[0],
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("tau", [1.0, 2.0])  # 1.0 takes the fused single-pass path
def test_kd_objective_mixes_nll_and_kd(tau):
    _, idx, val = _teacher(4)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(4))
    z = _student()
    total0, n0, k0 = kd_objective(z, tokens, idx, val, tau, alpha=0.0)
    total1, n1, k1 = kd_objective(z, tokens, idx, val, tau, alpha=1.0)
    assert torch.equal(total0, nll(z, tokens)) and torch.equal(n0, nll(z, tokens))
    assert torch.equal(total1, sparse_kd(z, idx, val, tau)) and torch.equal(k1, sparse_kd(z, idx, val, tau))
    alpha = 0.7
    total, _, _ = kd_objective(z, tokens, idx, val, tau, alpha)
    ref = (1 - alpha) * F.cross_entropy(z[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)) \
        + alpha * _dense_kd(z, idx, val, tau)
    assert abs(total.item() - ref.item()) < 1e-10
    torch.testing.assert_close(torch.autograd.grad(total, z)[0], torch.autograd.grad(ref, z)[0],
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_chunked_equals_unchunked(tau):
    _, idx, val = _teacher(4)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(5))
    z = _student()
    whole = kd_objective(z, tokens, idx, val, tau, 0.3)
    chunked = kd_objective(z, tokens, idx, val, tau, 0.3, chunk=3)  # 3 does not divide B * L = 10
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(whole[0], z)[0], torch.autograd.grad(chunked[0], z)[0],
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sparse_kd(z, idx, val, tau, chunk=1), sparse_kd(z, idx, val, tau),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(nll(z, tokens, chunk=4), nll(z, tokens), rtol=1e-12, atol=1e-14)


def test_gathered_log_softmax_serves_several_temperatures_and_repeated_indices():
    z = _student()
    idx_a = torch.tensor([3, 3, 0]).expand(B, L, 3)  # a repeated index
    idx_b = torch.randint(0, V, (B, L, 2), generator=torch.Generator().manual_seed(8))
    targets = [(idx_a, 0.7), (idx_b, 1.0), (idx_b, 0.7)]  # the two tau=0.7 targets share one pass
    ours = gathered_log_softmax(z, *targets, chunk=4)
    refs = [torch.log_softmax(z / tau, -1).gather(-1, idx) for idx, tau in targets]
    g = torch.Generator().manual_seed(9)
    weights = [torch.randn(idx.shape, generator=g, dtype=torch.float64) for idx, _ in targets]
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    mix = lambda logps: sum((lp * w).sum() for lp, w in zip(logps, weights))
    torch.testing.assert_close(torch.autograd.grad(mix(ours), z)[0], torch.autograd.grad(mix(refs), z)[0],
                               rtol=1e-10, atol=1e-14)


def test_bf16_logits_are_computed_in_float32():
    _, idx, val = _teacher(4, dtype=torch.float32)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(6))
    z32 = _student(dtype=torch.float32).detach()
    z16 = z32.to(torch.bfloat16).requires_grad_()
    total16, n16, k16 = kd_objective(z16, tokens, idx, val.to(torch.bfloat16), tau=2.0, alpha=0.5)
    assert total16.dtype == n16.dtype == k16.dtype == torch.float32
    # Exactly the float32 result of the same (bf16-representable) numbers ...
    up = z16.detach().float()
    torch.testing.assert_close(n16, nll(up, tokens), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k16, sparse_kd(up, idx, val.to(torch.bfloat16).float(), 2.0), rtol=1e-6, atol=1e-6)
    # ... and close to the float32 logits they were rounded from.
    torch.testing.assert_close(k16, sparse_kd(z32, idx, val, 2.0), rtol=2e-2, atol=2e-2)
    (g,) = torch.autograd.grad(total16, z16)
    assert g.dtype == torch.bfloat16
    total16_chunked = kd_objective(z16, tokens, idx, val.to(torch.bfloat16), 2.0, 0.5, chunk=3)[0]
    torch.testing.assert_close(total16_chunked, total16, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(total16_chunked, z16)[0], g)
    (g_up,) = torch.autograd.grad(kd_objective(up.requires_grad_(), tokens, idx, val.to(torch.bfloat16).float(),
                                               2.0, 0.5)[0], up)
    torch.testing.assert_close(g.float(), g_up, rtol=1e-2, atol=1e-4)  # bf16 rounding of the float32 gradient


def _hand_mse(a, b):
    a, b = a.double(), b.double()
    a = a / a.pow(2).sum(-1, keepdim=True).sqrt()
    b = b / b.pow(2).sum(-1, keepdim=True).sqrt()
    return ((a - b) ** 2).sum() / a.numel()


def test_hidden_mse_matches_hand_computation_and_is_scale_invariant():
    g = torch.Generator().manual_seed(7)
    D = 16
    pred, target = torch.randn(B, L, D, generator=g), 50 * torch.randn(B, L, D, generator=g)
    loss = hidden_loss(pred, target)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - _hand_mse(pred, target).item()) < 1e-6
    scale_BxLx1 = torch.rand(B, L, 1, generator=g) * 100 + 0.01
    torch.testing.assert_close(hidden_loss(pred * scale_BxLx1, target), loss)
    torch.testing.assert_close(hidden_loss(pred, target * scale_BxLx1), loss)
    assert hidden_loss(pred, 3 * pred).item() < 1e-12
    torch.testing.assert_close(hidden_loss(pred, -pred), torch.tensor(4 / D))
    assert 0 < loss.item() < 4 / D


def test_hidden_mse_sum_and_cosine_against_a_per_token_loop():
    """mse_sum: the squared distance of the unit vectors summed over D, averaged over tokens; cosine: 1 - the
    angle's cosine (a dot product over the norms, token by token in float64), averaged over tokens."""
    g = torch.Generator().manual_seed(3)
    D = 24
    pred, target = torch.randn(B, L, D, generator=g), 7 * torch.randn(B, L, D, generator=g)
    dist, cos = [], []
    for b in range(B):
        for t in range(L):
            p, q = pred[b, t].double(), target[b, t].double()
            dist.append(float(((p / p.norm() - q / q.norm()) ** 2).sum()))
            cos.append(float(p @ q / (p.norm() * q.norm())))
    assert hidden_loss(pred, target, "mse_sum").item() == pytest.approx(sum(dist) / len(dist), rel=1e-5)
    assert hidden_loss(pred, target, "cosine").item() == pytest.approx(1 - sum(cos) / len(cos), rel=1e-5)
    torch.testing.assert_close(hidden_loss(pred, target, "mse_sum"), D * hidden_loss(pred, target, "mse"))
    torch.testing.assert_close(hidden_loss(pred, target, "mse_sum"), 2 * hidden_loss(pred, target, "cosine"))


def test_bad_shapes_fail_with_clear_errors():
    z = _student()
    _, idx, val = _teacher(4)
    with pytest.raises(ValueError, match="tokens"):
        nll(z, torch.zeros(B, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        sparse_kd(z, idx, val[..., :3], 1.0)
    with pytest.raises(ValueError, match="leading"):
        sparse_kd(z[:, :-1], idx, val, 1.0)
    with pytest.raises(ValueError, match="tau"):
        sparse_kd(z, idx, val, 0.0)
    with pytest.raises(ValueError, match="regressor"):
        hidden_loss(torch.zeros(B, L, 4), torch.zeros(B, L, 5))
