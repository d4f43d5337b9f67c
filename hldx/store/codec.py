"""An unbiased 2-bit code for unit vectors (cache.hidden_dtype=sr2): E[decode(encode(t))] = t exactly.

Every hidden loss is linear in the teacher's unit target t (its gradient w.r.t. the student is), so a stored
t~ with E[t~] = t gives an unbiased gradient, with more variance. The code of t [.., D]:
  1. y = H (s * t): fixed random signs s, then the orthonormal Hadamard transform in blocks of the largest
     power of two dividing D (512 at D = 2560). Orthogonal, so ||y - y~|| = ||t - t~||; it spreads an outlier
     dimension over the block, so no block's scale is set by one component.
  2. Per block of BLOCK components, a scale: the smallest 2^(c/16 - 255/16) >= its largest |y| (c: uint8).
  3. Each y / scale in [-1, 1] is stochastically rounded to one of 4 levels -1, -1/3, 1/3, 1: up with the
     probability of its distance from the level below (in steps), so the mean is y. The uniforms are a hash of
     (the token's row, position, dimension) in integer arithmetic: the same bits on any device, so a rebuilt
     shard is bit-identical and a row's code depends on nothing but its row. (The rest is elementwise, exact
     or, for the norm, summed in float64: a CPU and a GPU give the same bytes but for a float64 norm that
     rounds differently in its last bit.)
D/4 bytes of codes + D/BLOCK bytes of scales per token: 720 at D = 2560.
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32                                               # components per scale
SCALES = torch.exp2((torch.arange(256, dtype=torch.float64) - 255) / 16).float()  # scale code -> scale
_M32 = 0xFFFFFFFF


def mul32(x: Tensor, c: int) -> Tensor:
    """x * c mod 2^32 for int64 x in [0, 2^32), without overflowing int64."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _M32


def mix(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons): a bijection of [0, 2^32) whose every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def position_keys(first_row: int, N: int, L: int, device: torch.device) -> Tensor:
    """[N, L] int64 in [0, 2^32): a hash of each token's place in the training order, row (first_row + n) * L +
    position l: the key every random bit of a row's code is drawn from."""
    g_NxL = (first_row + torch.arange(N, device=device)[:, None]) * L + torch.arange(L, device=device)
    return mix(mix(g_NxL & _M32) ^ (g_NxL >> 32))


def uniforms(first_row: int, shape_NxLxD: tuple[int, int, int], device: torch.device, stream: int = 0) -> Tensor:
    """u [N, L, D] float32 in [0, 1) on a 2^-24 grid, a function of (row first_row + n, position l, dim d) and of
    `stream` (another stream: the dimensions of another block of D, so independent bits; stream 0 as ever)."""
    N, L, D = shape_NxLxD
    key_NxL = position_keys(first_row, N, L, device)
    dim_D = mix((torch.arange(D, device=device) + stream * D + 0x2545F491) & _M32)
    return (mix(key_NxL[..., None] ^ dim_D) >> 8).float() * 2.0**-24


def signs(D: int, device: torch.device) -> Tensor:
    """The fixed random signs [D] float32 applied before the Hadamard transform."""
    return 1 - 2 * (mix(torch.arange(D, device=device) + 0x68E31DA4) & 1).float()


def hadamard(x_NxD: Tensor) -> Tensor:
    """x times the orthonormal (symmetric, self-inverse) Sylvester-Hadamard matrix, in blocks of the largest
    power of two dividing D."""
    D = x_NxD.shape[-1]
    n = D & -D
    y = x_NxD.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(x_NxD.shape) * n**-0.5


def encode(t_NxLxD: Tensor, u_NxLxD: Tensor) -> tuple[Tensor, Tensor]:
    """Codes [N, L, D/4] uint8 (4 per byte, the first in the low bits) and scale codes [N, L, D/BLOCK] uint8 of
    unit vectors t, rounded up where u < the fraction (u uniform: unbiased; u = 0.5: round to nearest)."""
    N, L, D = t_NxLxD.shape
    y_NxLxBxK = hadamard(t_NxLxD.float() * signs(D, t_NxLxD.device)).view(N, L, D // BLOCK, BLOCK)
    table = SCALES.to(t_NxLxD.device)
    c = torch.searchsorted(table, y_NxLxBxK.abs().amax(-1)).clamp(max=255)  # the smallest scale >= the largest
    v = ((y_NxLxBxK / table[c][..., None] + 1) * 1.5).clamp(0, 3)         # in steps of the 4 levels
    low = v.floor().clamp(max=2)
    code = (low + (u_NxLxD.view_as(v) < v - low)).to(torch.uint8).view(N, L, D // 4, 4)
    packed = code[..., 0] | code[..., 1] << 2 | code[..., 2] << 4 | code[..., 3] << 6
    return packed.contiguous(), c.to(torch.uint8).contiguous()


def decode(codes: Tensor, scales: Tensor) -> Tensor:
    """The decoded vectors [.., D] float32 (on the codes' device): unbiased, not unit; never renormalise."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=codes.device)
    level = ((codes[..., None] >> shifts) & 3).float() * (2 / 3) - 1          # [.., D/4, 4]
    scale = SCALES.to(codes.device)[scales.long()]                              # [.., D/BLOCK]
    y = (level.reshape(*scales.shape, -1) * scale[..., None]).flatten(-2)
    return hadamard(y) * signs(y.shape[-1], y.device)
