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
* Neumann (``_cayley_neumann_fwd_kernel``): PEFT's series ``I + 2Q + … + 2Q^(d−1) + c_d Q^d`` in Horner form
  (``d − 1`` products, as the powers) by ``tl.dot`` in IEEE fp32 (TF32 would cost ~1e-3 relative error), with PSOFT's optional Frobenius rescale.
* backward: exact ``dQ = −σ ½ (Rᵀ + I) dR (Rᵀ + I)`` from the saved ``R`` (no second solve); Neumann by a
  reverse Horner recursion ``S ← 2I + QᵀS``, ``W ← dR S + QᵀW`` (three products per degree), then the eps
  chain; ``dv = (dQ − dQᵀ)[i < j]`` scattered back to the packed layout.

Limits: exact forward ``2 <= b <= 128`` (one Gauss-Jordan tile), exact backward ``b <= 64`` (its two register
``tl.dot`` spill at 128; the registry's triton backend runs two batched GEMMs from ``R`` there), Neumann
``b <= 64``: register ``tl.dot`` up to BLOCK 32, and at BLOCK 64 the ``*_ws`` kernels, whose products are
rank-1 updates through a per-program fp32 workspace (the dot chains spill at 64 on sm_80/sm_90a, per the
compile report). Larger blocks (PSOFT's ``r`` up to 256+) go to the ``torch`` backend (batched LU) or the CUDA
kernel (``b <= 128``, shared memory): the registry's ``supports`` says so. fp64 ``v`` also goes to ``torch``.
Under the interpreter everything is fp32 already (no bf16 ``tl.dot``), so no upcast switch is needed.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.triton_kernels.orthogonal._cayley_cost import (  # noqa: F401  (cost formulas re-exported for tests)
    cayley_bwd_cost, cayley_fwd_cost, neumann_degree)
from pyfastpeft.core.triton_config import AOTSpec

from pyfastpeft.triton_kernels.orthogonal._cayley_cost import (  # noqa: E402,F401
    DOT_MAX_NEUMANN, MAX_B, MAX_B_EXACT_BWD, MAX_B_NEUMANN)


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
    eye = tl.where(i == j, 1.0, 0.0)
    # Horner: R = I + Q(2I + Q(2I + … + Q(2I + C_LAST·Q))): DEG − 1 products, like the powers, but only Q and
    # the running S live (the powers form also keeps the sum): what lets BLOCK = 64 compile without spills
    if DEG == 0:
        S = eye
    elif DEG == 1:
        S = eye + C_LAST * Q
    else:
        S = 2.0 * eye + C_LAST * Q
        for _ in tl.static_range(2, DEG):
            S = tl.dot(Q, S, acc=2.0 * eye, input_precision="ieee")
        S = tl.dot(Q, S, acc=eye, input_precision="ieee")
    tl.store(r_ptr + g * b * b + i * b + j, S, mask=(i < b) & (j < b))


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
    QT = -Q  # skew: Qᵀ = −Q; from here on only Qᵀ, G, S and W are live (Q0 is re-read for the eps chain)
    G = tl.load(dr_ptr + g * b * b + i * b + j, mask=(i < b) & (j < b), other=0.0)
    # dQ = Σ_j (Qᵀ)ʲ G S_j, S_j = Σ_{k>j} c_k (Qᵀ)^(k−1−j): from j = d−1 down, S_{d−1} = c_d I,
    # S_j = 2I + Qᵀ S_{j+1}, W_j = G S_j + Qᵀ W_{j+1}; dQ = W_0 (the sums ride in the dots' accumulators)
    S = C_LAST * eye
    W = C_LAST * G
    for _ in tl.static_range(0, DEG - 1):
        S = tl.dot(QT, S, acc=2.0 * eye, input_precision="ieee")
        W = tl.dot(QT, W, acc=tl.dot(G, S, input_precision="ieee"), input_precision="ieee")
    if DEG == 0:
        W = 0.0 * G
    if HAS_EPS:
        # through Q_s = c(Q) Q with c = eps / (‖Q‖ + 1e-12) where ‖Q‖ > eps
        Q0 = _load_skew(v_ptr, g, b, stride_vg, BLOCK)
        inner = tl.sum(tl.sum(W * Q0, axis=1), axis=0)
        hit = nrm > eps
        safe = tl.where(hit, nrm, 1.0)
        corr = tl.where(hit, -eps * inner / (safe * (safe + 1e-12) * (safe + 1e-12)), 0.0)
        W = W * c + corr * Q0
    # dv[idx(i, j)] = W[i, j] − W[j, i]: the upper triangle stored, then the lower one added at the transposed
    # index (no register transpose of the tile), as the exact backward
    _store_packed(dv_ptr, g, b, n, W, BLOCK)
    tl.debug_barrier()
    idx_t = j * b - (j * (j + 1)) // 2 + (i - j - 1)
    tl.atomic_add(dv_ptr + g * n + idx_t, -W, mask=(i > j) & (i < b), sem="relaxed")


# ---------------------------------------------------------------- large blocks: products through a workspace
# Above BLOCK = 32 the Neumann series's chain of IEEE-fp32 ``tl.dot`` on register tiles spills
# (compile report). These kernels keep one accumulator tile in registers and form each b × b product as b
# rank-1 updates whose two vectors are loaded from memory (a per-program fp32 workspace that stays in L1/L2):
# no register transpose, no dot staging, nothing but the accumulator live.
@triton.jit
def _mm_mem(acc, a_ptr, sa_i, sa_k, b_ptr, sb_k, sb_j, b, EYE_A: tl.constexpr, EYE_B: tl.constexpr,
            BLOCK: tl.constexpr):
    """``acc + A B`` for ``b × b`` fp32 matrices in memory (``A[i, k] = a_ptr[i·sa_i + k·sa_k]``, likewise
    ``B``), ``+ I`` added to ``A`` / ``B`` when ``EYE_A`` / ``EYE_B``."""
    ar = tl.arange(0, BLOCK)
    m = ar < b
    for k in range(0, b):
        a = tl.load(a_ptr + ar * sa_i + k * sa_k, mask=m, other=0.0)
        if EYE_A:
            a += tl.where(ar == k, 1.0, 0.0)
        bb = tl.load(b_ptr + k * sb_k + ar * sb_j, mask=m, other=0.0)
        if EYE_B:
            bb += tl.where(ar == k, 1.0, 0.0)
        acc += a[:, None] * bb[None, :]
    return acc


@triton.jit
def _store_tile(ptr, T, b, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    tl.store(ptr + i * b + j, T, mask=(i < b) & (j < b))


@triton.jit
def _store_dv_skew(dv_ptr, g, b, n, T, BLOCK: tl.constexpr):
    """``dv[g, idx(i, j)] = T[i, j] − T[j, i]``: the upper triangle stored, the lower one added at the
    transposed index (no register transpose)."""
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    _store_packed(dv_ptr, g, b, n, T, BLOCK)
    tl.debug_barrier()
    idx_t = j * b - (j * (j + 1)) // 2 + (i - j - 1)
    tl.atomic_add(dv_ptr + g * n + idx_t, -T, mask=(i > j) & (i < b), sem="relaxed")


@triton.jit
def _cayley_neumann_fwd_ws_kernel(v_ptr, r_ptr, ws_ptr, b, stride_vg, eps, C_LAST: tl.constexpr,
                                  DEG: tl.constexpr, HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    """Horner as ``_cayley_neumann_fwd_kernel``; ``Q_s`` goes to the workspace and the running ``S`` to the
    output ``R`` itself between products."""
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    base = g * b * b
    Q, Q0, nrm, c = _rescaled_skew(v_ptr, g, b, stride_vg, eps, HAS_EPS, BLOCK)
    eye = tl.where(i == j, 1.0, 0.0)
    if DEG == 0:
        S = eye
    elif DEG == 1:
        S = eye + C_LAST * Q
    else:
        S = 2.0 * eye + C_LAST * Q
        _store_tile(ws_ptr + base, Q, b, BLOCK)
        for t in tl.static_range(1, DEG):
            _store_tile(r_ptr + base, S, b, BLOCK)
            tl.debug_barrier()
            S = _mm_mem((1.0 if t == DEG - 1 else 2.0) * eye, ws_ptr + base, b, 1, r_ptr + base, b, 1, b,
                        EYE_A=False, EYE_B=False, BLOCK=BLOCK)
            tl.debug_barrier()  # every row of the old S read before it is overwritten
    _store_tile(r_ptr + base, S, b, BLOCK)


@triton.jit
def _cayley_neumann_bwd_ws_kernel(dr_ptr, v_ptr, dv_ptr, ws_ptr, b, n, stride_vg, eps, C_LAST: tl.constexpr,
                                  DEG: tl.constexpr, HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    """The reverse Horner recursion of ``_cayley_neumann_bwd_kernel`` with ``Qᵀ``, ``S`` and ``W`` in a
    three-tile workspace: ``S ← 2I + Qᵀ S``, ``W ← dR S + Qᵀ W``."""
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    bb = b * b
    qt_ptr = ws_ptr + g * 3 * bb
    s_ptr = qt_ptr + bb
    w_ptr = s_ptr + bb
    dr = dr_ptr + g * bb
    eye = tl.where(i == j, 1.0, 0.0)
    Q, Q0, nrm, c = _rescaled_skew(v_ptr, g, b, stride_vg, eps, HAS_EPS, BLOCK)
    _store_tile(qt_ptr, -Q, b, BLOCK)
    G = tl.load(dr + i * b + j, mask=(i < b) & (j < b), other=0.0)
    S = C_LAST * eye
    W = C_LAST * G
    for _ in tl.static_range(0, DEG - 1):
        _store_tile(s_ptr, S, b, BLOCK)
        _store_tile(w_ptr, W, b, BLOCK)
        tl.debug_barrier()
        S = _mm_mem(2.0 * eye, qt_ptr, b, 1, s_ptr, b, 1, b, EYE_A=False, EYE_B=False, BLOCK=BLOCK)
        tl.debug_barrier()
        _store_tile(s_ptr, S, b, BLOCK)
        tl.debug_barrier()
        W = _mm_mem(tl.zeros((BLOCK, BLOCK), tl.float32), dr, b, 1, s_ptr, b, 1, b, EYE_A=False, EYE_B=False,
                    BLOCK=BLOCK)
        W = _mm_mem(W, qt_ptr, b, 1, w_ptr, b, 1, b, EYE_A=False, EYE_B=False, BLOCK=BLOCK)
        tl.debug_barrier()
    if DEG == 0:
        W = 0.0 * G
    if HAS_EPS:
        Q0 = _load_skew(v_ptr, g, b, stride_vg, BLOCK)
        inner = tl.sum(tl.sum(W * Q0, axis=1), axis=0)
        hit = nrm > eps
        safe = tl.where(hit, nrm, 1.0)
        corr = tl.where(hit, -eps * inner / (safe * (safe + 1e-12) * (safe + 1e-12)), 0.0)
        W = W * c + corr * Q0
    _store_dv_skew(dv_ptr, g, b, n, W, BLOCK)


# --------------------------------------------------------------------------------------------- launchers
def _block(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def _warps(b: int, dots: bool = False) -> int:
    """Warps per program: the Gauss-Jordan kernel holds one tile (4 warps to b=32, 8 at 64); the kernels
    that chain ``tl.dot`` hold 4-6 tiles plus the dot's staging and spill below 8 warps at BLOCK=32 and
    below 16 at BLOCK=64 (compile report, sm_80/sm_90a); the workspace kernels take the Gauss-Jordan count at
    BLOCK=64 (Neumann)."""
    blk = _block(b)
    if not dots:
        return {16: 4, 32: 4, 64: 8, 128: 16}[blk]
    return {16: 4, 32: 8, 64: 16, 128: 32}[blk]


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
    elif BLOCK > DOT_MAX_NEUMANN:
        ws = torch.empty((G, b, b), device=v.device, dtype=torch.float32)
        _cayley_neumann_fwd_ws_kernel[(G,)](v, R, ws, b, v.stride(0), float(eps or 0.0), C_LAST=_c_last(terms),
                                            DEG=neumann_degree(terms), HAS_EPS=eps is not None, BLOCK=BLOCK,
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
    half_sign = -0.5 if convention == "minus" else 0.5
    assert method != "exact" or b <= MAX_B_EXACT_BWD, b
    if method == "exact":
        _cayley_exact_bwd_kernel[(G,)](dR, R.contiguous(), dv, b, n, half_sign,
                                       BLOCK=BLOCK, num_warps=_warps(b, dots=True))
    elif BLOCK > DOT_MAX_NEUMANN:
        v = v if v.stride(-1) == 1 else v.contiguous()
        ws = torch.empty((G, 3, b, b), device=v.device, dtype=torch.float32)
        _cayley_neumann_bwd_ws_kernel[(G,)](dR, v, dv, ws, b, n, v.stride(0), float(eps or 0.0),
                                            C_LAST=_c_last(terms), DEG=neumann_degree(terms),
                                            HAS_EPS=eps is not None, BLOCK=BLOCK, num_warps=_warps(b))
    else:
        v = v if v.stride(-1) == 1 else v.contiguous()
        _cayley_neumann_bwd_kernel[(G,)](dR, v, dv, b, n, v.stride(0), float(eps or 0.0), C_LAST=_c_last(terms),
                                         DEG=neumann_degree(terms), HAS_EPS=eps is not None, BLOCK=BLOCK,
                                         num_warps=_warps(b, dots=True))
    return dv


# --------------------------------------------------------------------------------------------- AOT specs
def _aot_specs() -> list[AOTSpec]:
    """Every shipped (kernel, BLOCK) as launched: fp32 and bf16 ``v``, exact and Neumann (T = 5, the
    default; other T only change the unrolled product count), with and without the eps rescale; the
    workspace kernels where the launchers pick them (Neumann at BLOCK 64)."""
    specs = []
    for BLOCK in (16, 32, 64, 128):
        w, wd = _warps(BLOCK), _warps(BLOCK, dots=True)
        neu_ws = BLOCK > DOT_MAX_NEUMANN
        for vt in ("fp32", "bf16"):
            specs.append(AOTSpec(f"cayley_exact_fwd/{vt}/b{BLOCK}", _cayley_exact_fwd_kernel,
                                 {"v_ptr": f"*{vt}", "r_ptr": "*fp32", "b": "i32", "stride_vg": "i32",
                                  "sigma": "fp32", "BLOCK": "constexpr"}, {"BLOCK": BLOCK}, num_warps=w))
            for has_eps in ((False, True) if BLOCK <= MAX_B_NEUMANN else ()):
                tag = f"{vt}/b{BLOCK}/T5" + ("/eps" if has_eps else "")
                cx = {"C_LAST": 1.0, "DEG": 4, "HAS_EPS": has_eps, "BLOCK": BLOCK}
                ws = {"ws_ptr": "*fp32"} if neu_ws else {}
                specs.append(AOTSpec(
                    f"cayley_neumann_fwd{'_ws' if neu_ws else ''}/{tag}",
                    _cayley_neumann_fwd_ws_kernel if neu_ws else _cayley_neumann_fwd_kernel,
                    {"v_ptr": f"*{vt}", "r_ptr": "*fp32", **ws, "b": "i32", "stride_vg": "i32", "eps": "fp32",
                     "C_LAST": "constexpr", "DEG": "constexpr", "HAS_EPS": "constexpr", "BLOCK": "constexpr"},
                    cx, num_warps=w if neu_ws else wd))
                specs.append(AOTSpec(
                    f"cayley_neumann_bwd{'_ws' if neu_ws else ''}/{tag}",
                    _cayley_neumann_bwd_ws_kernel if neu_ws else _cayley_neumann_bwd_kernel,
                    {"dr_ptr": "*fp32", "v_ptr": f"*{vt}", "dv_ptr": "*fp32", **ws, "b": "i32", "n": "i32",
                     "stride_vg": "i32", "eps": "fp32", "C_LAST": "constexpr", "DEG": "constexpr",
                     "HAS_EPS": "constexpr", "BLOCK": "constexpr"}, cx, num_warps=w if neu_ws else wd))
        if BLOCK <= MAX_B_EXACT_BWD:
            specs.append(AOTSpec(f"cayley_exact_bwd/fp32/b{BLOCK}", _cayley_exact_bwd_kernel,
                                 {"dr_ptr": "*fp32", "r_ptr": "*fp32", "dv_ptr": "*fp32", "b": "i32", "n": "i32",
                                  "half_sign": "fp32", "BLOCK": "constexpr"}, {"BLOCK": BLOCK}, num_warps=wd))
    # as launched at the usual block sizes b = BLOCK (PEFT's 32, 64, ...): the JIT specialises b and, where
    # b(b-1)/2 is a multiple of 16 (b = 32, 64, 128), v's row stride and n as multiples of 16
    out = []
    for sp in specs:
        blk = sp.constexprs["BLOCK"]
        div = ["b"] + (["stride_vg", "n"] if (blk * (blk - 1) // 2) % 16 == 0 else [])
        out.append(dataclasses.replace(sp, meta={"divisible_by_16": [k for k in div if k in sp.signature]}))
    return out


AOT_SPECS = _aot_specs()
