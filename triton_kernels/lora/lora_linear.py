"""Fused LoRA linear kernels (Triton): the ``triton`` backend of ``lora_linear_fwd`` / ``lora_linear_bwd``.

Maths (PEFT's LoRA, ``scale = alpha / r`` or ``alpha / sqrt(r)``), 2-D ``x (M, K)``, ``W (N, K)``,
``A (R, K)``, ``B (N, R)``:

* forward, one kernel ``_lora_fwd_kernel``: each program owns ``TILES_PER_PROG`` consecutive
  ``(BLOCK_M, BLOCK_N)`` tiles of ``y`` in one row block. For its first tile the K loop loads each ``x``
  tile once and feeds two dots: the base GEMM ``x Wᵀ`` and the shrink ``u = x Aᵀ`` (``BLOCK_M x BLOCK_R``);
  the other tiles reuse ``u`` from registers. The expand ``scale · u Bᵀ`` and the bias are each tile's
  epilogue, so ``y`` is written once and never re-read. Programs of the first group store ``u`` (saved for
  backward). The shrink is recomputed once per group instead of a second pass over ``x``:
  ``R / (BLOCK_N · TILES_PER_PROG)`` extra tensor-core FLOPs (3.1 % at r=16, K=N=4096, M=8192 on an H100,
  where the launcher picks 4 tiles per program; ``tiles_per_prog`` keeps >= 2 programs per SM).
  With dropout the shrink reads ``x_lora`` instead.
* backward, ``_lora_bwd_dx_kernel``: ``dx = dy W + g A`` with ``g = scale · dy B``, one GEMM over the
  concatenated reduction ``[dy | g] @ [W ; A]``: the N loop loads each ``dy`` tile once for both
  ``dy W`` and ``dy B``; ``g`` is complete when the loop ends and its ``R``-long tail is the epilogue.
  As in forward, a program owns ``TILES_PER_PROG`` K tiles and computes ``g`` for the first only;
  programs of the first group store ``g`` for the weight gradients.
* ``_matmul_tn_kernel``: ``C = alpha · Pᵀ Q`` reduced over M, for ``dA = gᵀ x_lora`` and ``dB = scale · dyᵀ u``.
  These have few output tiles (r x K, N x r), so the reduction is split over M (grid axis 2, ``tn_split``:
  the grid gives every SM a program); each slice writes an fp32 partial and ``_tn_reduce_kernel`` sums them
  in order (deterministic) with alpha.
* Hopper (sm_90, fp16/bf16): ``_lora_fwd_tma_kernel`` and ``_lora_bwd_dx_tma_kernel`` are the same maths with
  TMA tensor-descriptor loads and stores and a persistent grid (see the section "Hopper (sm_90) variants");
  ``_use_tma`` picks them at launch from the device capability and the tensors' alignment.

Layouts: any strides (2-D views are fine). Accumulation is fp32; outputs are rounded once to the input
dtype; ``u`` and ``g`` are rounded to the input dtype before their second GEMM (as PyTorch does).
fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as
PyTorch). With IEEE fp32 the rank-long epilogue products (``u Bᵀ`` in forward, ``g A`` in dx) are R rank-1
updates instead of ``tl.dot`` (``_rank1_expand``): an FMA dot over K = BLOCK_R >= 64 spills at any tile size.
Limits: ``R <= 128`` (``BLOCK_R`` holds the whole rank); dtypes fp32/fp16/bf16.

Configs: each launcher picks a config *family* by dtype class (fp16/bf16 share one; fp32 has its own,
small FMA tiles) and, for the two rank-carrying kernels, the rank bucket ``BLOCK_R <= 32 / 64 / 128``
(``_FWD_FAMILIES``, ``_DX_FAMILIES``, ``_TN_FAMILIES``), and autotunes within it; one ``triton.autotune``
wrapper per family over the same ``@triton.jit`` kernel. Every config of every family compiles with 0
spilled bytes on sm_80 and sm_90a (``AOT_SPECS``, checked by ``pyfastpeft compile-report --fail-on-spill``).
Interpreter: bf16 ``tl.dot`` is wrong in Triton's CPU interpreter, so bf16 operands are upcast to fp32
there (``UPCAST``); the real bf16 path is covered by the ahead-of-time compile report.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.core.triton_config import AOTSpec, autotune_configs, interpreting
# Declared FLOPs / unique HBM bytes per launch live in a Triton-free module (pfp.perf reads them without
# importing Triton); tests/lora/test_lora_linear_cost.py checks them against the interpreter's loads/stores.
from pyfastpeft.triton_kernels.lora._lora_linear_cost import (  # noqa: F401  (re-exported)
    bwd_dx_cost, fwd_cost, tiles_per_prog, tn_cost, tn_split)

MAX_RANK = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cfg(bm, bn, bk, warps, stages, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    return triton.Config({names[0]: bm, names[1]: bn, names[2]: bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


def _tn_cfg(bp, bq, bm, warps, stages):
    return triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_M": bm}, num_warps=warps, num_stages=stages)


# Config families: a launch picks one by (dtype class, rank bucket) and autotunes within it. Tiles that
# keep fp32 accumulators for (BLOCK_M, BLOCK_N) *and* (BLOCK_M, BLOCK_R) in registers spill once the
# rank grows, and fp32 IEEE dots (FMA, no tensor cores) need far smaller tiles than 16-bit ones; each
# family holds only configs that compile with 0 spilled bytes on sm_80 and sm_90a (the compile report).
# Keys: ("16", rank bucket) for fp16/bf16, ("fp32", rank bucket); rank bucket = BLOCK_R upper bound.
_RANK_BUCKETS = (32, 64, 128)
# fwd: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); output tile (BLOCK_M, BLOCK_N), reduction over K.
_FWD_FAMILIES = {
    ("16", 32): [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 8, 3), _cfg(64, 64, 64, 4, 3)],
    ("16", 64): [_cfg(128, 64, 64, 8, 3), _cfg(64, 64, 64, 4, 3)],
    ("16", 128): [_cfg(64, 128, 64, 8, 3), _cfg(64, 64, 32, 4, 3)],
    ("fp32", 32): [_cfg(64, 64, 32, 8, 3), _cfg(32, 64, 32, 4, 3)],
    ("fp32", 64): [_cfg(64, 128, 16, 8, 3), _cfg(64, 64, 32, 8, 3), _cfg(32, 64, 32, 4, 3)],
    ("fp32", 128): [_cfg(128, 64, 16, 8, 3), _cfg(64, 64, 32, 8, 3)],
}
# dx: the output tile is (BLOCK_M, BLOCK_K) and the reduction runs over N in BLOCK_N chunks.
_DX_FAMILIES = {
    ("16", 32): [_cfg(128, 64, 64, 8, 3), _cfg(64, 64, 128, 8, 3), _cfg(64, 64, 64, 4, 3)],
    ("16", 64): [_cfg(128, 64, 64, 8, 3), _cfg(64, 64, 64, 8, 3), _cfg(64, 32, 128, 4, 3)],
    ("16", 128): [_cfg(64, 64, 128, 8, 3), _cfg(32, 64, 128, 4, 3)],
    ("fp32", 32): [_cfg(64, 16, 128, 8, 3), _cfg(32, 16, 128, 4, 3), _cfg(32, 16, 64, 4, 3)],
    ("fp32", 64): [_cfg(64, 16, 128, 8, 3), _cfg(32, 16, 128, 4, 3), _cfg(32, 16, 64, 4, 3)],
    ("fp32", 128): [_cfg(32, 16, 128, 4, 3), _cfg(32, 16, 64, 4, 3), _cfg(16, 32, 64, 4, 3)],
}
# matmul_tn has no rank block: one family per dtype class. (BLOCK_P, BLOCK_Q, BLOCK_M, warps, stages).
_TN_FAMILIES = {
    "16": [_tn_cfg(128, 64, 64, 4, 3), _tn_cfg(64, 128, 64, 4, 3), _tn_cfg(64, 64, 64, 4, 3),
           _tn_cfg(128, 128, 32, 8, 3)],
    # (64, 128, 32, 8 warps) left out: with the split-M slice bounds it spills 8-24 bytes (compile report)
    "fp32": [_tn_cfg(128, 128, 16, 8, 3), _tn_cfg(32, 64, 32, 4, 3)],
}
# The interpreter runs one small config per family (autotune_configs).
_INTERP_FWD = _cfg(16, 32, 32, 1, 1)
_INTERP_DX = _cfg(16, 32, 32, 1, 1)
_INTERP_TN = _tn_cfg(16, 32, 32, 1, 1)


def _fwd_tma_hook(nargs):
    """Descriptor block shapes follow the config (host descriptors carry them; set before each launch)."""
    bm, bn, bk, br = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["BLOCK_R"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["xl_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["a_desc"].block_shape = [br, bk]
    nargs["b_desc"].block_shape = [bn, br]
    nargs["y_desc"].block_shape = [bm, bn // 2]  # SUBTILE: y is stored in two halves
    nargs["u_desc"].block_shape = [bm, br]


def _dx_tma_hook(nargs):
    bm, bn, bk, br = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["BLOCK_R"]
    nargs["dy_desc"].block_shape = [bm, bn]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["a_desc"].block_shape = [br, bk]
    nargs["b_desc"].block_shape = [bn, br]
    nargs["dx_desc"].block_shape = [bm, bk // 2]  # SUBTILE
    nargs["dxl_desc"].block_shape = [bm, bk // 2]
    nargs["g_desc"].block_shape = [bm, br]


def _tma_cfg(bm, bn, bk, warps, stages, hook):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages, pre_hook=hook)


# Hopper (sm_90) families, fp16/bf16 only, by rank bucket: every config reaches >= 2 CTAs per SM on sm_90a
# with 0 spills (compile report, rows lora_fwd_tma/...).
_FWD_TMA_SMALL_R = ((128, 128, 64, 8, 2), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3))  # r <= 32 and r <= 64
_FWD_TMA_FAMILIES = {32: [_tma_cfg(*c, _fwd_tma_hook) for c in _FWD_TMA_SMALL_R],
                     64: [_tma_cfg(*c, _fwd_tma_hook) for c in _FWD_TMA_SMALL_R],
                     128: [_tma_cfg(64, 128, 32, 4, 3, _fwd_tma_hook)]}
_INTERP_FWD_TMA = _tma_cfg(16, 32, 32, 1, 1, _fwd_tma_hook)
# dx: output tile (BLOCK_M, BLOCK_K), reduction over N in BLOCK_N chunks
_DX_TMA_SMALL_R = ((128, 64, 128, 8, 2), (128, 32, 128, 8, 4), (64, 64, 128, 4, 3))
_DX_TMA_FAMILIES = {32: [_tma_cfg(*c, _dx_tma_hook) for c in _DX_TMA_SMALL_R],
                    64: [_tma_cfg(*c, _dx_tma_hook) for c in _DX_TMA_SMALL_R],
                    128: [_tma_cfg(64, 32, 128, 4, 3, _dx_tma_hook)]}
_INTERP_DX_TMA = _tma_cfg(16, 32, 32, 1, 1, _dx_tma_hook)
# persistent grids: this many programs per SM (the configs above fit two CTAs per SM)
PERSISTENT_CTAS_PER_SM = 2


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Row-grouped program order: GROUP_M row tiles share the same column tiles in L2."""
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    return pid_m, pid_n


@triton.jit
def _rank1_expand(v, rr, row_ptrs, stride_row, col_ok, R, BLOCK_C: tl.constexpr):
    """fp32 ``v (BLOCK_M, BLOCK_R) @ T[:R, cols]`` as R rank-1 updates, row r of T at ``row_ptrs + r·stride_row``.

    IEEE fp32 ``tl.dot`` runs on FMA units and keeps both operands' whole reduction extent in registers
    per thread: with the reduction over BLOCK_R >= 64 the epilogue dot spills at every tile size (compile
    report). Rank-1 updates do the same FMAs with one column of ``v`` and one row of T live at a time;
    extracting the column (a masked row sum) costs about as much as the expand, and the expand is small next
    to the main loop (BLOCK_R vs the full K or N reduction).
    """
    out = tl.zeros((v.shape[0], BLOCK_C), dtype=tl.float32)
    for r in range(0, R):
        v_r = tl.sum(tl.where(rr[None, :] == r, v.to(tl.float32), 0.0), axis=1)
        t_r = tl.load(row_ptrs + r * stride_row, mask=col_ok, other=0.0).to(tl.float32)
        out += v_r[:, None] * t_r[None, :]
    return out


@triton.jit
def _fwd_mainloop(
    x_ptr, xl_ptr, w_ptr, a_ptr, rm, rn, rr, m_ok, n_ok, r_ok, K,
    stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn, stride_wk, stride_ar, stride_ak,
    SHRINK: tl.constexpr, HAS_XL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """K loop of one y tile: ``x Wᵀ`` and, with SHRINK, ``u = x_lora Aᵀ`` from the same x tiles."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = rk < K
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,  # Wᵀ tile (BLOCK_K, BLOCK_N)
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        if SHRINK:
            at = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,  # Aᵀ tile (BLOCK_K, BLOCK_R)
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if HAS_XL:  # dropout: the shrink reads the dropped-out copy of x
                xlt = tl.load(xl_ptr + rm[:, None] * stride_xlm + rk[None, :] * stride_xlk,
                              mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            else:  # the shrink shares the base GEMM's x tile: no second read of x
                xlt = xt
            if UPCAST:
                acc_u = tl.dot(xlt.to(tl.float32), at.to(tl.float32), acc_u, input_precision=PRECISION)
            else:
                acc_u = tl.dot(xlt, at, acc_u, input_precision=PRECISION)
    return acc, acc_u


@triton.jit
def _fwd_epilogue(
    acc, u, rm, rn, rr, m_ok, n_ok, r_ok, R, scale, b_ptr, bias_ptr, y_ptr,
    stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y tile = acc + scale · u Bᵀ + bias, rounded once and stored."""
    if PRECISION == "ieee":  # fp32 FMA dots: the expand as R rank-1 updates (see _rank1_expand)
        acc += scale * _rank1_expand(u, rr, b_ptr + rn * stride_bn, stride_br, n_ok, R, BLOCK_N)
    else:
        bt = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,  # Bᵀ tile (BLOCK_R, BLOCK_N)
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            acc += scale * tl.dot(u.to(tl.float32), bt.to(tl.float32), input_precision=PRECISION)
        else:
            acc += scale * tl.dot(u, bt, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _lora_fwd_kernel(
    x_ptr, xl_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, u_ptr,
    M, N, K, R, M_BUCKET, TILES_PER_PROG, scale,
    stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn, stride_wk,
    stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn, stride_um, stride_ur,
    HAS_XL: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PAD_R: tl.constexpr = True,
):
    # Each program owns TILES_PER_PROG consecutive N tiles of one row block: the first computes the
    # shrink u with its base GEMM, the others reuse u from registers (shrink FLOPs / TILES_PER_PROG).
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_g = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(num_n, TILES_PER_PROG), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M * stride can pass 2**31
    rr = tl.arange(0, BLOCK_R)
    m_ok, r_ok = rm < M, rr < R
    first = pid_g * TILES_PER_PROG
    rn = (first * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = rn < N
    acc, acc_u = _fwd_mainloop(x_ptr, xl_ptr, w_ptr, a_ptr, rm, rn, rr, m_ok, n_ok, r_ok, K,
                               stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn, stride_wk, stride_ar,
                               stride_ak, True, HAS_XL, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    # rounded like PyTorch's u before the expand; the padding ranks R..BLOCK_R are set to 0, not left as
    # x · 0 (NaN for an inf in x, which the expand's dot would spread over the whole row of y)
    # (PAD_R: R < BLOCK_R; an exact rank has no padding lanes and skips the select)
    if PAD_R:
        u = tl.where(r_ok[None, :], acc_u, 0.0).to(u_ptr.dtype.element_ty)
    else:
        u = acc_u.to(u_ptr.dtype.element_ty)
    if pid_g == 0:
        tl.store(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur, u, mask=m_ok[:, None] & r_ok[None, :])
    _fwd_epilogue(acc, u, rm, rn, rr, m_ok, n_ok, r_ok, R, scale, b_ptr, bias_ptr, y_ptr,
                  stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, UPCAST, PRECISION, BLOCK_N)
    for t in range(first + 1, tl.minimum(first + TILES_PER_PROG, num_n)):
        rn = (t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = rn < N
        acc, _ = _fwd_mainloop(x_ptr, xl_ptr, w_ptr, a_ptr, rm, rn, rr, m_ok, n_ok, r_ok, K,
                               stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn, stride_wk, stride_ar,
                               stride_ak, False, HAS_XL, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        _fwd_epilogue(acc, u, rm, rn, rr, m_ok, n_ok, r_ok, R, scale, b_ptr, bias_ptr, y_ptr,
                      stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, UPCAST, PRECISION, BLOCK_N)


@triton.jit
def _dx_mainloop(
    dy_ptr, w_ptr, b_ptr, rm, rk, rr, m_ok, k_ok, r_ok, N,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br,
    BASE: tl.constexpr, SHRINK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """N loop of one dx tile: ``dy W`` (BASE) and ``dy B`` (SHRINK) from the same dy tiles."""
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = rn < N
        dyt = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                      mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
        if SHRINK:
            bt = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,  # B tile (BLOCK_N, BLOCK_R)
                         mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                bt = bt.to(tl.float32)
            acc_g = tl.dot(dyt, bt, acc_g, input_precision=PRECISION)
        if BASE:
            wt = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,  # W tile (BLOCK_N, BLOCK_K)
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                wt = wt.to(tl.float32)
            acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)
    return acc, acc_g


@triton.jit
def _dx_epilogue(
    acc, g, rm, rk, rr, m_ok, k_ok, r_ok, R, a_ptr, dx_ptr, dxl_ptr,
    stride_ar, stride_ak, stride_dxm, stride_dxk, stride_dxlm, stride_dxlk,
    DX_MODE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx tile = acc + g A (mode 1), or acc and g A stored apart (mode 2)."""
    if PRECISION == "ieee":  # fp32 FMA dots: R rank-1 updates (see _rank1_expand)
        lora = _rank1_expand(g, rr, a_ptr + rk * stride_ak, stride_ar, k_ok, R, BLOCK_K)
    else:
        at = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,  # A tile (BLOCK_R, BLOCK_K)
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            lora = tl.dot(g.to(tl.float32), at.to(tl.float32), input_precision=PRECISION)
        else:
            lora = tl.dot(g, at, input_precision=PRECISION)
    out_mask = m_ok[:, None] & k_ok[None, :]
    if DX_MODE == 1:
        acc += lora
    else:
        tl.store(dxl_ptr + rm[:, None] * stride_dxlm + rk[None, :] * stride_dxlk,
                 lora.to(dxl_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, dx_ptr, dxl_ptr, g_ptr, sel_ptr,
    M, N, K, R, M_BUCKET, TILES_PER_PROG, scale,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dxm, stride_dxk, stride_dxlm, stride_dxlk, stride_gm, stride_gr,
    DX_MODE: tl.constexpr,  # 0: only g; 1: dx = dy W + g A; 2: dx = dy W and dx_lora = g A apart
    HAS_SEL: tl.constexpr,  # token-selective LoRA: the g A term only on selected rows (g is stored unmasked)
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Each program owns TILES_PER_PROG consecutive K tiles of one row block: the first also computes
    # g = scale · dy B in its N loop, the others reuse g from registers (mode 0: g only, one "tile").
    if DX_MODE != 0:
        num_k = tl.cdiv(K, BLOCK_K)
        num_groups = tl.cdiv(num_k, TILES_PER_PROG)
    else:
        num_k = 1
        num_groups = 1
    pid_m, pid_g = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_groups, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    m_ok, r_ok = rm < M, rr < R
    first = pid_g * TILES_PER_PROG
    rk = (first * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    k_ok = rk < K
    acc, acc_g = _dx_mainloop(dy_ptr, w_ptr, b_ptr, rm, rk, rr, m_ok, k_ok, r_ok, N,
                              stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br,
                              DX_MODE != 0, True, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    g = (acc_g * scale).to(g_ptr.dtype.element_ty)
    if pid_g == 0:
        tl.store(g_ptr + rm[:, None] * stride_gm + rr[None, :] * stride_gr, g, mask=m_ok[:, None] & r_ok[None, :])
    if HAS_SEL:  # sel_ptr: (M,) bool; never dereferenced when HAS_SEL is off
        g = g * tl.load(sel_ptr + rm, mask=m_ok, other=0).to(g.dtype)[:, None]
    if DX_MODE != 0:
        _dx_epilogue(acc, g, rm, rk, rr, m_ok, k_ok, r_ok, R, a_ptr, dx_ptr, dxl_ptr, stride_ar, stride_ak,
                     stride_dxm, stride_dxk, stride_dxlm, stride_dxlk, DX_MODE, UPCAST, PRECISION, BLOCK_K)
        for t in range(first + 1, tl.minimum(first + TILES_PER_PROG, num_k)):
            rk = (t * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
            k_ok = rk < K
            acc, _ = _dx_mainloop(dy_ptr, w_ptr, b_ptr, rm, rk, rr, m_ok, k_ok, r_ok, N,
                                  stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br,
                                  True, False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
            _dx_epilogue(acc, g, rm, rk, rr, m_ok, k_ok, r_ok, R, a_ptr, dx_ptr, dxl_ptr, stride_ar, stride_ak,
                         stride_dxm, stride_dxk, stride_dxlm, stride_dxlk, DX_MODE, UPCAST, PRECISION, BLOCK_K)


@triton.jit
def _matmul_tn_kernel(
    p_ptr, q_ptr, c_ptr, sel_ptr, M, P, Q, M_BUCKET, SPLIT, alpha,
    stride_pm, stride_pp, stride_qm, stride_qq, stride_cp, stride_cq,
    HAS_SEL: tl.constexpr,  # reduce over selected rows only: masked-off rows move no bytes
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """C (P, Q) = alpha · Pmatᵀ Qmat, with Pmat (M, P), Qmat (M, Q), reduced over M.

    Split-M (grid axis 2, ``SPLIT > 1``): program ``s`` reduces rows ``[s·chunk, (s+1)·chunk)`` and writes its
    fp32 partial, without alpha, to ``c_ptr + s·P·Q`` (a contiguous (SPLIT, P, Q) buffer); ``_tn_reduce_kernel``
    sums the partials in order (deterministic) and applies alpha."""
    rp = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    rq = (tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    p_ok, q_ok = rp < P, rq < Q
    chunk = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_M) * BLOCK_M  # whole BLOCK_M tiles per slice
    lo = tl.program_id(2) * chunk
    hi = tl.minimum(lo + chunk, M)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = rm < hi
        if HAS_SEL:  # sel_ptr: (M,) bool; never dereferenced when HAS_SEL is off
            m_ok = m_ok & (tl.load(sel_ptr + rm, mask=m_ok, other=0) != 0)
        pt = tl.load(p_ptr + rm[None, :] * stride_pm + rp[:, None] * stride_pp,  # Pᵀ tile (BLOCK_P, BLOCK_M)
                     mask=p_ok[:, None] & m_ok[None, :], other=0.0)
        qt = tl.load(q_ptr + rm[:, None] * stride_qm + rq[None, :] * stride_qq,
                     mask=m_ok[:, None] & q_ok[None, :], other=0.0)
        if UPCAST:
            pt, qt = pt.to(tl.float32), qt.to(tl.float32)
        acc = tl.dot(pt, qt, acc, input_precision=PRECISION)
    mask = p_ok[:, None] & q_ok[None, :]
    if SPLIT > 1:
        part = c_ptr + tl.program_id(2).to(tl.int64) * P * Q
        tl.store(part + rp[:, None] * Q + rq[None, :], acc, mask=mask)
    else:
        tl.store(c_ptr + rp[:, None] * stride_cp + rq[None, :] * stride_cq, (acc * alpha).to(c_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _tn_reduce_kernel(part_ptr, c_ptr, n, SPLIT, alpha, BLOCK: tl.constexpr):
    """c[i] = alpha · Σ_s part[s, i] for the ``n`` elements of a contiguous C, summed in order s = 0, 1, ..."""
    i = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = i < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * n + i, mask=ok, other=0.0)
    tl.store(c_ptr + i, (acc * alpha).to(c_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------- Hopper (sm_90) variants
# The same maths as the kernels above, built the way GEMMs reach the tensor cores' rate on Hopper: operand
# tiles arrive by TMA (host tensor descriptors: a tile load is one UTMALDG that lands in shared memory,
# with out-of-range rows and columns zero-filled, so the main loop has no masks and no address math), the
# dots are warpgroup MMAs (wgmma) fed from shared memory, and the grid is persistent: ``sms * 2`` programs
# walk the work items (row block x group of TILES_PER_PROG column tiles) in the grouped, L2-friendly order
# of ``_grouped_pid``, so the items in flight at one time share their W tiles in L2. The configs keep one
# warpgroup's accumulators within 255 registers (4 warps) or two within 128 (8 warps) so that two CTAs fit
# on an SM: one CTA's epilogue overlaps the other's main loop (compile report: ``ctas_per_sm``).
# Ampere, fp32 and misaligned tensors keep the pointer-load kernels (``_use_tma``).

@triton.jit
def _fwd_mainloop_tma(
    x_desc, xl_desc, w_desc, a_desc, m0, n0, K,
    SHRINK: tl.constexpr, HAS_XL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """K loop of one y tile from descriptor loads: ``x Wᵀ`` and, with SHRINK, ``u = x_lora Aᵀ``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xt = x_desc.load([m0, k0])
        wt = w_desc.load([n0, k0])  # W tile (BLOCK_N, BLOCK_K); the dot takes its transpose from smem
        if UPCAST:
            acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc)
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
        if SHRINK:
            at = a_desc.load([0, k0])  # A tile (BLOCK_R, BLOCK_K); rows past R are zero-filled
            if HAS_XL:
                xlt = xl_desc.load([m0, k0])
            else:
                xlt = xt
            if UPCAST:
                acc_u = tl.dot(xlt.to(tl.float32), tl.trans(at.to(tl.float32)), acc_u)
            else:
                acc_u = tl.dot(xlt, tl.trans(at), acc_u)
    return acc, acc_u


@triton.jit
def _fwd_epilogue_tma(acc, u, m0, n0, scale, inv_scale, b_desc, bias_ptr, y_desc, N,
                      HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, SUBTILE: tl.constexpr):
    """y tile = acc + scale · u Bᵀ + bias, stored by TMA (rows/columns past M/N are clipped by the store).

    The expand accumulates into the main accumulator, ``(acc / scale + u Bᵀ) · scale``: a separate
    ``u Bᵀ`` result would hold a second (BLOCK_M, BLOCK_N) fp32 tile in registers (172 instead of 112
    registers at 128x128, 8 warps: one CTA per SM instead of two). The two fp32 scalings add at most two
    fp32 roundings to a value then rounded to 16 bits (the launcher takes this kernel only for a finite,
    non-zero scale)."""
    bt = b_desc.load([n0, 0])  # B tile (BLOCK_N, BLOCK_R); rank columns past R are zero-filled
    if UPCAST:
        acc = tl.dot(u.to(tl.float32), tl.trans(bt.to(tl.float32)), acc * inv_scale) * scale
    else:
        acc = tl.dot(u, tl.trans(bt), acc * inv_scale) * scale
    if HAS_BIAS:
        rn = n0 + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(y_desc, m0, n0, acc, BLOCK_N, SUBTILE)


@triton.jit
def _store_tile(desc, m0, n0, acc, BLOCK_N: tl.constexpr, SUBTILE: tl.constexpr):
    """TMA store of an fp32 tile rounded to the descriptor's dtype; SUBTILE: as two (rows, BLOCK_N / 2)
    halves (the descriptor's block shape), which halves the shared memory that stages the store."""
    if SUBTILE:
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (acc.shape[0], 2, BLOCK_N // 2)), (0, 2, 1)))
        desc.store([m0, n0], lo.to(desc.dtype))
        desc.store([m0, n0 + BLOCK_N // 2], hi.to(desc.dtype))
    else:
        desc.store([m0, n0], acc.to(desc.dtype))


@triton.jit
def _lora_fwd_tma_kernel(
    x_desc, xl_desc, w_desc, a_desc, b_desc, y_desc, u_desc, bias_ptr,
    M, N, K, R, M_BUCKET, TILES_PER_PROG, scale, inv_scale,
    HAS_XL: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PAD_R: tl.constexpr = True, SUBTILE: tl.constexpr = True,
):
    """``_lora_fwd_kernel`` with TMA loads and stores and a persistent grid (one work item = the tiles one
    program of the pointer kernel owns: a row block and TILES_PER_PROG column tiles sharing one shrink)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_groups = tl.cdiv(num_n, TILES_PER_PROG)
    r_ok = tl.arange(0, BLOCK_R) < R
    for item in range(tl.program_id(0), num_m * num_groups, tl.num_programs(0)):
        pid_m, pid_g = _grouped_pid(item, num_m, num_groups, GROUP_M)
        m0 = pid_m * BLOCK_M
        first = pid_g * TILES_PER_PROG
        acc, acc_u = _fwd_mainloop_tma(x_desc, xl_desc, w_desc, a_desc, m0, first * BLOCK_N, K,
                                       True, HAS_XL, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        if PAD_R:  # as in _lora_fwd_kernel: padding ranks are 0, not x · 0
            u = tl.where(r_ok[None, :], acc_u, 0.0).to(u_desc.dtype)
        else:
            u = acc_u.to(u_desc.dtype)
        if pid_g == 0:
            u_desc.store([m0, 0], u)  # rank columns past R are clipped
        _fwd_epilogue_tma(acc, u, m0, first * BLOCK_N, scale, inv_scale, b_desc, bias_ptr, y_desc, N,
                          HAS_BIAS, UPCAST, BLOCK_N, SUBTILE)
        for t in range(first + 1, tl.minimum(first + TILES_PER_PROG, num_n)):
            acc, _ = _fwd_mainloop_tma(x_desc, xl_desc, w_desc, a_desc, m0, t * BLOCK_N, K,
                                       False, HAS_XL, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
            _fwd_epilogue_tma(acc, u, m0, t * BLOCK_N, scale, inv_scale, b_desc, bias_ptr, y_desc, N,
                              HAS_BIAS, UPCAST, BLOCK_N, SUBTILE)


@triton.jit
def _dx_mainloop_tma(
    dy_desc, w_desc, b_desc, m0, k0, N,
    BASE: tl.constexpr, SHRINK: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """N loop of one dx tile from descriptor loads: ``dy W`` (BASE) and ``dy B`` (SHRINK)."""
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        dyt = dy_desc.load([m0, n0])
        if UPCAST:
            dyt = dyt.to(tl.float32)
        if SHRINK:
            bt = b_desc.load([n0, 0])  # B tile (BLOCK_N, BLOCK_R); rank columns past R are zero-filled
            if UPCAST:
                bt = bt.to(tl.float32)
            acc_g = tl.dot(dyt, bt, acc_g)
        if BASE:
            wt = w_desc.load([n0, k0])  # W tile (BLOCK_N, BLOCK_K)
            if UPCAST:
                wt = wt.to(tl.float32)
            acc = tl.dot(dyt, wt, acc)
    return acc, acc_g


@triton.jit
def _dx_epilogue_tma(acc, g, m0, k0, a_desc, dx_desc, dxl_desc,
                     DX_MODE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, SUBTILE: tl.constexpr):
    """dx tile = acc + g A (mode 1, accumulated into acc) or acc and g A stored apart (mode 2), by TMA."""
    at = a_desc.load([0, k0])  # A tile (BLOCK_R, BLOCK_K); ranks past R are zero-filled
    if UPCAST:
        at = at.to(tl.float32)
        g = g.to(tl.float32)
    if DX_MODE == 1:
        acc = tl.dot(g, at, acc)
    else:
        _store_tile(dxl_desc, m0, k0, tl.dot(g, at), BLOCK_K, SUBTILE)
    _store_tile(dx_desc, m0, k0, acc, BLOCK_K, SUBTILE)


@triton.jit
def _lora_bwd_dx_tma_kernel(
    dy_desc, w_desc, a_desc, b_desc, dx_desc, dxl_desc, g_desc, sel_ptr,
    M, N, K, R, M_BUCKET, TILES_PER_PROG, scale,
    DX_MODE: tl.constexpr, HAS_SEL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SUBTILE: tl.constexpr = True,
):
    """``_lora_bwd_dx_kernel`` with TMA loads and stores and a persistent grid (work item = a row block and
    TILES_PER_PROG K tiles sharing one ``g = scale · dy B``)."""
    num_m = tl.cdiv(M, BLOCK_M)
    if DX_MODE != 0:
        num_k = tl.cdiv(K, BLOCK_K)
        num_groups = tl.cdiv(num_k, TILES_PER_PROG)
    else:
        num_k = 1
        num_groups = 1
    for item in range(tl.program_id(0), num_m * num_groups, tl.num_programs(0)):
        pid_m, pid_g = _grouped_pid(item, num_m, num_groups, GROUP_M)
        m0 = pid_m * BLOCK_M
        first = pid_g * TILES_PER_PROG
        acc, acc_g = _dx_mainloop_tma(dy_desc, w_desc, b_desc, m0, first * BLOCK_K, N, DX_MODE != 0, True,
                                      UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        g = (acc_g * scale).to(g_desc.dtype)
        if pid_g == 0:
            g_desc.store([m0, 0], g)
        if HAS_SEL:  # sel_ptr: (M,) bool; never dereferenced when HAS_SEL is off
            rm = m0 + tl.arange(0, BLOCK_M)
            g = g * tl.load(sel_ptr + rm, mask=rm < M, other=0).to(g.dtype)[:, None]
        if DX_MODE != 0:
            _dx_epilogue_tma(acc, g, m0, first * BLOCK_K, a_desc, dx_desc, dxl_desc, DX_MODE, UPCAST, BLOCK_K,
                             SUBTILE)
            for t in range(first + 1, tl.minimum(first + TILES_PER_PROG, num_k)):
                acc, _ = _dx_mainloop_tma(dy_desc, w_desc, b_desc, m0, t * BLOCK_K, N, True, False,
                                          UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
                _dx_epilogue_tma(acc, g, m0, t * BLOCK_K, a_desc, dx_desc, dxl_desc, DX_MODE, UPCAST, BLOCK_K,
                                 SUBTILE)


# ----------------------------------------------------------------------------------------------- autotuners
# One autotuner per family over the same @triton.jit function (compiled binaries are shared per config).
_FWD = {fam: triton.autotune(configs=autotune_configs(cfgs, _INTERP_FWD), key=["N", "K", "BLOCK_R", "M_BUCKET"])(
    _lora_fwd_kernel) for fam, cfgs in _FWD_FAMILIES.items()}
_DX = {fam: triton.autotune(configs=autotune_configs(cfgs, _INTERP_DX),
                            key=["N", "K", "BLOCK_R", "M_BUCKET", "DX_MODE"])(_lora_bwd_dx_kernel)
       for fam, cfgs in _DX_FAMILIES.items()}
_FWD_TMA = {fam: triton.autotune(configs=autotune_configs(cfgs, _INTERP_FWD_TMA),
                                 key=["N", "K", "BLOCK_R", "M_BUCKET"])(_lora_fwd_tma_kernel)
            for fam, cfgs in _FWD_TMA_FAMILIES.items()}
_DX_TMA = {fam: triton.autotune(configs=autotune_configs(cfgs, _INTERP_DX_TMA),
                                key=["N", "K", "BLOCK_R", "M_BUCKET", "DX_MODE"])(_lora_bwd_dx_tma_kernel)
           for fam, cfgs in _DX_TMA_FAMILIES.items()}
_TN = {fam: triton.autotune(configs=autotune_configs(cfgs, _INTERP_TN), key=["P", "Q", "M_BUCKET", "SPLIT"])(_matmul_tn_kernel)
       for fam, cfgs in _TN_FAMILIES.items()}


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16"


def _family(dtype: torch.dtype, block_r: int) -> tuple[str, int]:
    return _dtype_class(dtype), next(b for b in _RANK_BUCKETS if block_r <= b)


# ----------------------------------------------------------------------------------------------- launchers
def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))  # tl.dot needs every block dimension >= 16


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # PyTorch's fp32 matmul default is IEEE fp32; match it
    return "tf32"  # fp32 with allow_tf32, or ignored for fp16/bf16 operands


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong (NOTES.md)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    # The interpreter also truncates fp32 -> bf16 stores (measured: 2x torch's round-to-nearest error), so
    # there bf16 kernels write fp32 and torch rounds; compiled kernels store bf16 directly (RTNE).
    return torch.float32 if _upcast(dtype) else dtype


def _finish(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: one "SM", so small test shapes still group tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles_per_prog(M: int, n_cols: int, block_m: int, block_n: int, device: torch.device) -> int:
    """How many output tiles along N (fwd) or K (dx) one program takes; see ``tiles_per_prog``."""
    if interpreting():
        return 2  # exercise both the shared-shrink loop and a partial last group at test shapes
    return tiles_per_prog(M, n_cols, block_m, block_n, _sm_count(device))


def _hopper(device: torch.device) -> bool:
    """The Hopper kernels run on sm_90 (H100/H200) only; under the interpreter tests switch them on."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def _tma_ok(t: torch.Tensor) -> bool:
    """A host tensor descriptor needs a 2-D tensor with unit last stride, 16-byte-aligned base and rows."""
    es = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0
            and t.shape[0] > 0 and t.shape[1] > 0)


def _use_tma(dtype: torch.dtype, device: torch.device, *tensors, scale: float = 1.0) -> bool:
    """The Hopper (TMA, persistent) kernels take a launch on sm_90, for fp16/bf16 (fp32's IEEE dots keep
    the pointer kernels), a finite non-zero scale, and tensors a descriptor can address; else pointer loads."""
    if dtype not in (torch.float16, torch.bfloat16) or not (scale != 0 and abs(scale) != float("inf")):
        return False
    if not (_hopper(device) or _FORCE_TMA):
        return False
    return all(_tma_ok(t) for t in tensors)


_FORCE_TMA = False  # tests: run the Hopper kernels under the interpreter (it executes tensor descriptors)


def _desc(t: torch.Tensor):
    """A host TensorDescriptor of ``t``; its block shape is set per config by the autotuner's pre-hook."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])  # placeholder: the hook sets it


def _persistent_grid(items: int, device: torch.device) -> int:
    return max(1, min(items, PERSISTENT_CTAS_PER_SM * _sm_count(device)))


def supports(dtype: torch.dtype, R: int) -> str | None:
    """None when these kernels take the call, else why not (the registry's ``supports``)."""
    if dtype not in _DTYPES:
        return f"dtype {dtype} (Triton LoRA kernels take fp32, fp16, bf16)"
    if R > MAX_RANK:
        return f"rank {R} > {MAX_RANK} (BLOCK_R holds the whole rank)"
    return None


def lora_fwd(x, x_lora, weight, bias, lora_a, lora_b, scale: float):
    """y = x Wᵀ + bias + scale · (x_lora Aᵀ) Bᵀ and u = x_lora Aᵀ; x_lora=None reuses x's tiles."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    odt = _out_dtype(x.dtype)
    y = empty_out((M, N), like=x, dtype=odt)
    u = empty_out((M, R), like=x, dtype=odt)
    if M == 0 or N == 0:
        return _finish(y, x.dtype), _finish(u, x.dtype)
    xl = x if x_lora is None else x_lora
    dummy = x  # never dereferenced when its HAS_* flag is off
    BR = _block_r(R)
    if _use_tma(x.dtype, x.device, x, xl, weight, lora_a, lora_b, y, u, scale=float(scale)):
        _lora_fwd_hopper(x, xl, x_lora is not None, weight, bias, lora_a, lora_b, y, u, float(scale), BR)
        return _finish(y, x.dtype), _finish(u, x.dtype)
    fam = _family(x.dtype, BR)
    first = _FWD_FAMILIES[fam][0].kwargs
    tpp = _tiles_per_prog(M, N, first["BLOCK_M"], first["BLOCK_N"], x.device)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), tpp),)
    _FWD[fam][grid](
        x, xl, weight, bias if bias is not None else dummy, lora_a, lora_b, y, u,
        M, N, K, R, triton.next_power_of_2(M), tpp, float(scale),
        x.stride(0), x.stride(1), xl.stride(0), xl.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        y.stride(0), y.stride(1), u.stride(0), u.stride(1),
        HAS_XL=x_lora is not None, HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype),
        PRECISION=_precision(x.dtype), BLOCK_R=BR, PAD_R=R < BR,
    )
    return _finish(y, x.dtype), _finish(u, x.dtype)


def _lora_fwd_hopper(x, xl, has_xl, weight, bias, lora_a, lora_b, y, u, scale, BR):
    """``lora_fwd`` by ``_lora_fwd_tma_kernel``: persistent grid of ``2 × SMs`` programs at most."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    bucket = next(b for b in _RANK_BUCKETS if BR <= b)
    first = _FWD_TMA_FAMILIES[bucket][0].kwargs
    tpp = _tiles_per_prog(M, N, first["BLOCK_M"], first["BLOCK_N"], x.device)
    grid = lambda meta: (_persistent_grid(  # noqa: E731
        triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), tpp), x.device),)
    _FWD_TMA[bucket][grid](
        _desc(x), _desc(xl), _desc(weight), _desc(lora_a), _desc(lora_b), _desc(y), _desc(u),
        bias if bias is not None else x, M, N, K, R, triton.next_power_of_2(M), tpp, scale, 1.0 / scale,
        HAS_XL=has_xl, HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype), BLOCK_R=BR, PAD_R=R < BR,
    )


def matmul_tn(p, q, alpha: float, out_dtype=None, selected=None):
    """C = alpha · pᵀ q for p (M, P), q (M, Q); fp32 accumulation; with ``selected (M,) bool`` the sum runs
    over the selected rows only (the others are never read)."""
    M, P = p.shape
    Q = q.shape[1]
    dtype = out_dtype or p.dtype
    c = empty_out((P, Q), like=p, dtype=_out_dtype(dtype))
    if M == 0:
        return _finish(c.zero_(), dtype)
    cls = _dtype_class(p.dtype)
    split = _tn_split(M, P, Q, cls, p.device)
    # split > 1: fp32 partials (split, P, Q), summed in order by _tn_reduce_kernel
    out = c if split == 1 else torch.empty((split, P, Q), dtype=torch.float32, device=p.device)
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(Q, meta["BLOCK_Q"]), split)  # noqa: E731
    _TN[cls][grid](
        p, q, out, selected if selected is not None else p, M, P, Q, triton.next_power_of_2(M), split, float(alpha),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), c.stride(0), c.stride(1),
        HAS_SEL=selected is not None, UPCAST=_upcast(p.dtype), PRECISION=_precision(p.dtype),
    )
    if split > 1:
        n = P * Q
        _tn_reduce_kernel[(triton.cdiv(n, _TN_REDUCE_BLOCK),)](out, c, n, split, float(alpha),
                                                              BLOCK=_TN_REDUCE_BLOCK, num_warps=4)
    return _finish(c, dtype)


_TN_REDUCE_BLOCK = 1024


def _tn_split(M: int, P: int, Q: int, cls: str, device: torch.device) -> int:
    """Split-M slices of ``matmul_tn`` (``tn_split``: the grid fills every SM); the interpreter splits any
    reduction longer than one BLOCK_M in two, so tests run the partials and their reduction."""
    if interpreting():
        return 2 if M > _INTERP_TN.kwargs["BLOCK_M"] else 1
    first = _TN_FAMILIES[cls][0].kwargs
    return tn_split(M, P, Q, first["BLOCK_P"], first["BLOCK_Q"], _sm_count(device))


def bwd_dx(dy, weight, lora_a, lora_b, scale: float, dx_mode: int, selected=None):
    """One ``_lora_bwd_dx_kernel`` launch: ``(dx, dx_lora, g)`` with ``g = scale · dy B`` (every row); with
    ``selected (M,) bool`` the ``g A`` term of dx is applied to selected rows only."""
    M, N = dy.shape
    K, R = weight.shape[1], lora_a.shape[0]
    odt = _out_dtype(dy.dtype)
    g = empty_out((M, R), like=dy, dtype=odt)
    # outputs that are not computed are distinct empty tensors (custom-op outputs may not alias)
    dx = empty_out((M, K) if dx_mode else (0,), like=dy, dtype=odt)
    dxl = empty_out((M, K) if dx_mode == 2 else (0,), like=dy, dtype=odt)
    if M > 0 and N == 0:  # empty reduction
        for t in (g, dx, dxl):
            t.zero_()
    elif M > 0 and _use_tma(dy.dtype, dy.device, dy, weight, lora_a, lora_b, g, *((dx,) if dx_mode else ()),
                            *((dxl,) if dx_mode == 2 else ()), scale=1.0):
        _lora_bwd_dx_hopper(dy, weight, lora_a, lora_b, dx, dxl, g, selected, float(scale), dx_mode)
    elif M > 0:
        BR = _block_r(R)
        fam = _family(dy.dtype, BR)
        first = _DX_FAMILIES[fam][0].kwargs
        tpp = _tiles_per_prog(M, K, first["BLOCK_M"], first["BLOCK_K"], dy.device) if dx_mode else 1
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(M, meta["BLOCK_M"]) * (triton.cdiv(triton.cdiv(K, meta["BLOCK_K"]), tpp) if dx_mode else 1),)
        _DX[fam][grid](
            dy, weight, lora_a, lora_b, dx if dx_mode else g, dxl if dx_mode == 2 else g, g,
            selected if selected is not None else g,  # never dereferenced without HAS_SEL
            M, N, K, R, triton.next_power_of_2(M), tpp, float(scale),
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
            lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
            dx.stride(0) if dx_mode else 0, dx.stride(1) if dx_mode else 0,
            dxl.stride(0) if dx_mode == 2 else 0, dxl.stride(1) if dx_mode == 2 else 0,
            g.stride(0), g.stride(1),
            DX_MODE=int(dx_mode), HAS_SEL=selected is not None, UPCAST=_upcast(dy.dtype),
            PRECISION=_precision(dy.dtype),
            BLOCK_R=BR,
        )
    return _finish(dx, dy.dtype), _finish(dxl, dy.dtype), _finish(g, dy.dtype)


def _lora_bwd_dx_hopper(dy, weight, lora_a, lora_b, dx, dxl, g, selected, scale, dx_mode):
    """``bwd_dx`` by ``_lora_bwd_dx_tma_kernel``: persistent grid of ``2 × SMs`` programs at most."""
    M, N = dy.shape
    K, R = weight.shape[1], lora_a.shape[0]
    BR = _block_r(R)
    bucket = next(b for b in _RANK_BUCKETS if BR <= b)
    first = _DX_TMA_FAMILIES[bucket][0].kwargs
    tpp = _tiles_per_prog(M, K, first["BLOCK_M"], first["BLOCK_K"], dy.device) if dx_mode else 1
    grid = lambda meta: (_persistent_grid(  # noqa: E731
        triton.cdiv(M, meta["BLOCK_M"]) * (triton.cdiv(triton.cdiv(K, meta["BLOCK_K"]), tpp) if dx_mode else 1),
        dy.device),)
    # outputs not computed get descriptors of g (never dereferenced: DX_MODE removes their stores); each
    # argument its own descriptor object, since the pre-hook sets every block shape
    _DX_TMA[bucket][grid](
        _desc(dy), _desc(weight), _desc(lora_a), _desc(lora_b), _desc(dx if dx_mode else g),
        _desc(dxl if dx_mode == 2 else g), _desc(g), selected if selected is not None else g,
        M, N, K, R, triton.next_power_of_2(M), tpp, scale,
        DX_MODE=int(dx_mode), HAS_SEL=selected is not None, UPCAST=_upcast(dy.dtype), BLOCK_R=BR,
    )


def lora_bwd(dy, x_lora, u, weight, lora_a, lora_b, scale: float, dx_mode: int):
    """(dx, dx_lora, dA, dB) of the fallback contract (``pyfastpeft.lora.torch_impl.bwd``); an ``x_lora`` of
    shape ``(0,)`` (A frozen) skips dA, and the dx kernel too when no dx is wanted."""
    if x_lora.dim() == 1:
        empty = lambda: empty_out((0,), like=dy)  # noqa: E731  (custom-op outputs may not alias each other)
        dx, dxl = bwd_dx(dy, weight, lora_a, lora_b, scale, dx_mode)[:2] if dx_mode else (empty(), empty())
        return dx, dxl, empty(), matmul_tn(dy, u, scale)
    dx, dxl, g = bwd_dx(dy, weight, lora_a, lora_b, scale, dx_mode)  # g is rounded like PyTorch's
    da = matmul_tn(g, x_lora, 1.0)
    db = matmul_tn(dy, u, scale)
    return dx, dxl, da, db


# ----------------------------------------------------------------------------------------------- AOT specs
def _spec(name, kernel, ptrs, ints, strides, unit, cx, cfg, ty):
    """One AOTSpec as a real launch on contiguous tensors specialises it: unit strides become the
    constant 1, and sizes / leading strides are marked divisible by 16 (the JIT does both at launch)."""
    sig = {n: f"*{ty}" for n in ptrs}
    sig.update({n: "i32" for n in ints + strides})
    sig.update({n: "fp32" for n in ("scale", "inv_scale", "alpha") if n in kernel.arg_names})
    sig.update({n: "constexpr" for n in cx})
    consts = dict(cx, **{n: 1 for n in unit})
    div16 = [n for n in ints + strides if n not in unit and n not in ("M", "R", "P", "TILES_PER_PROG", "SPLIT")]
    return AOTSpec(name, kernel, sig, consts, cfg.num_warps, cfg.num_stages, meta={"divisible_by_16": div16})


def _fwd_spec(ty, prec, BR, cfg):
    kw = cfg.kwargs
    return _spec(
        f"lora_fwd/{ty}/r{BR}/{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}", _lora_fwd_kernel,
        ["x_ptr", "xl_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "y_ptr", "u_ptr"],
        ["M", "N", "K", "R", "M_BUCKET", "TILES_PER_PROG"],
        ["stride_xm", "stride_xk", "stride_xlm", "stride_xlk", "stride_wn", "stride_wk", "stride_ar",
         "stride_ak", "stride_bn", "stride_br", "stride_ym", "stride_yn", "stride_um", "stride_ur"],
        ["stride_xk", "stride_xlk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_ur"],
        dict(HAS_XL=False, HAS_BIAS=True, UPCAST=False, PRECISION=prec, BLOCK_R=BR, PAD_R=False, **kw), cfg, ty)


def _dx_spec(ty, prec, BR, cfg, has_sel=False):
    kw = cfg.kwargs
    spec = _spec(
        f"lora_bwd_dx/{ty}/r{BR}/{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}" + ("/sel" if has_sel else ""),
        _lora_bwd_dx_kernel, ["dy_ptr", "w_ptr", "a_ptr", "b_ptr", "dx_ptr", "dxl_ptr", "g_ptr", "sel_ptr"],
        ["M", "N", "K", "R", "M_BUCKET", "TILES_PER_PROG"],
        ["stride_dym", "stride_dyn", "stride_wn", "stride_wk", "stride_ar", "stride_ak", "stride_bn",
         "stride_br", "stride_dxm", "stride_dxk", "stride_dxlm", "stride_dxlk", "stride_gm", "stride_gr"],
        ["stride_dyn", "stride_wk", "stride_ak", "stride_br", "stride_dxk", "stride_dxlk", "stride_gr"],
        dict(DX_MODE=1, HAS_SEL=has_sel, UPCAST=False, PRECISION=prec, BLOCK_R=BR, **kw), cfg, ty)
    if has_sel:  # the selection is a bool vector: Triton's *i1
        spec.signature["sel_ptr"] = "*i1"
    return spec


def _tn_spec(ty, prec, cfg, has_sel=False, split=True):
    """``split``: the split-M kernel (SPLIT > 1 at launch: fp32 partials); else SPLIT = 1, which the JIT
    compiles as a constant (one slice, alpha and rounding in the kernel)."""
    kw = cfg.kwargs
    spec = _spec(
        f"matmul_tn/{ty}/{kw['BLOCK_P']}x{kw['BLOCK_Q']}x{kw['BLOCK_M']}" + ("/sel" if has_sel else "")
        + ("" if split else "/nosplit"),
        _matmul_tn_kernel, ["p_ptr", "q_ptr", "c_ptr", "sel_ptr"], ["M", "P", "Q", "M_BUCKET", "SPLIT"],
        ["stride_pm", "stride_pp", "stride_qm", "stride_qq", "stride_cp", "stride_cq"],
        ["stride_pp", "stride_qq", "stride_cq"] + ([] if split else ["SPLIT"]),
        dict(HAS_SEL=has_sel, UPCAST=False, PRECISION=prec, **kw), cfg, ty)
    if has_sel:
        spec.signature["sel_ptr"] = "*i1"
    if split:
        spec.signature["c_ptr"] = "*fp32"  # the partials
    return spec


def _tma_spec(name, kernel, descs, ptrs, ints, strides, unit, cx, cfg, ty):
    """An AOTSpec of a Hopper kernel: ``descs`` maps each descriptor argument to its block shape (Triton's
    ``tensordesc<dtype[rows, cols]>`` signature, as a launch with a host TensorDescriptor of that block shape
    is compiled); the other arguments as :func:`_spec`. Only for sm_90a (``meta["archs"]``)."""
    spec = _spec(name, kernel, ptrs, ints, strides, unit, cx, cfg, ty)
    spec.signature.update({d: f"tensordesc<{ty}[{rows},{cols}]>" for d, (rows, cols) in descs.items()})
    spec.meta["archs"] = ("sm_90a",)
    return spec


def _fwd_tma_spec(ty, BR, cfg):
    kw = cfg.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    return _tma_spec(
        f"lora_fwd_tma/{ty}/r{BR}/{bm}x{bn}x{bk}/w{cfg.num_warps}", _lora_fwd_tma_kernel,
        {"x_desc": (bm, bk), "xl_desc": (bm, bk), "w_desc": (bn, bk), "a_desc": (BR, bk), "b_desc": (bn, BR),
         "y_desc": (bm, bn // 2), "u_desc": (bm, BR)},
        ["bias_ptr"], ["M", "N", "K", "R", "M_BUCKET", "TILES_PER_PROG"], [], [],
        dict(HAS_XL=False, HAS_BIAS=True, UPCAST=False, BLOCK_R=BR, PAD_R=False, **kw), cfg, ty)


def _dx_tma_spec(ty, BR, cfg, has_sel=False):
    kw = cfg.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    spec = _tma_spec(
        f"lora_bwd_dx_tma/{ty}/r{BR}/{bm}x{bn}x{bk}/w{cfg.num_warps}" + ("/sel" if has_sel else ""),
        _lora_bwd_dx_tma_kernel,
        {"dy_desc": (bm, bn), "w_desc": (bn, bk), "a_desc": (BR, bk), "b_desc": (bn, BR), "dx_desc": (bm, bk // 2),
         "dxl_desc": (bm, bk // 2), "g_desc": (bm, BR)},
        ["sel_ptr"], ["M", "N", "K", "R", "M_BUCKET", "TILES_PER_PROG"], [], [],
        dict(DX_MODE=1, HAS_SEL=has_sel, UPCAST=False, BLOCK_R=BR, **kw), cfg, ty)
    if has_sel:
        spec.signature["sel_ptr"] = "*i1"
    return spec


def _aot_specs() -> list[AOTSpec]:
    """Every config of every family, as launched: 16-bit families as bf16 (fp16: the r<=32 family only,
    same code), fp32 families as fp32 with IEEE dots; the r<=32 bucket at both BLOCK_R=16 and 32."""
    specs = []
    for ty, cls, prec in (("bf16", "16", "tf32"), ("fp16", "16", "tf32"), ("fp32", "fp32", "ieee")):
        buckets = _RANK_BUCKETS[:1] if ty == "fp16" else _RANK_BUCKETS
        for bucket in buckets:
            for BR in ((16, 32) if bucket == 32 else (bucket,)):
                specs += [_fwd_spec(ty, prec, BR, cfg) for cfg in _FWD_FAMILIES[cls, bucket]]
                specs += [_dx_spec(ty, prec, BR, cfg) for cfg in _DX_FAMILIES[cls, bucket]]
                if ty != "fp16":  # token-selective LoRA's variant (selected rows only in the g A term)
                    specs += [_dx_spec(ty, prec, BR, cfg, has_sel=True) for cfg in _DX_FAMILIES[cls, bucket]]
        specs += [_tn_spec(ty, prec, cfg) for cfg in _TN_FAMILIES[cls]]
        specs += [_tn_spec(ty, prec, _TN_FAMILIES[cls][0], split=False)]
        specs.append(_spec(f"tn_reduce/{ty}/{_TN_REDUCE_BLOCK}", _tn_reduce_kernel, ["c_ptr"], ["n", "SPLIT"], [], [],
                           dict(BLOCK=_TN_REDUCE_BLOCK), triton.Config({}, num_warps=4, num_stages=1), ty))
        specs[-1].signature["part_ptr"] = "*fp32"
        if ty != "fp16":  # token-selective LoRA's dA / dB over selected rows
            specs += [_tn_spec(ty, prec, cfg, has_sel=True) for cfg in _TN_FAMILIES[cls]]
    for bucket in _RANK_BUCKETS:  # Hopper variants (sm_90a only), bf16 (fp16 is the same code)
        for BR in ((16, 32) if bucket == 32 else (bucket,)):
            specs += [_fwd_tma_spec("bf16", BR, cfg) for cfg in _FWD_TMA_FAMILIES[bucket]]
            specs += [_dx_tma_spec("bf16", BR, cfg) for cfg in _DX_TMA_FAMILIES[bucket]]
            specs += [_dx_tma_spec("bf16", BR, cfg, has_sel=True) for cfg in _DX_TMA_FAMILIES[bucket][:1]]
    return specs


AOT_SPECS = _aot_specs()
