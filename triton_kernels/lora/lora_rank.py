"""Rank-r LoRA kernels (Triton) with the vendor GEMM adding onto their output: the ``vendor`` variant of
the ``triton`` backend of ``lora_linear_fwd`` / ``lora_linear_bwd``.

A compute-bound cuBLAS GEMM reads its ``C`` operand (``beta = 1``) almost for free, so the rank-r work is
written into the output first and the big GEMM adds onto it; nothing of size tokens × features is read or
written twice, and the big GEMMs run at the vendor's rate whatever ours would reach.

* forward, ``_rank_fwd_kernel``, one program per row block: its K loop computes ``u = x_lora Aᵀ``
  (stored, rounded to the input dtype as PyTorch rounds it), then its N loop writes
  ``y = scale · u Bᵀ + bias`` (one read of x_lora, one write of y). The launcher then runs
  ``y.addmm_(x, Wᵀ)`` on cuBLAS.
* backward, dy pass ``_rank_bwd_dy_kernel``, grid ``(MC, NC)`` chunks of dy: one pass over dy gives
  ``dy B`` as fp32 partials per N chunk ``gp (NC, M, R)`` and ``dyᵀ u`` as fp32 partials per M chunk
  ``dbp (MC, N, R)``. The chunk counts fill every SM with one wave at the least partial size
  (``_lora_rank_cost.split_counts``): at Llama's M = 8192, N = 4096, r = 16 on 132 SMs that is 22 × 6
  chunks and partials of 8.9 MB next to dy's 67 MB.
* backward, x pass ``_rank_bwd_x_kernel``, grid ``(MC, KC)`` chunks of x_lora: each program sums the NC
  partials of its rows' ``g = scale · Σ gp`` in a fixed order (deterministic, no atomics; rounded to the
  input dtype as PyTorch's g), and in one pass over x_lora gives ``dA = gᵀ x_lora`` as fp32 partials per
  M chunk ``dap (MC, R, K)`` and, with dx, writes ``g A`` into dx (then ``dx.addmm_(dy, W)`` on cuBLAS) or
  into dx_lora (dropout; ``dx = dy W`` is its own cuBLAS GEMM).
* ``_reduce_kernel`` sums the dB and dA partials (fixed order), scales and rounds them: one launch.

Layouts: any strides; int64 offsets. Accumulation is fp32. Limits: ``R <= 128``; fp32/fp16/bf16.
fp32 inputs use IEEE dots unless ``torch.backends.cuda.matmul.allow_tf32`` (as PyTorch); with IEEE the
rank-long expands (``u Bᵀ``, ``g A``) are R rank-1 updates (``lora_linear._rank1_expand``).
Interpreter: as in ``lora_linear.py``, bf16 operands are upcast to fp32 and bf16 outputs are written as
fp32 and rounded by torch (the interpreter's bf16 dot and stores are wrong); the compiled bf16 path is
covered by the ahead-of-time compile report (``AOT_SPECS``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.core.triton_config import AOTSpec, interpreting
from pyfastpeft.triton_kernels.lora._lora_rank_cost import (  # noqa: F401  (re-exported)
    CONFIGS, DY_WEIGHTS, INTERP_CONFIG, INTERP_SMS, RANK_BUCKETS, block_r, config, forced_split, rank_bwd_dy_cost,
    rank_bwd_x_cost, rank_fwd_cost, reduce_cost, split_counts, X_WEIGHTS)
from pyfastpeft.triton_kernels.lora.lora_linear import (  # noqa: F401  (shared policy, and supports())
    _out_dtype, _precision, _rank1_expand, _sm_count, _upcast, supports)


@triton.jit
def _rank_fwd_kernel(
    xl_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, M, N, K, R, scale,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn, stride_um, stride_ur,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, PAD_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """u = x_lora Aᵀ for one row block, then y = scale · u Bᵀ + bias over every N block."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    m_ok, r_ok = rm < M, rr < R
    acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = rk < K
        xt = tl.load(xl_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,  # Aᵀ tile (BLOCK_K, BLOCK_R)
                     mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            xt, at = xt.to(tl.float32), at.to(tl.float32)
        acc_u = tl.dot(xt, at, acc_u, input_precision=PRECISION)
    # padding ranks set to 0, not x · 0 (NaN for an inf in x, which the expand would spread over the row)
    if PAD_R:
        u = tl.where(r_ok[None, :], acc_u, 0.0).to(u_ptr.dtype.element_ty)
    else:
        u = acc_u.to(u_ptr.dtype.element_ty)
    tl.store(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur, u, mask=m_ok[:, None] & r_ok[None, :])
    for n0 in range(0, N, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = rn < N
        if PRECISION == "ieee":
            acc = _rank1_expand(u, rr, b_ptr + rn * stride_bn, stride_br, n_ok, R, BLOCK_N)
        else:
            bt = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,  # Bᵀ tile (BLOCK_R, BLOCK_N)
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(u.to(tl.float32), bt.to(tl.float32), input_precision=PRECISION)
            else:
                acc = tl.dot(u, bt, input_precision=PRECISION)
        acc = acc * scale
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _rank_bwd_dy_kernel(
    dy_ptr, b_ptr, u_ptr, gp_ptr, dbp_ptr, M, N, R, ROWS, COLS,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_um, stride_ur,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Chunk (pid 0, pid 1) of dy: g partial ``gp[pid1] = dy B`` over its columns (rows of the chunk),
    dB partial ``dbp[pid0] = dyᵀ u`` over its rows (columns of the chunk). Partials are contiguous fp32
    ``(NC, M, R)`` and ``(MC, N, R)``."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    m_lo = pm * ROWS
    m_hi = tl.minimum(m_lo + ROWS, M)
    n_lo = pn * COLS
    n_hi = tl.minimum(n_lo + COLS, N)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    gp = gp_ptr + pn.to(tl.int64) * M * R
    dbp = dbp_ptr + pm.to(tl.int64) * N * R
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = rn < n_hi
        bt = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,  # B tile (BLOCK_N, BLOCK_R)
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            bt = bt.to(tl.float32)
        acc_db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_ok = rm < m_hi
            dyt = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                          mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            ut = tl.load(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur,
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                dyt, ut = dyt.to(tl.float32), ut.to(tl.float32)
            acc_db = tl.dot(tl.trans(dyt), ut, acc_db, input_precision=PRECISION)
            g = tl.dot(dyt, bt, input_precision=PRECISION)
            g_ptrs = gp + rm[:, None] * R + rr[None, :]
            g_mask = m_ok[:, None] & r_ok[None, :]
            if n0 > n_lo:  # the chunk's later N blocks add onto the partial its first one stored
                g += tl.load(g_ptrs, mask=g_mask, other=0.0)
            tl.store(g_ptrs, g, mask=g_mask)
        tl.store(dbp + rn[:, None] * R + rr[None, :], acc_db, mask=n_ok[:, None] & r_ok[None, :])


@triton.jit
def _rank_bwd_x_kernel(
    xl_ptr, gp_ptr, a_ptr, dx_ptr, dap_ptr, M, K, R, ROWS, COLS, G_PARTS, scale,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    DX: tl.constexpr, ROUND_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DA: tl.constexpr = True,
):
    """Chunk (pid 0, pid 1) of x_lora: dA partial ``dap[pid0] = gᵀ x_lora`` over its rows (contiguous fp32
    ``(MC, R, K)``) and, with DX, ``dx = g A`` on its tiles. ``g = scale · Σ_p gp[p]`` is summed from the dy
    pass's ``G_PARTS`` partials in a fixed order (the same in every program) and, with ROUND_G, rounded to
    x_lora's dtype as PyTorch's g is. Without HAS_DA (A frozen) x_lora is never read: only ``dx = g A``."""
    pm = tl.program_id(0)
    pk = tl.program_id(1)
    m_lo = pm * ROWS
    m_hi = tl.minimum(m_lo + ROWS, M)
    k_lo = pk * COLS
    k_hi = tl.minimum(k_lo + COLS, K)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dap = dap_ptr + pm.to(tl.int64) * R * K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = rk < k_hi
        acc_da = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)  # dAᵀ: x_lora tiles are loaded transposed
        for m0 in range(m_lo, m_hi, BLOCK_M):
            rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_ok = rm < m_hi
            g_ptrs = gp_ptr + rm[:, None] * R + rr[None, :]
            g_mask = m_ok[:, None] & r_ok[None, :]
            gt = tl.load(g_ptrs, mask=g_mask, other=0.0)
            for p in range(1, G_PARTS):
                gt += tl.load(g_ptrs + p * M * R, mask=g_mask, other=0.0)
            gt = gt * scale
            if ROUND_G:
                gt = gt.to(xl_ptr.dtype.element_ty)
            if UPCAST:
                gt = gt.to(tl.float32)
            if HAS_DA:
                xt = tl.load(xl_ptr + rm[None, :] * stride_xm + rk[:, None] * stride_xk,  # x_loraᵀ (BLOCK_K, BLOCK_M)
                             mask=m_ok[None, :] & k_ok[:, None], other=0.0)
                if UPCAST:
                    xt = xt.to(tl.float32)
                acc_da = tl.dot(xt, gt, acc_da, input_precision=PRECISION)
            if DX:
                if PRECISION == "ieee":
                    lora = _rank1_expand(gt, rr, a_ptr + rk * stride_ak, stride_ar, k_ok, R, BLOCK_K)
                else:
                    at = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,  # A tile
                                 mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    if UPCAST:
                        at = at.to(tl.float32)
                    lora = tl.dot(gt, at, input_precision=PRECISION)
                tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk,
                         lora.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])
        if HAS_DA:
            tl.store(dap + rr[None, :] * K + rk[:, None], acc_da, mask=r_ok[None, :] & k_ok[:, None])


@triton.jit
def _reduce_kernel(p1_ptr, out1_ptr, PARTS1, NUMEL1, scale1, p2_ptr, out2_ptr, PARTS2, NUMEL2, scale2,
                   BLOCK: tl.constexpr):
    """``out = scale · Σ_p part[p]`` over contiguous fp32 partials ``(PARTS, NUMEL)``, in order p = 0, 1, ...,
    for two buffers in one launch (dB and dA): the first ``cdiv(NUMEL1, BLOCK)`` programs do the first."""
    pid = tl.program_id(0)
    nb1 = tl.cdiv(NUMEL1, BLOCK)
    second = pid >= nb1
    p_ptr = tl.where(second, p2_ptr, p1_ptr)
    out_ptr = tl.where(second, out2_ptr, out1_ptr)
    parts = tl.where(second, PARTS2, PARTS1)
    numel = tl.where(second, NUMEL2, NUMEL1).to(tl.int64)
    scale = tl.where(second, scale2, scale1)
    offs = (tl.where(second, pid - nb1, pid) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(0, parts):
        acc += tl.load(p_ptr + p * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------- launchers
_REDUCE_BLOCK = 1024


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16"


def _cfg(dtype: torch.dtype, R: int) -> dict:
    return INTERP_CONFIG if interpreting() else config(_dtype_class(dtype), R)


def _sms(device: torch.device) -> int:
    return INTERP_SMS if interpreting() else _sm_count(device)


def _finish(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _reduce2(parts1, shape1, scale1, parts2, shape2, scale2, dtype: torch.dtype):
    """``scale · parts.sum(0)`` of two partial buffers, rounded to ``dtype``: one launch, fixed summation order."""
    odt = _out_dtype(dtype)
    out1 = empty_out(shape1, like=parts1, dtype=odt)
    out2 = empty_out(shape2, like=parts2, dtype=odt)
    n1, n2 = out1.numel(), out2.numel()
    grid = (triton.cdiv(n1, _REDUCE_BLOCK) + triton.cdiv(n2, _REDUCE_BLOCK),)
    if grid[0]:
        _reduce_kernel[grid](parts1, out1, parts1.shape[0], n1, float(scale1), parts2, out2, parts2.shape[0], n2,
                             float(scale2), BLOCK=_REDUCE_BLOCK)
    return _finish(out1, dtype), _finish(out2, dtype)


def rank_fwd(x_lora, lora_a, lora_b, bias, scale: float, N: int):
    """``(y, u)`` with ``u = x_lora Aᵀ`` and ``y = scale · u Bᵀ + bias`` (the base GEMM is not in y yet)."""
    M, K = x_lora.shape
    R = lora_a.shape[0]
    dt = x_lora.dtype
    odt = _out_dtype(dt)
    y = empty_out((M, N), like=x_lora, dtype=odt)
    u = empty_out((M, R), like=x_lora, dtype=odt)
    if M == 0:
        return _finish(y, dt), _finish(u, dt)
    BM, BN, BK, warps, stages = _cfg(dt, R)["fwd"]
    BR = block_r(R)
    _rank_fwd_kernel[(triton.cdiv(M, BM),)](
        x_lora, lora_a, lora_b, bias if bias is not None else x_lora, y, u, M, N, K, R, float(scale),
        x_lora.stride(0), x_lora.stride(1), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        y.stride(0), y.stride(1), u.stride(0), u.stride(1),
        HAS_BIAS=bias is not None, UPCAST=_upcast(dt), PRECISION=_precision(dt), PAD_R=R < BR,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=BR, num_warps=warps, num_stages=stages,
    )
    return _finish(y, dt), _finish(u, dt)


def lora_fwd(x, x_lora, weight, bias, lora_a, lora_b, scale: float):
    """The rank-r term and bias by ``_rank_fwd_kernel``, then ``y.addmm_(x, Wᵀ)`` on cuBLAS (C = y, beta = 1)."""
    y, u = rank_fwd(x if x_lora is None else x_lora, lora_a, lora_b, bias, scale, weight.shape[0])
    if x.shape[0] and weight.shape[0]:
        y.addmm_(x, weight.t())
    return y, u


def _split(M: int, C: int, block_m: int, block_c: int, device, splits, weights):
    if splits is not None:
        return forced_split(M, C, block_m, block_c, *splits)
    return split_counts(M, C, block_m, block_c, _sms(device), weights)


def bwd_dy(dy, u, lora_b, splits=None):
    """One pass over dy: fp32 partials ``gp (NC, M, R)`` of ``dy B`` and ``dbp (MC, N, R)`` of ``dyᵀ u``
    (unscaled). ``splits=(MC, NC)`` forces the chunk counts (tests)."""
    M, N = dy.shape
    R = lora_b.shape[1]
    dt = dy.dtype
    if M == 0 or N == 0:  # an empty reduction: one zero partial each
        return (torch.zeros((1, M, R), dtype=torch.float32, device=dy.device),
                torch.zeros((1, N, R), dtype=torch.float32, device=dy.device))
    BM, BN, _, warps, stages = _cfg(dt, R)["dy"]
    mc, nc, rows, cols = _split(M, N, BM, BN, dy.device, splits, DY_WEIGHTS)
    gp = empty_out((nc, M, R), like=dy, dtype=torch.float32)  # NaN-poisoned in tests: every entry is written
    dbp = empty_out((mc, N, R), like=dy, dtype=torch.float32)
    _rank_bwd_dy_kernel[(mc, nc)](
        dy, lora_b, u, gp, dbp, M, N, R, rows, cols,
        dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1), u.stride(0), u.stride(1),
        UPCAST=_upcast(dt), PRECISION=_precision(dt), BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=block_r(R),
        num_warps=warps, num_stages=stages,
    )
    return gp, dbp


def bwd_x(x_lora, gp, scale: float, lora_a, dx_out, splits=None, dy_dtype=None):
    """One pass over x_lora with ``g = scale · Σ gp`` (rounded to x_lora's dtype): fp32 partials
    ``dap (MC, R, K)`` of ``gᵀ x_lora``; with ``dx_out`` (M, K) also ``dx_out = g A``."""
    has_da = x_lora is not None  # None: A frozen, only dx_out = g A (x_lora is never read)
    src = x_lora if has_da else dx_out
    M, K = src.shape
    R = lora_a.shape[0]
    dt = dy_dtype if dy_dtype is not None else src.dtype
    if M == 0 or K == 0:
        if dx_out is not None:
            dx_out.zero_()
        return torch.zeros((1, R, K), dtype=torch.float32, device=src.device)
    BM, BK, _, warps, stages = _cfg(dt, R)["x"]
    mc, kc, rows, cols = _split(M, K, BM, BK, src.device, splits, X_WEIGHTS)
    dap = empty_out((mc, R, K) if has_da else (1,), like=src, dtype=torch.float32)
    has_dx = dx_out is not None
    _rank_bwd_x_kernel[(mc, kc)](
        src, gp, lora_a, dx_out if has_dx else dap, dap, M, K, R, rows, cols, gp.shape[0], float(scale),
        src.stride(0), src.stride(1), lora_a.stride(0), lora_a.stride(1),
        dx_out.stride(0) if has_dx else 0, dx_out.stride(1) if has_dx else 0,
        DX=has_dx, ROUND_G=not _upcast(dt), UPCAST=_upcast(dt), PRECISION=_precision(dt),
        BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=block_r(R), HAS_DA=has_da, num_warps=warps, num_stages=stages,
    )
    return dap


def lora_bwd(dy, x_lora, u, weight, lora_a, lora_b, scale: float, dx_mode: int, splits=None):
    """(dx, dx_lora, dA, dB) of the fallback contract (``pyfastpeft.lora.torch_impl.bwd``): the dy pass, the
    x_lora pass (writing ``g A`` into dx), one reduction launch for dB and dA, then ``dx.addmm_(dy, W)`` on
    cuBLAS (mode 1) or ``dx = dy W`` apart (mode 2)."""
    M, N = dy.shape
    K, R = weight.shape[1], lora_a.shape[0]
    dt = dy.dtype
    gp, dbp = bwd_dy(dy, u, lora_b, splits)
    if x_lora.dim() == 1:  # A frozen (x_lora of shape (0,), PSOFT): no dA, so no pass over x
        return _bwd_a_frozen(dy, gp, dbp, weight, lora_a, scale, dx_mode, splits)
    lora_dx = empty_out((M, K), like=dy, dtype=_out_dtype(dt)) if dx_mode else None
    dap = bwd_x(x_lora, gp, scale, lora_a, lora_dx, splits)
    db, da = _reduce2(dbp, (N, R), scale, dap, (R, K), 1.0, dt)
    if dx_mode == 0:  # custom-op outputs may not alias each other: two distinct empty tensors
        return empty_out((0,), like=dy), empty_out((0,), like=dy), da, db
    lora_dx = _finish(lora_dx, dt)
    if dx_mode == 1:
        if M and K and N:
            lora_dx.addmm_(dy, weight)
        return lora_dx, empty_out((0,), like=dy), da, db
    return torch.mm(dy, weight), lora_dx, da, db


def _bwd_a_frozen(dy, gp, dbp, weight, lora_a, scale: float, dx_mode: int, splits=None):
    """The backward without dA: dB from its partials (the reduction the full backward runs); with dx wanted,
    ``g A`` by the x-pass kernel without its x loads (``HAS_DA=False``), onto which cuBLAS adds ``dy W``
    (mode 1) or which is kept apart (mode 2). Bit-equal to the full backward's dx and dB."""
    M, N = dy.shape
    K, R = weight.shape[1], lora_a.shape[0]
    dt = dy.dtype
    empty = lambda: empty_out((0,), like=dy)  # noqa: E731  (custom-op outputs may not alias each other)
    db, _ = _reduce2(dbp, (N, R), scale, dbp, (0,), 1.0, dt)
    if dx_mode == 0:
        return empty(), empty(), empty(), db
    lora_dx = empty_out((M, K), like=dy, dtype=_out_dtype(dt))
    bwd_x(None, gp, scale, lora_a, lora_dx, splits, dy_dtype=dt)
    lora_dx = _finish(lora_dx, dt)
    if dx_mode == 1:
        if M and K and N:
            lora_dx.addmm_(dy, weight)
        return lora_dx, empty(), empty(), db
    return torch.mm(dy, weight), lora_dx, empty(), db


# ----------------------------------------------------------------------------------------------- AOT specs
def _spec(name, kernel, ptrs, ints, strides, unit, cx, warps, stages, ty, fp32_ptrs=()):
    """One AOTSpec as a real launch on contiguous tensors specialises it: unit strides become the constant 1,
    and sizes / leading strides are marked divisible by 16 where the launch's shapes make them so."""
    sig = {n: ("*fp32" if n in fp32_ptrs else f"*{ty}") for n in ptrs}
    sig.update({n: "i32" for n in ints + strides})
    sig.update({n: "fp32" for n in ("scale", "scale1", "scale2") if n in kernel.arg_names})
    sig.update({n: "constexpr" for n in cx})
    consts = dict(cx, **{n: 1 for n in unit})
    div16 = [n for n in ints + strides if n not in unit
             and n not in ("M", "R", "G_PARTS", "PARTS1", "PARTS2", "NUMEL1", "NUMEL2")]
    return AOTSpec(name, kernel, sig, consts, warps, stages, meta={"divisible_by_16": div16})


def _aot_specs() -> list[AOTSpec]:
    """Every shipped config as launched: bf16 and fp16 (tensor-core dots), fp32 with IEEE dots; each rank
    bucket at its largest BLOCK_R (and 16 for the smallest bucket)."""
    specs = []
    for ty, cls, prec in (("bf16", "16", "tf32"), ("fp16", "16", "tf32"), ("fp32", "fp32", "ieee")):
        for bucket in RANK_BUCKETS:
            cfg = CONFIGS[cls, bucket]
            for BR in ((16, 32) if bucket == 32 else (bucket,)):
                BM, BN, BK, w, s = cfg["fwd"]
                specs.append(_spec(
                    f"rank_fwd/{ty}/r{BR}/{BM}x{BN}x{BK}", _rank_fwd_kernel,
                    ["xl_ptr", "a_ptr", "b_ptr", "bias_ptr", "y_ptr", "u_ptr"], ["M", "N", "K", "R"],
                    ["stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_bn", "stride_br", "stride_ym",
                     "stride_yn", "stride_um", "stride_ur"],
                    ["stride_xk", "stride_ak", "stride_br", "stride_yn", "stride_ur"],
                    dict(HAS_BIAS=True, UPCAST=False, PRECISION=prec, PAD_R=False, BLOCK_M=BM, BLOCK_N=BN,
                         BLOCK_K=BK, BLOCK_R=BR), w, s, ty))
                BM, BN, _, w, s = cfg["dy"]
                specs.append(_spec(
                    f"rank_bwd_dy/{ty}/r{BR}/{BM}x{BN}", _rank_bwd_dy_kernel,
                    ["dy_ptr", "b_ptr", "u_ptr", "gp_ptr", "dbp_ptr"], ["M", "N", "R", "ROWS", "COLS"],
                    ["stride_dym", "stride_dyn", "stride_bn", "stride_br", "stride_um", "stride_ur"],
                    ["stride_dyn", "stride_br", "stride_ur"],
                    dict(UPCAST=False, PRECISION=prec, BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR), w, s, ty,
                    fp32_ptrs=("gp_ptr", "dbp_ptr")))
                BM, BK, _, w, s = cfg["x"]
                # (DX, HAS_DA): dA and g A; dA only (no input gradient); g A only (A frozen: PSOFT)
                for dx, da in ((True, True), (False, True), (True, False)):
                    specs.append(_spec(
                        f"rank_bwd_x/{ty}/r{BR}/{BM}x{BK}" + ("" if dx else "/no-dx") + ("" if da else "/no-da"),
                        _rank_bwd_x_kernel, ["xl_ptr", "gp_ptr", "a_ptr", "dx_ptr", "dap_ptr"],
                        ["M", "K", "R", "ROWS", "COLS", "G_PARTS"],
                        ["stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_dxm", "stride_dxk"],
                        ["stride_xk", "stride_ak", "stride_dxk"],
                        dict(DX=dx, ROUND_G=True, UPCAST=False, PRECISION=prec, BLOCK_M=BM, BLOCK_K=BK,
                             BLOCK_R=BR, HAS_DA=da), w, s, ty, fp32_ptrs=("gp_ptr", "dap_ptr")))
        specs.append(_spec(f"rank_reduce/{ty}", _reduce_kernel, ["p1_ptr", "out1_ptr", "p2_ptr", "out2_ptr"],
                           ["PARTS1", "NUMEL1", "PARTS2", "NUMEL2"], [], [], dict(BLOCK=_REDUCE_BLOCK), 4, 1, ty,
                           fp32_ptrs=("p1_ptr", "p2_ptr")))
    return specs


AOT_SPECS = _aot_specs()
