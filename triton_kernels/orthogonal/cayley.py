"""Batched Cayley transforms in one launch: one ``b × b`` block per program, held in registers.

Input ``v (G, n)``, ``n = b(b−1)/2``, the strict upper triangle of each skew-symmetric ``Q`` in the
row-major order of ``torch.triu_indices(b, b, 1)``: element ``(i, j)``, ``i < j``, sits at
``i·b − i(i+1)/2 + (j − i − 1)``. Each program gathers its block straight from ``v`` (``Q[i, j] = ±v[…]``;
no dense ``Q`` in memory), pads it to ``BLOCK = max(16, next_pow2(b))`` with the identity, and writes
``R (G, b, b)`` in fp32. All arithmetic is fp32 whatever ``v``'s dtype (PEFT #3087: half-precision solves).

* exact (``_cayley_exact_fwd_kernel``): ``N = I + σQ`` (σ = +1 for ``minus``, −1 for ``plus``) is inverted
  by Gauss-Jordan *without pivoting*, then ``R = 2N⁻¹ − I``. No pivoting is needed: ``N``'s symmetric part
  is ``I``, and so is (at least) every Schur complement's, so each pivot is >= 1 and ``cond(N) <= 1 + ‖Q‖₂``.
  ``b`` steps of a rank-1 update on the register tile (``2b³`` FLOPs).
* Neumann (``_cayley_neumann_fwd_kernel``): PEFT's series ``I + 2Q + … + 2Q^(d−1) + c_d Q^d`` by repeated
  ``tl.dot`` in IEEE fp32 (TF32 would cost ~1e-3 relative error), with PSOFT's optional Frobenius rescale.
* backward: exact ``dQ = −σ ½ (Rᵀ + I) dR (Rᵀ + I)`` from the saved ``R`` (no second solve); Neumann by a
  reverse Horner recursion ``S ← 2I + QᵀS``, ``W ← dR S + QᵀW`` (three products per degree), then the eps
  chain; ``dv = (dQ − dQᵀ)[i < j]`` scattered back to the packed layout.

Limits: ``2 <= b <= 64`` for the exact transform, ``b <= 32`` for Neumann (its chained IEEE-fp32 ``tl.dot``
spill at BLOCK=64 on sm_80/sm_90a, per the compile report; 128 would spill everywhere). Larger blocks
(PSOFT's ``r`` up to 256+) go to the ``torch`` backend (batched LU) or the CUDA kernel (``b <= 128``, shared
memory): the registry's ``supports`` says so. fp64 ``v`` also goes to ``torch``.
Under the interpreter everything is fp32 already (no bf16 ``tl.dot``), so no upcast switch is needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.triton_kernels.orthogonal._cayley_cost import (  # noqa: F401  (cost formulas re-exported for tests)
    cayley_bwd_cost, cayley_fwd_cost, neumann_degree)
from pyfastpeft.core.triton_config import AOTSpec

MAX_B = 64  # exact transform
MAX_B_NEUMANN = 32  # the chained-dot Neumann kernels spill at BLOCK=64 (compile report); larger b -> torch


@triton.jit
def _load_skew(v_ptr, g, b, stride_vg, BLOCK: tl.constexpr):
    """The ``BLOCK × BLOCK`` fp32 skew block ``Q`` of program ``g`` (zero outside ``b × b``)."""
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    lo = tl.minimum(i, j)
    hi = tl.maximum(i, j)
    idx = lo * b - (lo * (lo + 1)) // 2 + (hi - lo - 1)
    m = (i < b) & (j < b) & (i != j)
    val = tl.load(v_ptr + g * stride_vg + idx, mask=m, other=0.0).to(tl.float32)
    return tl.where(i < j, val, -val)


@triton.jit
def _store_packed(dv_ptr, g, b, n, T, BLOCK: tl.constexpr):
    """``dv[g, idx(i, j)] = T[i, j]`` for ``i < j < b``."""
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    idx = i * b - (i * (i + 1)) // 2 + (j - i - 1)
    tl.store(dv_ptr + g * n + idx, T, mask=(i < j) & (j < b))


@triton.jit
def _cayley_exact_fwd_kernel(v_ptr, r_ptr, b, stride_vg, sigma, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    ar = tl.arange(0, BLOCK)
    eye = tl.where(i == j, 1.0, 0.0)
    A = eye + sigma * _load_skew(v_ptr, g, b, stride_vg, BLOCK)
    # in-place Gauss-Jordan inversion; padded rows/columns are identity and stay so (their entries in
    # pivot rows/columns are zero)
    for k in range(0, b):
        rowk = tl.sum(tl.where(i == k, A, 0.0), axis=0)  # A[k, :]
        colk = tl.sum(tl.where(j == k, A, 0.0), axis=1)  # A[:, k]
        p = tl.sum(tl.where(ar == k, rowk, 0.0), axis=0)  # pivot A[k, k] >= 1
        rowk = tl.where(ar == k, 1.0, rowk) / p
        A = tl.where(i == k, rowk[None, :], tl.where(j == k, 0.0, A) - colk[:, None] * rowk[None, :])
    R = 2.0 * A - eye
    tl.store(r_ptr + g * b * b + i * b + j, R, mask=(i < b) & (j < b))


@triton.jit
def _rescaled_skew(v_ptr, g, b, stride_vg, eps, HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    """``(Q_s, Q, norm, c)``: ``Q_s = c·Q`` with PSOFT's rescale (``c = 1``, ``norm`` unused without eps)."""
    Q = _load_skew(v_ptr, g, b, stride_vg, BLOCK)
    if HAS_EPS:
        nrm = tl.sqrt(tl.sum(tl.sum(Q * Q, axis=1), axis=0))
        c = tl.where(nrm > eps, eps / (nrm + 1e-12), 1.0)
    else:
        nrm = 0.0
        c = 1.0
    return Q * c, Q, nrm, c


@triton.jit
def _cayley_neumann_fwd_kernel(v_ptr, r_ptr, b, stride_vg, eps, C_LAST: tl.constexpr, DEG: tl.constexpr,
                               HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    Q, Q0, nrm, c = _rescaled_skew(v_ptr, g, b, stride_vg, eps, HAS_EPS, BLOCK)
    R = tl.where(i == j, 1.0, 0.0)
    P = Q
    for k in tl.static_range(1, DEG + 1):
        if k > 1:
            P = tl.dot(P, Q, input_precision="ieee")
        if k == DEG:
            R += C_LAST * P
        else:
            R += 2.0 * P
    tl.store(r_ptr + g * b * b + i * b + j, R, mask=(i < b) & (j < b))


@triton.jit
def _cayley_exact_bwd_kernel(dr_ptr, r_ptr, dv_ptr, b, n, half_sign, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    inb = (i < b) & (j < b)
    eye = tl.where(i == j, 1.0, 0.0)
    G = tl.load(dr_ptr + g * b * b + i * b + j, mask=inb, other=0.0)
    # Rᵀ + I is loaded twice (the second read hits L1/L2) rather than kept live across both products: at
    # BLOCK=64 one fewer 64×64 fp32 tile is what keeps the kernel spill-free
    T = tl.dot(tl.load(r_ptr + g * b * b + j * b + i, mask=inb, other=0.0) + eye, G, input_precision="ieee")
    dQ = tl.dot(T, tl.load(r_ptr + g * b * b + j * b + i, mask=inb, other=0.0) + eye,
                input_precision="ieee") * half_sign
    # dv[idx(i, j)] = dQ[i, j] − dQ[j, i]: store the upper triangle, then add the lower one at the
    # transposed *index* (no register transpose of a 64×64 tile, which is what spilled at BLOCK=64)
    _store_packed(dv_ptr, g, b, n, dQ, BLOCK)
    tl.debug_barrier()
    idx_t = j * b - (j * (j + 1)) // 2 + (i - j - 1)
    tl.atomic_add(dv_ptr + g * n + idx_t, -dQ, mask=(i > j) & (i < b), sem="relaxed")


@triton.jit
def _cayley_neumann_bwd_kernel(dr_ptr, v_ptr, dv_ptr, b, n, stride_vg, eps, C_LAST: tl.constexpr,
                               DEG: tl.constexpr, HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    eye = tl.where(i == j, 1.0, 0.0)
    Q, Q0, nrm, c = _rescaled_skew(v_ptr, g, b, stride_vg, eps, HAS_EPS, BLOCK)
    G = tl.load(dr_ptr + g * b * b + i * b + j, mask=(i < b) & (j < b), other=0.0)
    QT = -Q  # skew: Qᵀ = −Q
    # dQ = Σ_j (Qᵀ)ʲ G S_j, S_j = Σ_{k>j} c_k (Qᵀ)^(k−1−j): from j = d−1 down, S_{d−1} = c_d I,
    # S_j = 2I + Qᵀ S_{j+1}, W_j = G S_j + Qᵀ W_{j+1}; dQ = W_0
    S = C_LAST * eye
    W = C_LAST * G
    for _ in tl.static_range(0, DEG - 1):
        S = 2.0 * eye + tl.dot(QT, S, input_precision="ieee")
        W = tl.dot(G, S, input_precision="ieee") + tl.dot(QT, W, input_precision="ieee")
    if DEG == 0:
        W = 0.0 * G
    if HAS_EPS:
        # through Q_s = c(Q) Q with c = eps / (‖Q‖ + 1e-12) where ‖Q‖ > eps
        inner = tl.sum(tl.sum(W * Q0, axis=1), axis=0)
        hit = nrm > eps
        safe = tl.where(hit, nrm, 1.0)
        corr = tl.where(hit, -eps * inner / (safe * (safe + 1e-12) * (safe + 1e-12)), 0.0)
        W = W * c + corr * Q0
    _store_packed(dv_ptr, g, b, n, W - tl.trans(W), BLOCK)


# --------------------------------------------------------------------------------------------- launchers
def _block(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def _warps(b: int, dots: bool = False) -> int:
    """Warps per program: the Gauss-Jordan kernel holds one tile (4 warps to b=32, 8 at 64); the kernels
    that chain ``tl.dot`` hold 4-6 tiles plus the dot's staging and spill below 8 warps at BLOCK=32 and
    below 16 at BLOCK=64 (compile report, sm_80/sm_90a)."""
    blk = _block(b)
    if not dots:
        return 8 if blk > 32 else 4
    return {16: 4, 32: 8, 64: 16}[blk]


def _c_last(terms: int) -> float:
    return 2.0 if terms == 2 else 1.0  # PEFT: T = 2 is I + 2Q; T >= 3 ends in + Q^d


def cayley_fwd(v, block_size: int, method: str, convention: str, terms: int, eps):
    """``R (G, b, b)`` fp32 from ``v (G, n)`` (any float dtype but fp64); one launch."""
    G, n = v.shape
    b = block_size
    assert 2 <= b <= (MAX_B if method == "exact" else MAX_B_NEUMANN) and n == b * (b - 1) // 2, (b, tuple(v.shape))
    v = v if v.stride(-1) == 1 else v.contiguous()
    R = empty_out((G, b, b), like=v, dtype=torch.float32)
    if G == 0:
        return R
    BLOCK = _block(b)
    if method == "exact":
        _cayley_exact_fwd_kernel[(G,)](v, R, b, v.stride(0), 1.0 if convention == "minus" else -1.0, BLOCK=BLOCK,
                                       num_warps=_warps(b))
    else:
        _cayley_neumann_fwd_kernel[(G,)](v, R, b, v.stride(0), float(eps or 0.0), C_LAST=_c_last(terms),
                                         DEG=neumann_degree(terms), HAS_EPS=eps is not None, BLOCK=BLOCK,
                                         num_warps=_warps(b, dots=True))
    return R


def cayley_bwd(dR, v, R, block_size: int, method: str, convention: str, terms: int, eps):
    """``dv (G, n)`` fp32 from ``dR (G, b, b)``; one launch."""
    G, n = v.shape
    b = block_size
    dR = dR.to(torch.float32).contiguous()
    dv = empty_out((G, n), like=v, dtype=torch.float32)
    if G == 0:
        return dv
    BLOCK = _block(b)
    if method == "exact":
        _cayley_exact_bwd_kernel[(G,)](dR, R.contiguous(), dv, b, n, -0.5 if convention == "minus" else 0.5,
                                       BLOCK=BLOCK, num_warps=_warps(b, dots=True))
    else:
        v = v if v.stride(-1) == 1 else v.contiguous()
        _cayley_neumann_bwd_kernel[(G,)](dR, v, dv, b, n, v.stride(0), float(eps or 0.0), C_LAST=_c_last(terms),
                                         DEG=neumann_degree(terms), HAS_EPS=eps is not None, BLOCK=BLOCK,
                                         num_warps=_warps(b, dots=True))
    return dv


# --------------------------------------------------------------------------------------------- AOT specs
def _aot_specs() -> list[AOTSpec]:
    """Every shipped (kernel, BLOCK) as launched: fp32 and bf16 ``v``, exact and Neumann (T = 5, the
    default; other T only change the unrolled product count), with and without the eps rescale."""
    specs = []
    for BLOCK in (16, 32, 64):
        w, wd = _warps(BLOCK), _warps(BLOCK, dots=True)
        for vt in ("fp32", "bf16"):
            specs.append(AOTSpec(f"cayley_exact_fwd/{vt}/b{BLOCK}", _cayley_exact_fwd_kernel,
                                 {"v_ptr": f"*{vt}", "r_ptr": "*fp32", "b": "i32", "stride_vg": "i32",
                                  "sigma": "fp32", "BLOCK": "constexpr"}, {"BLOCK": BLOCK}, num_warps=w))
            for has_eps in ((False, True) if BLOCK <= MAX_B_NEUMANN else ()):
                specs.append(AOTSpec(
                    f"cayley_neumann_fwd/{vt}/b{BLOCK}/T5" + ("/eps" if has_eps else ""), _cayley_neumann_fwd_kernel,
                    {"v_ptr": f"*{vt}", "r_ptr": "*fp32", "b": "i32", "stride_vg": "i32", "eps": "fp32",
                     "C_LAST": "constexpr", "DEG": "constexpr", "HAS_EPS": "constexpr", "BLOCK": "constexpr"},
                    {"C_LAST": 1.0, "DEG": 4, "HAS_EPS": has_eps, "BLOCK": BLOCK}, num_warps=wd))
                specs.append(AOTSpec(
                    f"cayley_neumann_bwd/{vt}/b{BLOCK}/T5" + ("/eps" if has_eps else ""), _cayley_neumann_bwd_kernel,
                    {"dr_ptr": "*fp32", "v_ptr": f"*{vt}", "dv_ptr": "*fp32", "b": "i32", "n": "i32",
                     "stride_vg": "i32", "eps": "fp32", "C_LAST": "constexpr", "DEG": "constexpr",
                     "HAS_EPS": "constexpr", "BLOCK": "constexpr"},
                    {"C_LAST": 1.0, "DEG": 4, "HAS_EPS": has_eps, "BLOCK": BLOCK}, num_warps=wd))
        specs.append(AOTSpec(f"cayley_exact_bwd/fp32/b{BLOCK}", _cayley_exact_bwd_kernel,
                             {"dr_ptr": "*fp32", "r_ptr": "*fp32", "dv_ptr": "*fp32", "b": "i32", "n": "i32",
                              "half_sign": "fp32", "BLOCK": "constexpr"}, {"BLOCK": BLOCK}, num_warps=wd))
    return specs


AOT_SPECS = _aot_specs()
