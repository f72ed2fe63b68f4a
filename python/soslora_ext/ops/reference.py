"""Pure-PyTorch oracle for SOS-LoRA and CPS-LoRA, written for clarity rather than speed.

Every fast path in this package is tested against these functions. They use the per-expert
form of the method (lists of factors, loops over experts) where the fast path works on the
concatenated factors, and they accumulate in whatever dtype they are given (tests pass float64).

    y = base(x) + sum_k  s_k * (B_k @ A_k @ drop(x))       A_k: [r, in], B_k: [out, r]

CPS-LoRA places each cluster's term on its own rows R_c and columns C_c of a dense update:

    dW[R_c, C_c] = s_c * B_c A_c,   y = base(x) + drop(x) dW^T
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ORTHO_NORM_EPS = 1e-6  # F.normalize eps used by the reference SOS-LoRA code


# ---------------------------------------------------------------------------------------------
# Dropout: Philox4x32-10, the same counter-based generator as csrc/philox.h
# ---------------------------------------------------------------------------------------------
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of a * b for a 32-bit constant a and int64 tensor b < 2**32."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48: exact in int64
    mid = ((p_hi & 0xFFFF) << 16) + p_lo
    return (p_hi >> 16) + (mid >> 32), mid & _U32


def philox_words(seed: int, offset: int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor,
                                                                   Tensor]:
    """The four 32-bit output words of Philox4x32-10 at counter (counter, offset), key seed."""
    counter = counter.to(torch.int64)
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2 = torch.full_like(counter, offset & _U32)
    c3 = torch.full_like(counter, (offset >> 32) & _U32)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for round_ in range(10):
        if round_ > 0:
            k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
        hi0, lo0 = _mulhilo32(_M0, c0)
        hi1, lo1 = _mulhilo32(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_words(seed: int, offset: int, index: Tensor) -> Tensor:
    """Element `index`'s 32-bit draw: word index % 4 of the Philox block at counter
    index // 4 (one block decides four consecutive elements)."""
    index = index.to(torch.int64)
    words = torch.stack(philox_words(seed, offset, index >> 2), dim=-1)
    return words.gather(-1, (index & 3).unsqueeze(-1)).squeeze(-1)


def dropout_keep_mask(seed: Tensor, shape: Sequence[int], p: float) -> Tensor:
    """Boolean keep-mask: element i (row-major) is kept iff dropout_words(i) >= floor(p * 2**32)."""
    seed_value, offset = (int(v) for v in seed.tolist())
    index = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    return dropout_words(seed_value, offset, index) >= int(p * 2**32)


def dropout(t: Tensor, seed: Tensor | None, p: float) -> Tensor:
    """Inverted dropout with the mask above (identity when p == 0)."""
    if p == 0:
        return t
    keep = dropout_keep_mask(seed, t.shape, p).to(t.device)
    return t * keep.to(t.dtype) / (1 - p)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
def gate(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """Mean-1 global gate K * softmax(logits / T)."""
    return logits.numel() * torch.softmax(logits / temperature, dim=0)


def orthogonal_init(num_experts: int, r_expert: int, in_features: int, gain: float,
                    dtype: torch.dtype = torch.float32, device=None) -> list[Tensor]:
    """Input-side factors A_k, orthonormal across all experts when K*r <= in, else per expert.

    One QR of a Gaussian [in, K*r] matrix; the rows of Q^T are dealt out to the experts and
    multiplied by `gain`, so that A A^T = gain^2 I over the stacked A.
    """
    def orthonormal_rows(rows: int) -> Tensor:
        q = torch.empty(rows, in_features, dtype=torch.float32)
        torch.nn.init.orthogonal_(q)  # QR of a Gaussian, signs fixed by R's diagonal
        return q

    r_total = num_experts * r_expert
    if r_total <= in_features:
        stacked = orthonormal_rows(r_total)
        experts = list(stacked.split(r_expert, dim=0))
    else:
        experts = [orthonormal_rows(r_expert) for _ in range(num_experts)]
    return [(gain * a).to(dtype=dtype, device=device) for a in experts]


def sos_forward(x: Tensor, weight: Tensor, bias: Tensor | None, A: Sequence[Tensor],
                B: Sequence[Tensor], scales: Sequence[Tensor | float], dropout_p: float = 0.0,
                dropout_position: str = "post", dropout_seed: Tensor | None = None) -> Tensor:
    """y = x W^T + b + sum_k s_k * (B_k A_k drop(x)); s_k a scalar or an [out] vector.

    Dropout masks index the concatenated hidden [N, K*r] ("post") or the flattened input
    [N, in] ("pre"), as the fast path does, so both draw the same mask from one seed.
    """
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight, bias)
    if dropout_position == "pre":
        x_in = dropout(x2, dropout_seed, dropout_p)
        hidden = [x_in @ a.T for a in A]
    else:
        h = dropout(torch.cat([x2 @ a.T for a in A], dim=1), dropout_seed, dropout_p)
        hidden = list(h.split([a.shape[0] for a in A], dim=1))
    for h_k, b_k, s_k in zip(hidden, B, scales):
        y = y + s_k * (h_k @ b_k.T)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def ortho_penalty(A: Sequence[Tensor]) -> Tensor:
    """Mean squared cosine between input-side directions of different experts:

    sum over ordered expert pairs k != l of |normalize(A_k) normalize(A_l)^T|_F^2 / (K (K-1) r^2).
    """
    K = len(A)
    if K < 2:
        return torch.zeros((), dtype=A[0].dtype)
    r = A[0].shape[0]
    unit = [F.normalize(a, dim=1, eps=ORTHO_NORM_EPS) for a in A]
    total = sum((unit[k] @ unit[l].T).pow(2).sum() for k in range(K) for l in range(K) if k != l)
    return total / (K * (K - 1) * r * r)


def delta_weight(A: Sequence[Tensor], B: Sequence[Tensor],
                 scales: Sequence[Tensor | float]) -> Tensor:
    """sum_k (s_k * B_k) A_k, with s_k a scalar or an [out] vector scaling B_k's rows."""
    def scaled(b, s):
        return b * (s.reshape(-1, 1) if isinstance(s, Tensor) else s)
    return sum(scaled(b, s) @ a for a, b, s in zip(A, B, scales))


def merge(weight: Tensor, A: Sequence[Tensor], B: Sequence[Tensor],
          scales: Sequence[Tensor | float]) -> Tensor:
    """The merged weight W + delta_weight, computed in float64 and rounded once to W's dtype."""
    delta = delta_weight([a.double() for a in A], [b.double() for b in B],
                         [s.double() if isinstance(s, Tensor) else s for s in scales])
    return (weight.double() + delta).to(weight.dtype)


def cps_delta_weight(out_features: int, in_features: int, rows: Sequence[Tensor],
                     cols: Sequence[Tensor], A: Sequence[Tensor], B: Sequence[Tensor],
                     scales: Sequence[float]) -> Tensor:
    """Dense update with dW[rows[c]][:, cols[c]] = s_c * B_c A_c (A_c [r_c, |C_c|],
    B_c [|R_c|, r_c]); the clusters' row sets and column sets are disjoint."""
    delta = torch.zeros(out_features, in_features, dtype=A[0].dtype)
    for r_c, c_c, a, b, s in zip(rows, cols, A, B, scales):
        delta[r_c[:, None], c_c[None, :]] += s * (b @ a)
    return delta


def cps_forward(x: Tensor, weight: Tensor, bias: Tensor | None, delta: Tensor,
                dropout_p: float = 0.0, dropout_seed: Tensor | None = None) -> Tensor:
    """y = x W^T + b + drop(x) dW^T, the mask indexing the flattened input [N, in]."""
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight, bias) + dropout(x2, dropout_seed, dropout_p) @ delta.T
    return y.reshape(*x.shape[:-1], weight.shape[0])
