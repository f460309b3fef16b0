"""Reference Cayley transforms, OFT linear and PSOFT linear (``docs/orthogonal.md``): the test oracles.

Written as plainly as the maths, differentiable by autograd, fp64-capable; nothing here is shared with
the fallbacks or kernels.

* ``skew_ref(v, b)``: ``Q (G, b, b)`` with ``Q[rows, cols] = v``, ``Q ← Q − Qᵀ``, ``(rows, cols) =
  torch.triu_indices(b, b, 1)`` (PEFT's packing).
* ``cayley_ref``: exact ``minus`` ``(I − Q)(I + Q)⁻¹`` or ``plus`` ``(I + Q)(I − Q)⁻¹`` via
  ``torch.linalg.solve``; or PEFT's Cayley-Neumann series with ``T`` terms (term for term, including
  its ``T = 3`` and ``T = 4`` giving the same ``I + 2Q + 2Q² + Q³``), with PSOFT's optional Frobenius
  rescale ``Q ← Q · ε / (‖Q‖_F + 1e-12)`` when ``‖Q‖_F > ε`` (per block).
* ``oft_linear_ref``: ``y = (x rotated block-wise by R_g) Wᵀ + bias``.
* ``psoft_linear_ref``: ``y = x Wᵀ + bias + s · (u R'ᵀ − u) Bᵀ``, ``u = x Aᵀ``,
  ``R' = diag(vector_b) R diag(vector_a)``.
"""
from __future__ import annotations

from typing import Optional

import torch


def skew_ref(v: torch.Tensor, b: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(b, b, 1, device=v.device)
    Q = torch.zeros(v.shape[0], b, b, dtype=v.dtype, device=v.device)
    Q[:, rows, cols] = v
    return Q - Q.transpose(-2, -1)


def neumann_series_ref(Q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's loop, literally: ``I (+2Q (+2Q² (+2Q^p for p = 3..T−2) + Q^max(3, T−1)))``."""
    b = Q.shape[-1]
    R = torch.eye(b, dtype=Q.dtype, device=Q.device) + 0.0 * Q  # T = 1: R = I (zero gradient, still a graph)
    if terms > 1:
        R = R + 2.0 * Q
        if terms > 2:
            P = Q @ Q
            R = R + 2.0 * P
            for _ in range(3, terms - 1):
                P = P @ Q
                R = R + 2.0 * P
            P = P @ Q
            R = R + P
    return R


def cayley_ref(v: torch.Tensor, block_size: int, *, method: str = "exact", convention: str = "minus",
               terms: int = 5, eps: Optional[float] = None) -> torch.Tensor:
    """``R (G, b, b)`` from ``v (G, b(b−1)/2)``; computed in ``v.dtype`` (use fp64 for an oracle)."""
    Q = skew_ref(v, block_size)
    eye = torch.eye(block_size, dtype=Q.dtype, device=Q.device).expand_as(Q)
    if method == "exact":
        if convention == "minus":
            return torch.linalg.solve(eye + Q, eye - Q, left=False)
        return torch.linalg.solve(eye - Q, eye + Q, left=False)
    if eps is not None:
        norm = torch.linalg.matrix_norm(Q, ord="fro")[:, None, None]
        Q = torch.where(norm > eps, Q * (eps / (norm + 1e-12)), Q)
    return neumann_series_ref(Q, terms)


def oft_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], oft_v: torch.Tensor,
                   block_size: int, *, method: str = "neumann", convention: str = "minus",
                   terms: int = 5) -> torch.Tensor:
    K = weight.shape[1]
    G = K // block_size
    R = cayley_ref(oft_v, block_size, method=method, convention=convention, terms=terms)
    if R.shape[0] == 1:
        R = R.expand(G, block_size, block_size)
    xr = torch.einsum("...gk,gkc->...gc", x.reshape(*x.shape[:-1], G, block_size), R).reshape(x.shape)
    y = xr @ weight.t()
    return y if bias is None else y + bias


def psoft_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], psoft_a: torch.Tensor,
                     psoft_b: torch.Tensor, psoft_v: torch.Tensor, vector_a: Optional[torch.Tensor],
                     vector_b: Optional[torch.Tensor], scale: float, *, method: str = "exact", terms: int = 5,
                     eps: Optional[float] = None) -> torch.Tensor:
    r = psoft_a.shape[0]
    R = cayley_ref(psoft_v.reshape(1, -1), r, method=method, convention="plus", terms=terms, eps=eps)[0]
    if vector_b is not None:
        R = vector_b[:, None] * R
    if vector_a is not None:
        R = R * vector_a[None, :]
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    u = x @ psoft_a.t()
    return y + scale * ((u @ R.t() - u) @ psoft_b.t())
