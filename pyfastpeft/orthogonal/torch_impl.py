"""``torch`` backend of the orthogonal family: batched Cayley and OFT linear.

The contract every backend of ``cayley_fwd/bwd`` and ``oft_linear_fwd/bwd`` implements
(``docs/orthogonal.md``). PSOFT linear has no backend of its own: it runs on the LoRA primitives
(``pyfastpeft.orthogonal.psoft_linear``), whose ``torch`` backend is ``pyfastpeft.lora.torch_impl``.

Cayley. ``v (G, n)``, ``n = b(b−1)/2``, packed strict upper triangle (row-major
``torch.triu_indices(b, b, 1)``), ``Q = S(v) − S(v)ᵀ``. Everything runs in the *work dtype*: fp32, or
fp64 for fp64 ``v`` (never half: PEFT #3087 came from half-precision solves).

* exact: with ``N = I + Q`` (``minus``) or ``N = I − Q`` (``plus``), ``R = (2I − N) N⁻¹ = 2 N⁻¹ − I``:
  one inverse per block. Backward from ``R`` alone (no second solve): ``dR = 2 d(N⁻¹) = −2 N⁻¹ dN N⁻¹``
  and ``N⁻¹ = (R + I)/2`` give ``dQ = ∓ ½ (Rᵀ + I) G (Rᵀ + I)`` (``−`` for minus, ``+`` for plus).
* neumann: ``R = Σ_k c_k Q^k`` with PEFT's coefficients (:func:`neumann_coeffs`). Backward by reverse
  mode through the chain of powers (``2(d − 1)`` products); the powers are recomputed from ``v``
  (``d − 2`` products of ``b × b`` blocks), not saved.
  Optional rescale (PSOFT's ``cayley_neumann_eps``): per block, if ``‖Q‖_F > ε``,
  ``Q ← c Q`` with ``c = ε / (‖Q‖_F + 1e-12)``; backward ``dQ = c dQ_s − ε ⟨dQ_s, Q⟩ Q / (‖Q‖_F (‖Q‖_F + 1e-12)²)``.
* ``dv = (dQ − dQᵀ)[rows, cols]``.

OFT linear on 2-D ``x (M, K)``, ``R (G or 1, b, b)`` in the work dtype:
``y = rot(x) Wᵀ + bias`` with ``rot(x)[:, g] = x[:, g] R_g``, i.e. ``y = x W'ᵀ + bias`` with the rotated
weight ``W'[:, g] = W[:, g] R_gᵀ`` (``docs/orthogonal.md`` §3). Which side is rotated follows the shape
(:func:`oft_weight_side`): the weight when ``M > N`` (``N·K·b`` FLOPs, token-count free), the input otherwise
(``M·K·b``). Rotations run in R's dtype and their result is rounded once to the compute dtype (``W'`` on
the weight side, where PEFT rounds the rotated input). Saved: ``x`` and ``R``; ``W'`` is rebuilt in the
backward (one more pass over ``W`` instead of keeping ``N·K`` values per layer).
Backward, weight side: ``dx = dy W'`` (the frozen layer's dgrad), ``E_g = x_gᵀ dx_g`` (the diagonal
``b × b`` blocks of ``xᵀ dx``) and ``dR_g = E_g R_g⁻ᵀ`` (``R_g`` itself for the exact, orthogonal transform;
a batched inverse for the Neumann series). Input side, or no ``dx`` wanted: ``d = dy W``,
``dR_g = x_gᵀ d_g``, ``dx_g = d_g R_gᵀ``. ``dR`` is summed over g when one block is shared.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.orthogonal.blocks import inv_transpose, oft_weight_side  # noqa: F401  (shared with Triton)




def neumann_coeffs(terms: int) -> list[float]:
    """Coefficients ``c_0..c_d`` of PEFT's Cayley-Neumann loop with ``terms`` terms.

    ``1: [1]``; ``2: [1, 2]``; ``3 and 4: [1, 2, 2, 1]`` (PEFT's loop gives the same series for both);
    ``T ≥ 5: [1, 2, …, 2, 1]`` with the last power ``T − 1``.
    """
    if terms <= 1:
        return [1.0]
    if terms == 2:
        return [1.0, 2.0]
    last = max(3, terms - 1)
    return [1.0] + [2.0] * (last - 1) + [1.0]


_TRIU_CACHE: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
_GATHER_CACHE: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}


def triu(b: int, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (b, str(device))
    if key not in _TRIU_CACHE:
        _TRIU_CACHE[key] = tuple(torch.triu_indices(b, b, 1, device=device))
    return _TRIU_CACHE[key]


def _gather_maps(b: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(to_dense (b²,), to_packed (n,))``: ``Q.flat = [0, v, −v][to_dense]`` and ``v = Q.flat[to_packed]``.

    A gather (``index_select``) instead of an advanced-index scatter: on CPU the scatter (``index_put``) was
    ~2.5 ms of a 13 ms Neumann step at G=128, b=32 (one thread), the gather is a fraction of that."""
    key = (b, str(device))
    if key not in _GATHER_CACHE:
        rows, cols = torch.triu_indices(b, b, 1)
        n = rows.numel()
        dense = torch.zeros(b, b, dtype=torch.long)
        dense[rows, cols] = torch.arange(1, n + 1)
        dense[cols, rows] = torch.arange(n + 1, 2 * n + 1)
        _GATHER_CACHE[key] = (dense.reshape(-1).to(device), (rows * b + cols).to(device))
    return _GATHER_CACHE[key]


def skew(v: Tensor, b: int) -> Tensor:
    """``Q (G, b, b)`` from ``v (G, n)`` (in v's dtype)."""
    to_dense, _ = _gather_maps(b, v.device)
    ext = torch.cat([v.new_zeros(v.shape[0], 1), v, -v], dim=1)  # [0, v, −v]
    return ext.index_select(1, to_dense).reshape(v.shape[0], b, b)


def unskew_grad(dQ: Tensor, b: int) -> Tensor:
    """``dv = (dQ − dQᵀ)[rows, cols]``: the gradient of a function of ``Q = S(v) − S(v)ᵀ`` w.r.t. ``v``."""
    _, to_packed = _gather_maps(b, dQ.device)
    return (dQ - dQ.transpose(1, 2)).reshape(dQ.shape[0], b * b).index_select(1, to_packed)


def _rescale(Q: Tensor, eps: Optional[float]) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """PSOFT's Frobenius rescale per block; returns (Q_s, norm, factor) with factor 1 where not rescaled."""
    if eps is None:
        return Q, None, None
    norm = torch.linalg.matrix_norm(Q, ord="fro")  # (G,)
    hit = torch.isfinite(norm) & (norm > eps)
    c = torch.where(hit, eps / (norm + 1e-12), torch.ones_like(norm))
    return Q * c[:, None, None], norm, torch.where(hit, c, torch.zeros_like(c))


def _neumann(Q: Tensor, terms: int) -> Tensor:
    coeffs = neumann_coeffs(terms)
    b = Q.shape[-1]
    R = torch.eye(b, dtype=Q.dtype, device=Q.device).expand_as(Q).clone()
    P = Q
    for k in range(1, len(coeffs)):
        if k > 1:
            P = torch.bmm(P, Q)
        R.add_(P, alpha=coeffs[k])
    return R


def cayley_fwd(v: Tensor, block_size: int, method: str, convention: str, terms: int,
               eps: Optional[float]) -> Tensor:
    """``R (G, b, b)`` in the work dtype from ``v (G, n)``."""
    b, wd = block_size, acc_dtype(v.dtype)
    Q = skew(v.to(wd), b)
    G = Q.shape[0]
    if method == "exact":
        eye = torch.eye(b, dtype=wd, device=v.device).expand(G, b, b)
        N = eye + Q if convention == "minus" else eye - Q
        # R = 2 N⁻¹ − I (since I ∓ Q = 2I − N): one LU-based inverse per block. N's symmetric part is I,
        # so N is well conditioned (cond ≤ 1 + ‖Q‖₂) and every pivot is >= 1.
        R = torch.linalg.inv(N).mul_(2.0).sub_(eye).contiguous()  # LAPACK's inverse is column-major
    else:
        Qs, _, _ = _rescale(Q, eps)
        R = _neumann(Qs, terms)
    return R


def cayley_bwd(dR: Tensor, v: Tensor, R: Tensor, block_size: int, method: str, convention: str, terms: int,
               eps: Optional[float]) -> Tensor:
    """``dv (G, n)`` in the work dtype from ``dR (G, b, b)``."""
    b, wd = block_size, acc_dtype(v.dtype)
    G = dR.to(wd)
    if method == "exact":
        Rt = R.to(wd).transpose(1, 2)
        P = Rt + torch.eye(b, dtype=wd, device=R.device)
        dQ = torch.bmm(torch.bmm(P, G), P).mul_(-0.5 if convention == "minus" else 0.5)
    else:
        Q = skew(v.to(wd), b)
        Qs, norm, c = _rescale(Q, eps)
        coeffs = neumann_coeffs(terms)
        d = len(coeffs) - 1
        # reverse mode through the forward chain P_1 = Q, P_k = P_{k-1} Q, R = I + Σ c_k P_k (the powers are
        # recomputed: d − 2 products): gP_d = c_d G; gP_{k-1} = c_{k-1} G + gP_k Qᵀ and dQ += P_{k-1}ᵀ gP_k
        # for k = d..2; dQ += gP_1. 2(d − 1) products, as autograd through PEFT's loop.
        P = [None, Qs]
        for _ in range(2, d):
            P.append(torch.bmm(P[-1], Qs))
        QsT = Qs.transpose(1, 2)
        # T = 1 (R = I): the gradient is 0·dR, not a fresh zero, so a NaN in dR propagates as in the
        # reference and the Triton kernel (docs/orthogonal.md §8)
        dQ = torch.zeros_like(Qs) if d else G * 0.0
        gP = G * coeffs[d] if d else None
        for k in range(d, 1, -1):
            dQ.baddbmm_(P[k - 1].transpose(1, 2), gP)
            gP = torch.baddbmm(G, gP, QsT, beta=coeffs[k - 1])
        if d:
            dQ += gP
        if eps is not None:
            # through Q_s = c(Q) Q, c = eps / (‖Q‖ + 1e-12), where rescaled (c > 0), identity elsewhere
            inner = (dQ * Q).sum(dim=(1, 2))
            hit = c > 0
            safe = torch.where(hit, norm, torch.ones_like(norm))
            corr = torch.where(hit, -eps * inner / (safe * (safe + 1e-12) ** 2), torch.zeros_like(norm))
            dQ = torch.where(hit[:, None, None], dQ * c[:, None, None], dQ) + corr[:, None, None] * Q
    return unskew_grad(dQ, b)


# --------------------------------------------------------------------------------------------- OFT
def _rotate(t: Tensor, R: Tensor, transpose: bool) -> Tensor:
    """``t (M, K)`` block-wise times ``R_g`` (or ``R_gᵀ``), in R's dtype; ``R (G or 1, b, b)``."""
    M, K = t.shape
    b = R.shape[-1]
    G = K // b
    tg = t.to(R.dtype).reshape(M, G, b).transpose(0, 1)  # (G, M, b)
    Rg = R.expand(G, b, b)
    out = torch.bmm(tg, Rg.transpose(1, 2) if transpose else Rg)  # (G, M, b)
    return out.transpose(0, 1).reshape(M, K)


def rotated_weight(weight: Tensor, R: Tensor) -> Tensor:
    """``W' = W R_bdᵀ`` (``W'[:, g] = W[:, g] R_gᵀ``), rotated in R's dtype, rounded once to W's dtype."""
    return _rotate(weight, R, transpose=True).to(weight.dtype)


def diag_blocks(a: Tensor, c: Tensor, G: int, dtype: torch.dtype) -> Tensor:
    """``(G, b, b)``: the diagonal ``b × b`` blocks ``a_gᵀ c_g`` of ``aᵀ c`` in ``dtype``, never the ``K × K``
    product (one batched product on ``(G, b, M)`` views)."""
    M, K = a.shape
    b = K // G
    return torch.bmm(a.to(dtype).reshape(M, G, b).permute(1, 2, 0), c.to(dtype).reshape(M, G, b).transpose(0, 1))


def oft_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], R: Tensor) -> Tensor:
    """``y (M, N)`` in x's dtype."""
    if oft_weight_side(x.shape[0], weight.shape[0]):
        return _linear(x, rotated_weight(weight, R), bias)
    return _linear(_rotate(x, R, transpose=False).to(x.dtype), weight, bias)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def oft_bwd(dy: Tensor, x: Tensor, weight: Tensor, R: Tensor, need_dx: bool,
            orthogonal: bool) -> tuple[Tensor, Tensor]:
    """``(dx (M, K) or (0,), dR (like R))``; dR in R's dtype (work dtype). ``orthogonal``: ``R_g⁻¹ = R_gᵀ``."""
    M, K = x.shape
    G = K // R.shape[-1]
    if need_dx and oft_weight_side(M, weight.shape[0]):
        dx = torch.mm(dy, rotated_weight(weight, R))  # the frozen layer's dgrad with W'
        E = diag_blocks(x, dx, G, R.dtype)
        if R.shape[0] == 1:
            E = E.sum(0, keepdim=True)
        return dx, torch.bmm(E, inv_transpose(R, orthogonal))
    d = torch.mm(dy, weight).to(R.dtype)  # gradient w.r.t. the rotated input
    dR = diag_blocks(x, d, G, R.dtype)
    if R.shape[0] == 1:
        dR = dR.sum(0, keepdim=True)
    dx = _rotate(d, R, transpose=True).to(x.dtype) if need_dx else empty_out((0,), like=dy)
    return dx, dR
