"""Token-selective LoRA (TS-PEFT) kernels (Triton): the ``triton`` backend of ``gated_lora_linear_fwd/bwd``.

Maths: ``docs/token_selective.md``. 2-D ``x (M, K)``, ``W (N, K)``, ``A (R, K)``, ``B (N, R)``.

* ``_gated_fwd_kernel``: the LoRA forward's main loop (``x Wᵀ`` and the shrink ``u = x_lora Aᵀ`` from the
  same x tiles, ``TILES_PER_PROG`` N tiles per program sharing one shrink), but its epilogue writes
  ``y = h + bias`` and the partial row sums of ``h²`` of its tiles (``hsq (G, M)`` fp32, one row per program
  group): the norms of the frozen output come out of the base GEMM, and ``h`` is never re-read.
  On sm_90 (fp16/bf16, descriptor-addressable tensors) ``_gated_fwd_tma_kernel`` does the same with the LoRA
  forward's TMA main loop and a persistent grid (``lora_linear._use_tma``).
* ``_gate_kernel`` (row blocks): ``‖m_i‖² = s² u_iᵀ (BᵀB) u_i`` from ``u`` and the ``R x R`` Gram of B,
  ``r_i = ‖m_i‖ / max(‖h_i‖, ε)``, ``S_i = r_i ≥ max(τ, 0)``; then ``_compact_kernel`` (one program, one
  byte per row) writes the stable compaction of the selected row indices (in-block prefix sums plus a
  running count; the count stays on the device). With a budget (``target_fraction = p``) the threshold is
  ``max(τ, 0, t_p)``, ``t_p`` the ``(1 − p)`` quantile of the batch's ratios (``torch.kthvalue`` on the device),
  and the flags are recomputed against it before the compaction.
* ``_gated_expand_kernel``: ``y_i += s · u_i Bᵀ`` for ``i`` in the compacted list, gathered by index (as
  vLLM's LoRA kernels gather their sorted tokens): programs past the count return at once, so the
  expand's work and traffic are ∝ the selected rows.
* backward: the LoRA dx kernel with ``HAS_SEL`` (``dx = dy W + (S ⊙ g) A`` in one GEMM over the
  concatenated reduction, ``g = s · dy B`` stored for every row), then ``dA = (S ⊙ g)ᵀ x_lora`` and
  ``dB = s · dyᵀ (S ⊙ u)`` with the LoRA reduction kernel over selected rows only (unselected rows of x and
  dy are never read), and the τ surrogate gradient (the scale-free window) from ``g · u`` (``(M, R)``
  tensors) via ``pyfastpeft.lora.gate.finish_gate``.

Not fused yet: the backward's kernels still take the selection as per-row flags (programs run over every
row block; unselected rows move no bytes, but their programs run) rather than the compacted list; the
Gram ``BᵀB`` is a torch matmul on ``(N, R)``; gate and compaction are two launches (the compaction is
one program: 8 KB of flags at M = 8192, but it grows linearly with M). Limits as the LoRA kernels: ``R <= 128``,
fp32/fp16/bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.lora.gate import EPS, effective_threshold, finish_gate, gram as _gram
from pyfastpeft.triton_kernels.lora import lora_linear as _lk
from pyfastpeft.core.triton_config import AOTSpec, autotune_configs, interpreting
from pyfastpeft.core.cost import cdiv as _cdiv

supports = _lk.supports


@triton.jit
def _gated_epilogue(acc, hsq, rm, rn, m_ok, n_ok, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    """Store y = h + bias for one tile; return hsq plus the tile's row sums of h² (h as stored, rounded; the
    columns past N are x · 0, NaN for an inf in x: they are left out)."""
    hf = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
    hsq += tl.sum(tl.where(n_ok[None, :], hf * hf, 0.0), axis=1)
    if HAS_BIAS:
        hf += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, hf.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    return hsq


@triton.jit
def _gated_fwd_kernel(
    x_ptr, xl_ptr, w_ptr, bias_ptr, a_ptr, y_ptr, u_ptr, hsq_ptr,
    M, N, K, R, M_BUCKET, TILES_PER_PROG,
    stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn, stride_wk,
    stride_ar, stride_ak, stride_ym, stride_yn, stride_um, stride_ur,
    HAS_XL: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_g = _lk._grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(num_n, TILES_PER_PROG),
                                    GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    m_ok, r_ok = rm < M, rr < R
    hsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first = pid_g * TILES_PER_PROG
    # first tile (peeled, as in the LoRA forward): also the shrink, stored by the first group
    rn = (first * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = rn < N
    acc, acc_u = _lk._fwd_mainloop(x_ptr, xl_ptr, w_ptr, a_ptr, rm, rn, rr, m_ok, n_ok, r_ok, K,
                                   stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn, stride_wk,
                                   stride_ar, stride_ak, True, HAS_XL, UPCAST, PRECISION,
                                   BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    if pid_g == 0:
        tl.store(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur, acc_u.to(u_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & r_ok[None, :])
    hsq = _gated_epilogue(acc, hsq, rm, rn, m_ok, n_ok, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS)
    for t in range(first + 1, tl.minimum(first + TILES_PER_PROG, num_n)):
        rn = (t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = rn < N
        acc, _ = _lk._fwd_mainloop(x_ptr, xl_ptr, w_ptr, a_ptr, rm, rn, rr, m_ok, n_ok, r_ok, K,
                                   stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn, stride_wk,
                                   stride_ar, stride_ak, False, HAS_XL, UPCAST, PRECISION,
                                   BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        hsq = _gated_epilogue(acc, hsq, rm, rn, m_ok, n_ok, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS)
    tl.store(hsq_ptr + pid_g * M + rm, hsq, mask=m_ok)


@triton.jit
def _gated_fwd_tma_kernel(
    x_desc, xl_desc, w_desc, a_desc, y_desc, u_desc, bias_ptr, hsq_ptr,
    M, N, K, R, M_BUCKET, TILES_PER_PROG,
    HAS_XL: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SUBTILE: tl.constexpr = True,
):
    """``_gated_fwd_kernel`` on Hopper: the LoRA forward's TMA main loop (``lora_linear._fwd_mainloop_tma``),
    a persistent grid over the same work items, ``y = h + bias`` stored by TMA, the ``h²`` row sums as before."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_groups = tl.cdiv(num_n, TILES_PER_PROG)
    for item in range(tl.program_id(0), num_m * num_groups, tl.num_programs(0)):
        pid_m, pid_g = _lk._grouped_pid(item, num_m, num_groups, GROUP_M)
        m0 = pid_m * BLOCK_M
        first = pid_g * TILES_PER_PROG
        hsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc, acc_u = _lk._fwd_mainloop_tma(x_desc, xl_desc, w_desc, a_desc, m0, first * BLOCK_N, K, True, HAS_XL,
                                           UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        if pid_g == 0:
            u_desc.store([m0, 0], acc_u.to(u_desc.dtype))  # rank columns past R are clipped
        hsq = _gated_epilogue_tma(acc, hsq, m0, first * BLOCK_N, N, bias_ptr, y_desc, HAS_BIAS, BLOCK_N, SUBTILE)
        for t in range(first + 1, tl.minimum(first + TILES_PER_PROG, num_n)):
            acc, _ = _lk._fwd_mainloop_tma(x_desc, xl_desc, w_desc, a_desc, m0, t * BLOCK_N, K, False, HAS_XL,
                                           UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
            hsq = _gated_epilogue_tma(acc, hsq, m0, t * BLOCK_N, N, bias_ptr, y_desc, HAS_BIAS, BLOCK_N, SUBTILE)
        rm = m0 + tl.arange(0, BLOCK_M)
        tl.store(hsq_ptr + pid_g * M + rm, hsq, mask=rm < M)


@triton.jit
def _gated_epilogue_tma(acc, hsq, m0, n0, N, bias_ptr, y_desc, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                        SUBTILE: tl.constexpr):
    """As ``_gated_epilogue``, with the store by TMA (rows and columns past M, N clipped)."""
    rn = n0 + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    hf = acc.to(y_desc.dtype).to(tl.float32)
    hsq += tl.sum(tl.where(n_ok[None, :], hf * hf, 0.0), axis=1)
    if HAS_BIAS:
        hf += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    _lk._store_tile(y_desc, m0, n0, hf, BLOCK_N, SUBTILE)
    return hsq


@triton.jit
def _gate_kernel(
    u_ptr, g_ptr, hsq_ptr, tau_ptr, ratio_ptr, sel_ptr, M, R, G, scale,
    stride_um, stride_ur, EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """The gate of one row block: ``‖m_i‖`` from ``u_i`` and the Gram ``BᵀB`` (``g_ptr``, R x R fp32),
    ``‖h_i‖`` from the ``G`` partial sums of ``h²``, ``r_i`` and ``S_i = r_i ≥ max(τ, 0)`` (all fp32; a NaN
    ratio stays NaN and is not selected, as in torch)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok, r_ok = rm < M, rr < R
    u_rows = u_ptr + rm.to(tl.int64)[:, None] * stride_um
    u = tl.load(u_rows + rr[None, :] * stride_ur, mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    q = tl.zeros((BLOCK_M,), dtype=tl.float32)  # u_iᵀ (BᵀB) u_i, BLOCK_J Gram columns at a time (no spills)
    for j0 in range(0, R, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        j_ok = rj < R
        gram = tl.load(g_ptr + rr[:, None] * R + rj[None, :], mask=r_ok[:, None] & j_ok[None, :], other=0.0)
        u_j = tl.load(u_rows + rj[None, :] * stride_ur, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        q += tl.sum(tl.dot(u, gram, input_precision="ieee") * u_j.to(tl.float32), axis=1)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for g in range(0, G):
        ss += tl.load(hsq_ptr + g * M + rm, mask=m_ok, other=0.0)
    # NaN-propagating maxima (tl.maximum's default, like fmaxf, returns the other operand for a NaN): a row with
    # a NaN in u or h gets a NaN ratio, as in torch, and NaN >= t is false: never selected (nor with a NaN tau)
    ratio = tl.sqrt(tl.maximum(scale * scale * q, 0.0, propagate_nan=tl.PropagateNan.ALL)) / \
        tl.maximum(tl.sqrt(ss), EPS, propagate_nan=tl.PropagateNan.ALL)
    sel = ratio >= tl.maximum(tl.load(tau_ptr).to(tl.float32), 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(ratio_ptr + rm, ratio, mask=m_ok)
    tl.store(sel_ptr + rm, sel.to(tl.uint8), mask=m_ok)


@triton.jit
def _compact_kernel(sel_ptr, idx_ptr, cnt_ptr, M, BLOCK: tl.constexpr):
    """Stable compaction in one program (grid (1,)): the selected row indices in increasing order (an
    in-block prefix sum plus the running count), then the count. Reads one byte per row."""
    count = tl.zeros((), dtype=tl.int32)
    for m0 in range(0, M, BLOCK):
        rm = m0 + tl.arange(0, BLOCK)
        s32 = tl.load(sel_ptr + rm, mask=rm < M, other=0).to(tl.int32)
        tl.store(idx_ptr + count + tl.cumsum(s32, axis=0) - 1, rm, mask=s32 != 0)
        count += tl.sum(s32, axis=0)
    tl.store(cnt_ptr, count)


@triton.jit
def _gated_expand_kernel(
    y_ptr, u_ptr, b_ptr, idx_ptr, cnt_ptr, N, R, scale,
    stride_ym, stride_yn, stride_um, stride_ur, stride_bn, stride_br,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[i, cols] += scale · u_i Bᵀ for the selected rows i = idx[j], j in this program's slice of the
    compacted list (in place). Programs past the count return at once: the work is ∝ the selected rows."""
    j = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    count = tl.load(cnt_ptr)
    if tl.program_id(0) * BLOCK_M >= count:
        return
    j_ok = j < count
    rm = tl.load(idx_ptr + j, mask=j_ok, other=0).to(tl.int64)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    n_ok, r_ok = rn < N, rr < R
    u = tl.load(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur, mask=j_ok[:, None] & r_ok[None, :],
                other=0.0)
    if PRECISION == "ieee":  # fp32 FMA dots: R rank-1 updates (see lora_linear._rank1_expand)
        upd = _lk._rank1_expand(u, rr, b_ptr + rn * stride_bn, stride_br, n_ok, R, BLOCK_N)
    else:
        bt = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if UPCAST:
            upd = tl.dot(u.to(tl.float32), bt.to(tl.float32), input_precision=PRECISION)
        else:
            upd = tl.dot(u, bt, input_precision=PRECISION)
    mask = j_ok[:, None] & n_ok[None, :]
    ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (y + scale * upd).to(y_ptr.dtype.element_ty), mask=mask)


# The forward uses the LoRA forward's config families (same main loop), per exact BLOCK_R, less the configs
# whose extra row-norm accumulator spills (compile report).
_SPILLS = {("16", 32, (128, 128, 64)), ("16", 64, (64, 64, 64)), ("fp32", 16, (32, 64, 32)),
           ("fp32", 32, (32, 64, 32)), ("fp32", 128, (128, 64, 16))}
_FWD_FAMILIES = {
    (cls, br): [c for c in cfgs if (cls, br, (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))
                not in _SPILLS]
    for (cls, bucket), cfgs in _lk._FWD_FAMILIES.items() for br in ((16, 32) if bucket == 32 else (bucket,))}
_FWD = {fam: triton.autotune(configs=autotune_configs(cfgs, _lk._INTERP_FWD), key=["N", "K", "BLOCK_R", "M_BUCKET"])(
    _gated_fwd_kernel) for fam, cfgs in _FWD_FAMILIES.items()}


def _gated_tma_hook(nargs):
    bm, bn, bk, br = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["BLOCK_R"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["xl_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["a_desc"].block_shape = [br, bk]
    nargs["y_desc"].block_shape = [bm, bn // 2]  # SUBTILE
    nargs["u_desc"].block_shape = [bm, br]


# Hopper (sm_90) forward: the LoRA forward's Hopper tile shapes, by rank bucket, less 128x128x32 (8 warps, 4
# stages), whose h² row sums take it to 136 registers: one CTA per SM (compile report). The rest fit two.
_FWD_TMA_FAMILIES = {bucket: [_lk._tma_cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                           c.num_stages, _gated_tma_hook) for c in cfgs
                              if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) != (128, 128, 32)]
                     for bucket, cfgs in _lk._FWD_TMA_FAMILIES.items()}
_FWD_TMA = {b: triton.autotune(configs=autotune_configs(cfgs, _lk._tma_cfg(16, 32, 32, 1, 1, _gated_tma_hook)),
                               key=["N", "K", "BLOCK_R", "M_BUCKET"])(_gated_fwd_tma_kernel)
            for b, cfgs in _FWD_TMA_FAMILIES.items()}
_EXPAND_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=1)
                   for bm, bn, w in ((64, 128, 4), (32, 128, 8), (64, 64, 4))]
_INTERP_EXPAND = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=1, num_stages=1)
_EXPAND = triton.autotune(configs=autotune_configs(_EXPAND_CONFIGS, _INTERP_EXPAND), key=["N", "BLOCK_R"])(
    _gated_expand_kernel)


def gated_base(x, x_lora, weight, bias, lora_a):
    """One ``_gated_fwd_kernel`` launch: ``y = x Wᵀ + bias`` (io dtype, or fp32 under the interpreter for
    bf16), ``u = x_lora Aᵀ`` and ``hsq (G, M)`` fp32, the per-group partial row sums of ``h²``."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    odt = _lk._out_dtype(x.dtype)
    y = empty_out((M, N), like=x, dtype=odt)
    u = empty_out((M, R), like=x, dtype=odt)
    BR = _lk._block_r(R)
    xl = x if x_lora is None else x_lora
    if _lk._use_tma(x.dtype, x.device, x, xl, weight, lora_a, y, u):
        return _gated_base_hopper(x, xl, x_lora is not None, weight, bias, lora_a, y, u, BR)
    fam = (_lk._dtype_class(x.dtype), BR)
    first = _FWD_FAMILIES[fam][0].kwargs
    tpp = _lk._tiles_per_prog(M, N, first["BLOCK_M"], first["BLOCK_N"], x.device)
    groups = max(_cdiv(_cdiv(N, c.kwargs["BLOCK_N"]), tpp) for c in _FWD[fam].configs)
    hsq = torch.zeros((groups, M), dtype=torch.float32, device=x.device)  # groups the chosen config skips stay 0
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), tpp),)
    _FWD[fam][grid](
        x, xl, weight, bias if bias is not None else x, lora_a, y, u, hsq,  # bias: dummy x never read
        M, N, K, R, triton.next_power_of_2(M), tpp,
        x.stride(0), x.stride(1), xl.stride(0), xl.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), y.stride(0), y.stride(1), u.stride(0), u.stride(1),
        HAS_XL=x_lora is not None, HAS_BIAS=bias is not None, UPCAST=_lk._upcast(x.dtype),
        PRECISION=_lk._precision(x.dtype), BLOCK_R=BR,
    )
    return y, u, hsq


def _gated_base_hopper(x, xl, has_xl, weight, bias, lora_a, y, u, BR):
    """``gated_base`` by ``_gated_fwd_tma_kernel`` (sm_90, fp16/bf16, descriptor-addressable tensors)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    bucket = next(b for b in _lk._RANK_BUCKETS if BR <= b)
    first = _FWD_TMA_FAMILIES[bucket][0].kwargs
    tpp = _lk._tiles_per_prog(M, N, first["BLOCK_M"], first["BLOCK_N"], x.device)
    groups = max(_cdiv(_cdiv(N, c.kwargs["BLOCK_N"]), tpp) for c in _FWD_TMA[bucket].configs)
    hsq = torch.zeros((groups, M), dtype=torch.float32, device=x.device)  # groups the chosen config skips stay 0
    grid = lambda meta: (_lk._persistent_grid(  # noqa: E731
        triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), tpp), x.device),)
    _FWD_TMA[bucket][grid](
        _lk._desc(x), _lk._desc(xl), _lk._desc(weight), _lk._desc(lora_a), _lk._desc(y), _lk._desc(u),
        bias if bias is not None else x, hsq, M, N, K, R, triton.next_power_of_2(M), tpp,
        HAS_XL=has_xl, HAS_BIAS=bias is not None, UPCAST=_lk._upcast(x.dtype), BLOCK_R=BR,
    )
    return y, u, hsq


def gated_expand_(y, u, lora_b, index, count, scale: float):
    """One ``_gated_expand_kernel`` launch: ``y[i] += scale · u_i Bᵀ`` in place for ``i = index[j]``,
    ``j < count`` (``count`` a 1-element int32 tensor on the device: no host sync)."""
    M, N = y.shape
    R = u.shape[1]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _EXPAND[grid](
        y, u, lora_b, index, count, N, R, float(scale),
        y.stride(0), y.stride(1), u.stride(0), u.stride(1), lora_b.stride(0), lora_b.stride(1),
        UPCAST=_lk._upcast(u.dtype), PRECISION=_lk._precision(u.dtype), BLOCK_R=_lk._block_r(R),
    )
    return y


def gate_block_m(R: int) -> int:
    """Rows per gate program: a (BLOCK_M, BLOCK_R) fp32 tile of u of ~2K values (no spills, compile report)."""
    return 16 if interpreting() else max(16, min(128, 2048 // _lk._block_r(R)))


_GATE_CONFIG = triton.Config({}, num_warps=8, num_stages=1)
_COMPACT_CONFIG = triton.Config({}, num_warps=8, num_stages=1)


def compact_block(M: int) -> int:
    return 32 if interpreting() else 1024


def gate(u, lora_b, hsq, scale: float, tau, target_fraction=None):
    """``(ratio (M,) fp32, selected (M,) bool, index (M,) int32, count (1,) int32, thr () fp32)``; ``index[:count]``
    are the selected rows in increasing order, the count stays on the device (no host sync). Two launches: the
    gate over row blocks (reads ``u``, the ``R x R`` Gram of B, a torch matmul on ``(N, R)``, and
    ``hsq (G, M)``: nothing of size M x N), then the one-program compaction of the flags. With a budget
    ``target_fraction`` the gate's flags are recomputed (one byte per row) against ``thr = max(τ, 0, t_p)``,
    ``t_p`` the batch quantile of the ratios (``torch.kthvalue`` on the device), before the compaction."""
    M, R = u.shape
    gram = _gram(lora_b)  # fp32, also under autocast
    ratio = empty_out((M,), like=u, dtype=torch.float32)
    selected = torch.empty((M,), dtype=torch.bool, device=u.device)
    index = empty_out((M,), like=u, dtype=torch.int32)
    count = torch.empty((1,), dtype=torch.int32, device=u.device)
    thr = tau.detach().float().reshape(()).clamp(min=0)  # the kernel clamps too; the NaN check is the caller's
    BM = gate_block_m(R)
    _gate_kernel[(triton.cdiv(M, BM),)](u, gram, hsq, thr, ratio, selected.view(torch.uint8), M, R, hsq.shape[0],
                                       float(scale), u.stride(0), u.stride(1), EPS=EPS, BLOCK_M=BM,
                                       BLOCK_R=_lk._block_r(R), BLOCK_J=min(32, _lk._block_r(R)),
                                       num_warps=_GATE_CONFIG.num_warps)
    if target_fraction is not None:
        thr = effective_threshold(ratio, tau, target_fraction, torch.float32)
        torch.ge(ratio, thr, out=selected)  # NaN ratios compare false, as in the kernel
    _compact_kernel[(1,)](selected.view(torch.uint8), index, count, M, BLOCK=compact_block(M),
                          num_warps=_COMPACT_CONFIG.num_warps)
    return ratio, selected, index, count, thr


def gated_fwd(x, x_lora, weight, bias, lora_a, lora_b, scale: float, tau, target_fraction=None):
    """(y, u, ratio, selected, thr) of the fallback contract (``pyfastpeft.lora.torch_gated.fwd``)."""
    y, u, hsq = gated_base(x, x_lora, weight, bias, lora_a)
    u = _lk._finish(u, x.dtype)
    ratio, selected, index, count, thr = gate(u, lora_b, hsq, scale, tau, target_fraction)
    gated_expand_(y, u, lora_b, index, count, scale)
    return _lk._finish(y, x.dtype), u, ratio, selected, thr


def gated_bwd(dy, x, x_lora, u, ratio, selected, weight, lora_a, lora_b, scale: float, tau, gate_width: float,
              full: bool, dx_mode: int):
    """(dx, dx_lora, dA, dB, dtau) of the fallback contract (``pyfastpeft.lora.torch_gated.bwd``)."""
    dx, dxl, g_all = _lk.bwd_dx(dy, weight, lora_a, lora_b, scale, dx_mode, selected)
    da = _lk.matmul_tn(g_all, x_lora, 1.0, selected=selected)  # selected rows only: the others are not read
    db = _lk.matmul_tn(dy, u, scale, selected=selected)
    return finish_gate(dy, x, x_lora, u, ratio, weight, lora_a, lora_b, scale, tau, gate_width, full, dx_mode,
                       g_all, da, db, dx if dx_mode else None, dxl if dx_mode == 2 else None)


# ----------------------------------------------------------------------------------------------- AOT specs
def _aot_specs() -> list[AOTSpec]:
    specs = []
    for ty, cls, prec in (("bf16", "16", "tf32"), ("fp32", "fp32", "ieee")):
        for BR in (16, 32, 64, 128):
            for cfg in _FWD_FAMILIES[cls, BR]:
                kw = cfg.kwargs
                specs.append(_lk._spec(
                    f"gated_fwd/{ty}/r{BR}/{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}", _gated_fwd_kernel,
                    ["x_ptr", "xl_ptr", "w_ptr", "bias_ptr", "a_ptr", "y_ptr", "u_ptr"],
                    ["M", "N", "K", "R", "M_BUCKET", "TILES_PER_PROG"],
                    ["stride_xm", "stride_xk", "stride_xlm", "stride_xlk", "stride_wn", "stride_wk", "stride_ar",
                     "stride_ak", "stride_ym", "stride_yn", "stride_um", "stride_ur"],
                    ["stride_xk", "stride_xlk", "stride_wk", "stride_ak", "stride_yn", "stride_ur"],
                    dict(HAS_XL=False, HAS_BIAS=True, UPCAST=False, PRECISION=prec, BLOCK_R=BR, **kw), cfg, ty))
                specs[-1].signature["hsq_ptr"] = "*fp32"
            for cfg in _EXPAND_CONFIGS:
                kw = cfg.kwargs
                spec = _lk._spec(
                    f"gated_expand/{ty}/r{BR}/{kw['BLOCK_M']}x{kw['BLOCK_N']}", _gated_expand_kernel,
                    ["y_ptr", "u_ptr", "b_ptr"], ["N", "R"],
                    ["stride_ym", "stride_yn", "stride_um", "stride_ur", "stride_bn", "stride_br"],
                    ["stride_yn", "stride_ur", "stride_br"],
                    dict(UPCAST=False, PRECISION=prec, BLOCK_R=BR, **kw), cfg, ty)
                spec.signature.update(idx_ptr="*i32", cnt_ptr="*i32")
                specs.append(spec)
            BM = max(16, min(128, 2048 // BR))  # gate_block_m(R) off the interpreter
            spec = _lk._spec(f"gate/{ty}/r{BR}/{BM}", _gate_kernel, ["u_ptr"], ["M", "R", "G"],
                             ["stride_um", "stride_ur"], ["stride_ur"], dict(EPS=EPS, BLOCK_M=BM, BLOCK_R=BR, BLOCK_J=min(32, BR)),
                             _GATE_CONFIG, ty)
            spec.signature.update(g_ptr="*fp32", hsq_ptr="*fp32", tau_ptr="*fp32", ratio_ptr="*fp32", sel_ptr="*u8")
            specs.append(spec)
    for bucket, cfgs in _FWD_TMA_FAMILIES.items():  # Hopper forward (sm_90a only), bf16
        for BR in ((16, 32) if bucket == 32 else (bucket,)):
            for cfg in cfgs:
                kw = cfg.kwargs
                bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
                spec = _lk._tma_spec(
                    f"gated_fwd_tma/bf16/r{BR}/{bm}x{bn}x{bk}/w{cfg.num_warps}", _gated_fwd_tma_kernel,
                    {"x_desc": (bm, bk), "xl_desc": (bm, bk), "w_desc": (bn, bk), "a_desc": (BR, bk),
                     "y_desc": (bm, bn // 2), "u_desc": (bm, BR)},
                    ["bias_ptr"], ["M", "N", "K", "R", "M_BUCKET", "TILES_PER_PROG"], [], [],
                    dict(HAS_XL=False, HAS_BIAS=True, UPCAST=False, BLOCK_R=BR, **kw), cfg, "bf16")
                spec.signature["hsq_ptr"] = "*fp32"
                specs.append(spec)
    spec = _lk._spec("compact/1024", _compact_kernel, [], ["M"], [], [], dict(BLOCK=1024), _COMPACT_CONFIG, "u8")
    spec.signature.update(sel_ptr="*u8", idx_ptr="*i32", cnt_ptr="*i32")
    specs.append(spec)
    return specs


AOT_SPECS = _aot_specs()
