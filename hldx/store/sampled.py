"""Sampled teacher logits (cache.logits=sampled): n ids per position drawn from the teacher's distribution, with
what makes the KD loss's gradient w.r.t. the student's logits unbiased at every tau of a grid, from one set of draws.

At a position the teacher's logits relative to their maximum are r (r_max = 0), rounded to cache.values_dtype as
top-k's values are: everything below is computed from the rounded r, so the estimator is exact for the stored
teacher (storage rounds it, as it rounds top-k's values). For each tau t of the cache's grid T (cache.taus):
    p_t(i) = exp(r_i / t - a_t),   a_t = log sum_j exp(r_j / t)      (a_t stored in float32)
Proposal: the mixture q = (1/|T|) sum_{t in T} p_t, so that p_t(i) / q(i) <= |T| for every t of the grid (a
proposal at one tau, say p_1, leaves p_2 / p_1 unbounded in the tail: on the mini study's teacher it gave 7x the
mixture's gradient variance at tau = 2 and 1.5x at 0.5, for 0.76x at 1).
Draws: stratified inverse-CDF sampling. The cumulative q over the ids in their order is the CDF, and draw k < n
takes u_k = (k + U_k) / n, U_k uniform, and the id whose CDF interval I_i holds u_k (ordering the ids by their
logit first lowers the variance by ~10% at tau = 0.5 and under 1% at 1 and 2 on the mini study's teacher: not
worth a sort of the vocabulary). Then
Pr(id_k = i) = n |I_i & [k/n, (k+1)/n)|, so sum_k Pr(id_k = i) = n |I_i| = n q(i): every id is drawn n q(i) times
on average, and at least floor(n q(i)) - 1 times, the whole strata its interval holds (less variance than i.i.d.
draws: an id of q >= 2/n is never missed).
Estimator of the teacher's distribution at any t in T, from the same draws:
    p~_t = sum_k w_k e_{id_k},   w_k = p_t(id_k) / (n q(id_k))
    E[p~_t(i)] = sum_k Pr(id_k = i) p_t(i) / (n q(i)) = p_t(i):   unbiased.
KD at tau (hldx.losses.sparse_kd with lse): L~ = tau^2 sum_k w_k (log p_tau(id_k) - log s_tau(id_k)), s_tau =
softmax(z / tau) the student's; its gradient dL~/dz = tau ((sum_k w_k) s_tau - p~_tau) has the expectation
tau (s_tau - p_tau) (E[sum_k w_k] = sum_i p_tau(i) = 1) = the gradient of the KD loss on the full distribution,
tau^2 KL(p_tau || s_tau); and E[L~] is that loss, so the logged loss_kd is unbiased too. Top-k instead takes p_tau
on the k largest, renormalised: biased by the tail mass it drops (tests/test_sampled.py measures both). Per
position the cache stores the n ids, their r (values_dtype) and the |T| normalisers a_t; the loss recomputes
log p_t(id_k) = r / t - a_t, q and the weights for its tau (hldx.losses.sampled_target): no dense distribution.
Bytes per token: n (2 + 2) + 4 |T| (+ 8 per row and array of checksums): 60.05 at n = 12, T = {0.5, 1, 2}, L = 512.

The U_k are a hash of (row, position, k) in integer arithmetic (hldx.store.codec's), 48 bits each: a rebuilt shard
is bit-identical and a row's draws depend on its row alone. (The CDF is a float64 sum: another device may round a
draw on a stratum's edge differently, as sr2's float64 norm.) The block's temporaries are float32 but for the CDF.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hldx.store import codec

CHUNK_BYTES = 1 << 30          # the temporaries of a block of positions (~40 bytes per logit)
_SALTS = (0x3C6EF372, 0x1B873593)  # the draws' two 24-bit halves


def uniforms(first_row: int, N: int, L: int, n: int, device: torch.device) -> Tensor:
    """U [N, L, n] float64 in [0, 1) on a 2^-48 grid, a function of (row first_row + i, position l, draw k)."""
    key_NxLx1 = codec.position_keys(first_row, N, L, device)[..., None]
    k = torch.arange(n, device=device)
    hi, lo = (codec.mix(key_NxLx1 ^ codec.mix(k + salt)) >> 8 for salt in _SALTS)
    return (hi.double() * 2.0**24 + lo.double()) * 2.0**-48


def draw(logits_NxLxV: Tensor, first_row: int, n: int, taus: tuple[float, ...], dtype: torch.dtype
         ) -> tuple[Tensor, Tensor, Tensor]:
    """Rows [first_row, first_row + N) of the teacher's logits as n draws per position: ids [N, L, n] int64 (in
    stratum order: increasing), their logits relative to the max [N, L, n] in `dtype`, and the log-normalisers a_t
    at each of `taus` [N, L, T] float32. On the logits' device, in blocks of positions."""
    N, L, V = logits_NxLxV.shape
    z_PxV = logits_NxLxV.reshape(N * L, V)
    u_Pxn = ((torch.arange(n, device=z_PxV.device) + uniforms(first_row, N, L, n, z_PxV.device)) / n).view(N * L, n)
    ids_Pxn = torch.empty((N * L, n), dtype=torch.int64, device=z_PxV.device)
    val_Pxn = torch.empty((N * L, n), dtype=dtype, device=z_PxV.device)
    lse_PxT = torch.empty((N * L, len(taus)), dtype=torch.float32, device=z_PxV.device)
    block = max(1, CHUNK_BYTES // (V * 40))
    for s in range(0, N * L, block):
        at = slice(s, s + block)
        z = z_PxV[at].float()
        r = (z - z.amax(-1, keepdim=True)).to(dtype).float()  # the stored teacher
        lse_PxT[at] = torch.stack([torch.logsumexp(r / t, -1) for t in taus], -1)
        q = sum(torch.exp(r / t - lse_PxT[at, i, None]) for i, t in enumerate(taus)) / len(taus)
        cdf = q.double().cumsum_(-1)
        cdf /= cdf[:, -1:].clone()
        ids_Pxn[at] = torch.searchsorted(cdf, u_Pxn[at].contiguous(), right=True).clamp_(max=V - 1)
        val_Pxn[at] = r.gather(-1, ids_Pxn[at]).to(dtype)
    return ids_Pxn.view(N, L, n), val_Pxn.view(N, L, n), lse_PxT.view(N, L, len(taus))
