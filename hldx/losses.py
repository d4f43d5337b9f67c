"""The study's losses (paper eqs. 1-4) as pure functions of tensors.

Logits may arrive in bf16; all arithmetic runs in float32 (float64 stays float64). The student's
full-vocabulary log-softmax is never materialised: `gathered_log_softmax` returns it at the requested
indices only, computed over chunks of positions, with a closed-form backward. The teacher's distribution stays
sparse throughout: its top-k, renormalised, or ids drawn from it with importance weights (sampled_target).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """float32, or float64 if an input already is."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


class _GatheredLogSoftmax(torch.autograd.Function):
    """For each temperature tau_g with indices idx_g: logp_g = log_softmax(z_NxV / tau_g)[idx_g].

    d logp_g[k] / dz = (onehot(idx_g[k]) - softmax(z / tau_g)) / tau_g; all groups add into one gradient.
    Works in place on [chunk, V] buffers; the only full-size tensor it makes is that gradient.
    """

    @staticmethod
    def forward(ctx, z_NxV: Tensor, taus: tuple[float, ...], chunk: int, *idx_NxK: Tensor) -> tuple[Tensor, ...]:
        N, V = z_NxV.shape
        dtype = _compute_dtype(z_NxV)
        buf_CxV = z_NxV.new_empty(min(chunk, N), V, dtype=dtype)
        lse_GxN = z_NxV.new_empty(len(taus), N, dtype=dtype)
        logp_NxK = [z_NxV.new_empty(idx.shape, dtype=dtype) for idx in idx_NxK]
        for s in range(0, N, chunk):
            rows = slice(s, s + chunk)
            for gi, (tau, idx, logp) in enumerate(zip(taus, idx_NxK, logp_NxK)):
                zc = _scaled(z_NxV[rows], tau, buf_CxV)
                logp[rows] = zc.gather(-1, idx[rows])
                max_Cx1 = zc.amax(-1, keepdim=True)
                lse_GxN[gi, rows] = zc.sub_(max_Cx1).exp_().sum(-1).log_().add_(max_Cx1[:, 0])
                logp[rows] -= lse_GxN[gi, rows, None]
        ctx.save_for_backward(z_NxV, lse_GxN, *idx_NxK)
        ctx.taus, ctx.chunk = taus, chunk
        return tuple(logp_NxK)

    @staticmethod
    @once_differentiable
    def backward(ctx, *g_NxK: Tensor) -> tuple[Tensor | None, ...]:
        z_NxV, lse_GxN, *idx_NxK = ctx.saved_tensors
        (N, V), dtype, chunk = z_NxV.shape, lse_GxN.dtype, ctx.chunk
        grad_NxV = torch.empty_like(z_NxV)
        # Accumulate in grad_NxV itself when it is float32, else in a float32 buffer copied out per chunk.
        acc_CxV = None if grad_NxV.dtype == dtype else z_NxV.new_empty(min(chunk, N), V, dtype=dtype)
        tmp_CxV = z_NxV.new_empty(min(chunk, N), V, dtype=dtype) if len(ctx.taus) > 1 else None
        for s in range(0, N, chunk):
            rows = slice(s, min(s + chunk, N))
            acc = grad_NxV[rows] if acc_CxV is None else acc_CxV[: rows.stop - s]
            for gi, (tau, idx, g) in enumerate(zip(ctx.taus, idx_NxK, g_NxK)):
                p = _scaled(z_NxV[rows], tau, tmp_CxV if gi else acc)
                p.sub_(lse_GxN[gi, rows, None]).exp_()  # softmax(z / tau)
                g_over_tau = g[rows].to(dtype) / tau
                p.mul_(-g_over_tau.sum(-1, keepdim=True)).scatter_add_(-1, idx[rows], g_over_tau)
                if gi:
                    acc += p
            if acc_CxV is not None:
                grad_NxV[rows] = acc
        return (grad_NxV, None, None) + (None,) * len(idx_NxK)


def _scaled(z_CxV: Tensor, tau: float, buf: Tensor) -> Tensor:
    """z / tau written into the first rows of buf, in buf's dtype."""
    out = buf[: z_CxV.shape[0]].copy_(z_CxV)
    return out if tau == 1 else out.div_(tau)


def gathered_log_softmax(logits_BxLxV: Tensor, *targets: tuple[Tensor, float], chunk: int | None = None
                         ) -> list[Tensor]:
    """For each target (idx_BxLxK, tau): log_softmax(logits / tau) over the full vocabulary, returned only at
    idx, as float32 [B, L, K]. Targets with the same tau share one pass over the vocabulary.

    chunk: positions per piece (None = all at once); bounds the float32 temporaries to [chunk, V].
    """
    for idx, tau in targets:
        if idx.shape[:-1] != logits_BxLxV.shape[:-1]:
            raise ValueError(f"indices {tuple(idx.shape)} do not match logits {tuple(logits_BxLxV.shape)} "
                             "in the leading [B, L] dimensions")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of positions or None, got {chunk}")
    z_NxV = logits_BxLxV.reshape(-1, logits_BxLxV.shape[-1])
    N = z_NxV.shape[0]
    taus = tuple(dict.fromkeys(float(tau) for _, tau in targets))  # distinct, in order of appearance
    groups = [[idx for idx, t in targets if float(t) == tau] for tau in taus]
    idx_per_tau = [torch.cat([idx.reshape(N, -1).long() for idx in group], dim=-1) for group in groups]
    logp_per_tau = _GatheredLogSoftmax.apply(z_NxV, taus, chunk or max(1, N), *idx_per_tau)
    pieces = [iter(logp.split([idx.shape[-1] for idx in group], dim=-1))
              for logp, group in zip(logp_per_tau, groups)]
    return [next(pieces[taus.index(float(tau))]).reshape(idx.shape) for idx, tau in targets]


def _next_tokens(logits_BxLxV: Tensor, tokens_BxL: Tensor) -> Tensor:
    """[B, L, 1]: tokens[i + 1] at position i (the last position gets a placeholder 0, never used)."""
    if logits_BxLxV.dim() != 3 or tokens_BxL.shape != logits_BxLxV.shape[:2]:
        raise ValueError(f"expected logits [B, L, V] and tokens [B, L], got {tuple(logits_BxLxV.shape)} "
                         f"and {tuple(tokens_BxL.shape)}")
    return F.pad(tokens_BxL[:, 1:].long(), (0, 1))[..., None]


def _check_topk(topk_idx_BxLxK: Tensor, topk_val_BxLxK: Tensor) -> None:
    if topk_idx_BxLxK.shape != topk_val_BxLxK.shape:
        raise ValueError(f"teacher top-k indices {tuple(topk_idx_BxLxK.shape)} and values "
                         f"{tuple(topk_val_BxLxK.shape)} must have the same shape [B, L, K]")


def teacher_logp(val_BxLxN: Tensor, lse_BxLxT: Tensor, taus: tuple[float, ...]) -> Tensor:
    """[B, L, N, T]: log p_t(i) = r_i / t - a_t, the teacher's log-probability at each tau t of a sampled cache's
    grid of ids with logits r relative to the max (val), a_t the position's log-normaliser at t (lse). The taus
    stay Python numbers: no tensor is made of them, nor copied to the device, at every step."""
    return torch.stack([val_BxLxN / t for t in taus], -1) - lse_BxLxT[..., None, :].to(val_BxLxN.dtype)


def log_proposal(logp_BxLxNxT: Tensor) -> Tensor:
    """[B, L, N]: log q(i), the sampled cache's proposal at each id: the mixture (1/T) sum_t p_t of the teacher's
    distributions at the grid's taus (hldx.store.sampled)."""
    return torch.logsumexp(logp_BxLxNxT, dim=-1) - math.log(logp_BxLxNxT.shape[-1])


def sampled_target(val_BxLxN: Tensor, lse_BxLxT: Tensor, taus: tuple[float, ...], tau: float
                   ) -> tuple[Tensor, Tensor]:
    """The teacher's distribution at tau as N drawn ids carry it (cache.logits=sampled, hldx.store.sampled): their
    importance weights p_tau(i) / (N q(i)), whose sum over the ids is an unbiased estimate of p_tau, and log p_tau."""
    if tau not in taus:
        raise ValueError(f"tau={tau} is not among the sampled cache's taus {list(taus)}")
    dtype = _compute_dtype(val_BxLxN, lse_BxLxT)
    logp_BxLxNxT = teacher_logp(val_BxLxN.to(dtype), lse_BxLxT.to(dtype), taus)
    logp_BxLxN = logp_BxLxNxT[..., taus.index(tau)]
    return (logp_BxLxN - log_proposal(logp_BxLxNxT)).exp() / val_BxLxN.shape[-1], logp_BxLxN


def _kl(logp_S_BxLxK: Tensor, p_T_BxLxK: Tensor, logp_T_BxLxK: Tensor, tau: float) -> Tensor:
    """tau^2 * mean over positions of sum_k p_T (log p_T - log p_S): the KL of the teacher's (sparse) target."""
    return tau**2 * (p_T_BxLxK * (logp_T_BxLxK - logp_S_BxLxK)).sum(-1).mean()


def _target(val_BxLxK: Tensor, tau: float, dtype: torch.dtype, lse_BxLxT: Tensor | None,
            taus: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """(p_T, log p_T) on the K ids: top-k, softmax(val / tau) renormalised over the k; sampled (lse given), the
    importance weights of the drawn ids."""
    if lse_BxLxT is not None:
        p_T, logp_T = sampled_target(val_BxLxK, lse_BxLxT, taus, tau)
        return p_T.to(dtype), logp_T.to(dtype)
    logp_T = torch.log_softmax(val_BxLxK.to(dtype) / tau, dim=-1)
    return logp_T.exp(), logp_T


def nll(logits_BxLxV: Tensor, tokens_BxL: Tensor, *, chunk: int | None = None) -> Tensor:
    """Mean next-token NLL over the L-1 predicted positions (paper eq. 1): logits at i predict tokens[i+1]."""
    (logp_BxLx1,) = gathered_log_softmax(logits_BxLxV, (_next_tokens(logits_BxLxV, tokens_BxL), 1.0), chunk=chunk)
    return -logp_BxLx1[:, :-1].mean()


def sparse_kd(logits_BxLxV: Tensor, topk_idx_BxLxK: Tensor, topk_val_BxLxK: Tensor, tau: float,
              *, chunk: int | None = None, lse_BxLxT: Tensor | None = None, taus: tuple[float, ...] = ()) -> Tensor:
    """tau^2 * mean over all B*L positions of KL(p_T || p_S) (paper's L_logits).

    p_T = softmax(topk_val / tau) over the teacher's k logits; log p_S = log_softmax(logits / tau) over the
    full vocabulary, taken at topk_idx. No dense teacher distribution is built. With `lse_BxLxT` (a sampled
    cache's log-normalisers at its `taus`), the ids are draws and p_T their importance weights (sampled_target):
    the loss and its gradient w.r.t. the logits are unbiased estimates of the full distribution's.
    """
    _check_topk(topk_idx_BxLxK, topk_val_BxLxK)
    (logp_S_BxLxK,) = gathered_log_softmax(logits_BxLxV, (topk_idx_BxLxK, tau), chunk=chunk)
    return _kl(logp_S_BxLxK, *_target(topk_val_BxLxK, tau, logp_S_BxLxK.dtype, lse_BxLxT, taus), tau)


def kd_objective(logits_BxLxV: Tensor, tokens_BxL: Tensor, topk_idx_BxLxK: Tensor, topk_val_BxLxK: Tensor,
                 tau: float, alpha: float, *, chunk: int | None = None, lse_BxLxT: Tensor | None = None,
                 taus: tuple[float, ...] = ()) -> tuple[Tensor, Tensor, Tensor]:
    """(1 - alpha) * nll + alpha * sparse_kd (paper eq. 2); returns (total, nll, kd).

    One chunked pass over the vocabulary serves both terms (one logsumexp per position when tau == 1).
    """
    next_BxLx1 = _next_tokens(logits_BxLxV, tokens_BxL)
    _check_topk(topk_idx_BxLxK, topk_val_BxLxK)
    logp_next_BxLx1, logp_S_BxLxK = gathered_log_softmax(
        logits_BxLxV, (next_BxLx1, 1.0), (topk_idx_BxLxK, tau), chunk=chunk)
    loss_nll = -logp_next_BxLx1[:, :-1].mean()
    loss_kd = _kl(logp_S_BxLxK, *_target(topk_val_BxLxK, tau, logp_S_BxLxK.dtype, lse_BxLxT, taus), tau)
    return (1 - alpha) * loss_nll + alpha * loss_kd, loss_nll, loss_kd


def hidden_loss(pred_BxLxD: Tensor, target_BxLxD: Tensor, kind: str = "mse", eps: float = 1e-6,
                unit_target: bool = False) -> Tensor:
    """The distance between per-token L2-normalised vectors (each divided by max(||x||, eps)), averaged over
    tokens: `mse` also averages over the D dimensions (the paper's MeanSquaredError, eq. 4 and L_emb; in
    [0, 4/D]), `mse_sum` sums over them (D x mse, in [0, 4]), `cosine` is 1 - cos (in [0, 2]; for unit
    vectors ||a - b||^2 = 2 - 2 cos, so it is mse_sum / 2).

    unit_target: the target is an unbiased estimate t~ of a unit vector t (hldx.store.codec), used as given:
    the loss is c (1 - n(p).t~) with c = 2/D, 2, 1, linear in t~, so its value and its gradient are unbiased
    for those of t. (||n(p) - t~||^2 would add ||t~||^2 - 1, the code's noise energy, to the value, not to
    the gradient.)"""
    if pred_BxLxD.shape != target_BxLxD.shape:
        raise ValueError(f"hidden states differ in shape: prediction {tuple(pred_BxLxD.shape)} vs teacher "
                         f"{tuple(target_BxLxD.shape)}; the regressor must map d_S to d_T")
    dtype = _compute_dtype(pred_BxLxD, target_BxLxD)
    pred_BxLxD, target_BxLxD = pred_BxLxD.to(dtype), target_BxLxD.to(dtype)
    if unit_target:
        c = {"mse": 2 / pred_BxLxD.shape[-1], "mse_sum": 2.0, "cosine": 1.0}[kind]
        return c * (1 - (F.normalize(pred_BxLxD, dim=-1, eps=eps) * target_BxLxD).sum(-1).mean())
    if kind == "cosine":
        return 1 - F.cosine_similarity(pred_BxLxD, target_BxLxD, dim=-1, eps=eps).mean()
    mse = F.mse_loss(F.normalize(pred_BxLxD, dim=-1, eps=eps), F.normalize(target_BxLxD, dim=-1, eps=eps))
    return mse * pred_BxLxD.shape[-1] if kind == "mse_sum" else mse
