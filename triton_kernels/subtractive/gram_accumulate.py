"""Gram accumulation kernel (Triton): the ``triton`` backend of ``gram_accumulate`` (subtractive fit).

Maths (``docs/subtractive.md`` §1, §5): ``x (M, K)``, ``y (M, N)``, ``X̃ = [X, 1]`` (bias column only
with ``HAS_BIAS``):

    G = X̃ᵀ X̃  (K+1, K+1),   C = X̃ᵀ Y  (K+1, N)

One launch, ``_gram_kernel``, grid ``(tiles, splits)``. A tile is a ``BLOCK_D x BLOCK_D`` output block:
either an upper-triangle tile ``(i <= j)`` of ``XᵀX`` or any tile of ``XᵀY``; a small int32 table maps the
program id to ``(i, j, is_c)``. A split is a contiguous range of rows. Each program streams its rows in
``BLOCK_M`` tiles: it loads the ``Xᵀ`` tile of its tile row and the ``X`` (or ``Y``) tile of its tile
column and feeds one ``tl.dot``. The programs of one split read the same row tiles at the same time, so
HBM sees each row of X and Y about once (the re-reads by the other ``TI·(TI+1)/2 + TI·TJ - 1`` tiles hit
L2): unique bytes ``M·(K + N)·itemsize``, the bandwidth bound of the fit.

* Upper triangle only: ``G`` tiles with ``i < j`` are stored twice (in place and transposed), ``i == j``
  tiles are computed whole and their upper half mirrored (``G`` is exactly symmetric); ``XᵀX`` costs
  ``(K² + Σ tile²)/2`` MACs per row instead of ``K²``.
* Bias column in registers: ``X̃`` is never built. The first tile row (``i == 0``) also sums its column
  operand over the rows, which gives the bias row of ``G`` (``Σ x``) and of ``C`` (``Σ y``); ``G[K, K] = M``
  is set by the launcher. No extra tile row for the one column (d=768 would need a 7th row of tiles).
* Precision (blocked + compensated summation): ``tl.dot`` accumulates fp32 over one block of
  ``BLOCK_M · INNER`` rows (16-bit products are exact in fp32), each block sum is added to the running
  total with Kahan compensation, and the splits' fp32 partials are added in fp64 by the launcher. The
  error therefore stays at a block's ``u·sqrt(BLOCK_M·INNER)`` whatever ``M`` is. fp32 inputs use IEEE
  fp32 dots (FMA; TF32's 10-bit mantissa would square into the normal equations).
* Layouts: any strides. Dtypes fp32/fp16/bf16 (fp64 runs on the torch backend).

Configs: one family per dtype class (16-bit tensor-core tiles; fp32 FMA tiles), every config 0 spills on
sm_80 and sm_90a (``AOT_SPECS``, ``pyfastpeft compile-report --modules gram_accumulate --fail-on-spill``).
The tile size is fixed per family (the table depends on it); ``BLOCK_M``/warps/stages are autotuned.
Interpreter: bf16 ``tl.dot`` is wrong there, so bf16 operands are upcast to fp32 (``UPCAST``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.core.triton_config import AOTSpec, autotune_configs, interpreting
from pyfastpeft.triton_kernels.subtractive._gram_accumulate_cost import (  # noqa: F401  (re-exported)
    gram_cost, num_splits, split_rows, split_sum_cost, tile_counts)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cfg(bm, inner, warps, stages):
    return triton.Config({"BLOCK_M": bm, "INNER": inner}, num_warps=warps, num_stages=stages)


# (BLOCK_D, configs). Three fp32 (BLOCK_D x BLOCK_D) register tiles are live (block sum, running total,
# Kahan compensation). Measured with the compile report: 128x128 16-bit tiles spill on sm_80 with 4, 8 or
# 16 warps (328-1276 bytes; 0 on sm_90a), so both families use 64x64 tiles, which compile spill-free on
# sm_80 and sm_90a. Rows per Kahan block = BLOCK_M * INNER = 1024 in every config.
_FAMILIES = {
    "16": (64, [_cfg(64, 16, 4, 3), _cfg(32, 32, 4, 4), _cfg(64, 16, 8, 3)]),
    "fp32": (64, [_cfg(16, 64, 4, 2), _cfg(32, 32, 8, 2), _cfg(16, 64, 8, 3)]),
}
_INTERP = (16, _cfg(16, 2, 1, 1))  # BLOCK_D, config: small, so test shapes have several tiles and blocks


@triton.jit
def _load_xt(x_ptr, rp, rm, p_ok, m_ok, stride_xm, stride_xk):
    """Xᵀ tile (BLOCK_D, BLOCK_M): columns ``rp`` of X for rows ``rm``."""
    return tl.load(x_ptr + rm[None, :] * stride_xm + rp[:, None] * stride_xk, mask=p_ok[:, None] & m_ok[None, :],
                   other=0.0)


@triton.jit
def _accumulate(
    x_ptr, q_ptr, rp, rq, p_ok, q_ok, m_start, m_end,
    stride_xm, stride_xk, stride_qm, stride_qn,
    COLSUM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, INNER: tl.constexpr,
):
    """Σ over rows [m_start, m_end) of Xᵀ[rp] Q[:, rq] (and, with COLSUM, Σ Q[:, rq]), Kahan-blocked."""
    total = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    comp = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    s_total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    s_comp = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c0 in range(m_start, m_end, BLOCK_M * INNER):
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        s_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for m0 in range(c0, tl.minimum(c0 + BLOCK_M * INNER, m_end), BLOCK_M):
            rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_ok = rm < m_end
            at = _load_xt(x_ptr, rp, rm, p_ok, m_ok, stride_xm, stride_xk)
            bt = tl.load(q_ptr + rm[:, None] * stride_qm + rq[None, :] * stride_qn,
                         mask=m_ok[:, None] & q_ok[None, :], other=0.0)
            if UPCAST:
                at, bt = at.to(tl.float32), bt.to(tl.float32)
            acc = tl.dot(at, bt, acc, input_precision=PRECISION)
            if COLSUM:
                s_acc += tl.sum(bt.to(tl.float32), axis=0)
        # Kahan: the rounding error of each block's addition is carried into the next one
        yk = acc - comp
        tk = total + yk
        comp = (tk - total) - yk
        total = tk
        if COLSUM:
            ys = s_acc - s_comp
            ts = s_total + ys
            s_comp = (ts - s_total) - ys
            s_total = ts
    return total, s_total


@triton.jit
def _gram_kernel(
    x_ptr, y_ptr, tiles_ptr, g_ptr, c_ptr,
    M, K, N, ROWS_PER_SPLIT,
    stride_xm, stride_xk, stride_ym, stride_yn,
    stride_gs, stride_gp, stride_gq, stride_cs, stride_cp, stride_cq,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, INNER: tl.constexpr,
):
    t = tl.program_id(0)
    split = tl.program_id(1)
    ti = tl.load(tiles_ptr + 3 * t)
    tj = tl.load(tiles_ptr + 3 * t + 1)
    is_c = tl.load(tiles_ptr + 3 * t + 2)
    rp = (ti * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    rq = (tj * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    p_ok = rp < K
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    g_base = g_ptr + split.to(tl.int64) * stride_gs
    c_base = c_ptr + split.to(tl.int64) * stride_cs
    # Four inlined variants (C or G tile, with or without the column sums) so that each inner loop is a
    # plain pipelined dot loop; the branch is uniform per program.
    if is_c != 0:
        q_ok = rq < N
        if HAS_BIAS and ti == 0:
            acc, s = _accumulate(x_ptr, y_ptr, rp, rq, p_ok, q_ok, m_start, m_end, stride_xm, stride_xk,
                                 stride_ym, stride_yn, True, UPCAST, PRECISION, BLOCK_D, BLOCK_M, INNER)
            tl.store(c_base + K * stride_cp + rq * stride_cq, s, mask=q_ok)  # bias row: Σ y
        else:
            acc, s = _accumulate(x_ptr, y_ptr, rp, rq, p_ok, q_ok, m_start, m_end, stride_xm, stride_xk,
                                 stride_ym, stride_yn, False, UPCAST, PRECISION, BLOCK_D, BLOCK_M, INNER)
        tl.store(c_base + rp[:, None] * stride_cp + rq[None, :] * stride_cq, acc, mask=p_ok[:, None] & q_ok[None, :])
    else:
        q_ok = rq < K
        if HAS_BIAS and ti == 0:
            acc, s = _accumulate(x_ptr, x_ptr, rp, rq, p_ok, q_ok, m_start, m_end, stride_xm, stride_xk,
                                 stride_xm, stride_xk, True, UPCAST, PRECISION, BLOCK_D, BLOCK_M, INNER)
            tl.store(g_base + K * stride_gp + rq * stride_gq, s, mask=q_ok)  # bias row and column: Σ x
            tl.store(g_base + rq * stride_gp + K * stride_gq, s, mask=q_ok)
        else:
            acc, s = _accumulate(x_ptr, x_ptr, rp, rq, p_ok, q_ok, m_start, m_end, stride_xm, stride_xk,
                                 stride_xm, stride_xk, False, UPCAST, PRECISION, BLOCK_D, BLOCK_M, INNER)
        # The upper triangle (a diagonal tile: its upper half), then the same values transposed into the
        # lower triangle, so G is exactly symmetric; every element is written once.
        out_ok = p_ok[:, None] & q_ok[None, :]
        off = ti != tj  # an off-diagonal tile: stored whole, twice
        tl.store(g_base + rp[:, None] * stride_gp + rq[None, :] * stride_gq, acc,
                 mask=out_ok & ((rp[:, None] <= rq[None, :]) | off))
        tl.store(g_base + rp[:, None] * stride_gq + rq[None, :] * stride_gp, acc,
                 mask=out_ok & ((rp[:, None] < rq[None, :]) | off))


# ----------------------------------------------------------------------------------------------- autotuners
def _block_d(cls: str) -> int:
    return _INTERP[0] if interpreting() else _FAMILIES[cls][0]


# Autotune key: K and N decide the best config; M does not (every batch size would re-tune).
_TUNED = {cls: triton.autotune(configs=autotune_configs(cfgs, _INTERP[1]), key=["K", "N"])(_gram_kernel)
          for cls, (_, cfgs) in _FAMILIES.items()}


# ----------------------------------------------------------------------------------------------- launchers
def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong (NOTES.md)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


_TABLES: dict = {}


def _tile_table(K: int, N: int, block_d: int, device: torch.device) -> torch.Tensor:
    """int32 (tiles, 3): (i, j, is_c) for the upper-triangle G tiles, then the C tiles; cached."""
    key = (K, N, block_d, str(device))
    tab = _TABLES.get(key)
    if tab is None:
        ti, tj = -(-K // block_d), -(-N // block_d)
        rows = [(i, j, 0) for i in range(ti) for j in range(i, ti)] + [(i, j, 1) for i in range(ti) for j in range(tj)]
        tab = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).to(device)
        _TABLES[key] = tab
    return tab


def supports(dtype: torch.dtype) -> str | None:
    """None when this kernel takes the call, else why not (the registry's ``supports``)."""
    if dtype not in _DTYPES:
        return f"dtype {dtype} (the Triton Gram kernel takes fp32, fp16, bf16; fp64 runs on torch)"
    return None


def gram_fwd(x: torch.Tensor, y: torch.Tensor, bias: bool, splits: int | None = None):
    """``(G, C)`` fp32 of ``X̃ = [x, 1]`` (see the module docstring); ``splits`` overrides the row splits."""
    M, K = x.shape
    N = y.shape[1]
    kb = K + 1 if bias else K
    cls = _dtype_class(x.dtype)
    bd = _block_d(cls)
    rows_per_block = 1024 if not interpreting() else 32
    if splits is None:
        splits = 2 if interpreting() else num_splits(M, K, N, bd, rows_per_block, _sm_count(x.device))
    splits, rps = split_rows(M, splits)  # whole 16-row tiles per split, no empty split
    g = empty_out((splits, kb, kb), like=x, dtype=torch.float32)
    c = empty_out((splits, kb, N), like=x, dtype=torch.float32)
    if M == 0 or K == 0:
        g.zero_()
        c.zero_()
    else:
        tab = _tile_table(K, N, bd, x.device)
        _TUNED[cls][(tab.shape[0], splits)](
            x, y, tab, g, c, M, K, N, rps,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            g.stride(0), g.stride(1), g.stride(2), c.stride(0), c.stride(1), c.stride(2),
            HAS_BIAS=bool(bias), UPCAST=_upcast(x.dtype), PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_D=bd,
        )
    if splits == 1:
        g, c = g[0], c[0]
    else:  # fp64 between the splits (blocked summation, last level)
        g = g.sum(0, dtype=torch.float64).to(torch.float32)
        c = c.sum(0, dtype=torch.float64).to(torch.float32)
    if bias:
        g[K, K] = M
    return g, c


# ----------------------------------------------------------------------------------------------- AOT specs
_PTRS = ["x_ptr", "y_ptr", "tiles_ptr", "g_ptr", "c_ptr"]
_INTS = ["M", "K", "N", "ROWS_PER_SPLIT"]
_STRIDES = ["stride_xm", "stride_xk", "stride_ym", "stride_yn", "stride_gs", "stride_gp", "stride_gq",
            "stride_cs", "stride_cp", "stride_cq"]
_UNIT = ["stride_xk", "stride_yn", "stride_gq", "stride_cq"]


def _aot_spec(ty: str, cls: str, cfg, has_bias: bool) -> AOTSpec:
    """One spec as a launch on contiguous tensors specialises it (unit strides are the constant 1; sizes and
    leading strides divisible by 16, as d = 768 / 1024 and fp32 workspaces are)."""
    bd = _FAMILIES[cls][0]
    kw = cfg.kwargs
    sig = {"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "tiles_ptr": "*i32", "g_ptr": "*fp32", "c_ptr": "*fp32"}
    sig.update({n: "i32" for n in _INTS + _STRIDES})
    cx = dict(HAS_BIAS=has_bias, UPCAST=False, PRECISION="ieee" if ty == "fp32" else "tf32", BLOCK_D=bd, **kw)
    sig.update({n: "constexpr" for n in cx})
    consts = dict(cx, **{n: 1 for n in _UNIT})
    div16 = [n for n in _INTS + _STRIDES if n not in _UNIT and n not in ("M",)]
    name = f"gram/{ty}/{bd}x{bd}/m{kw['BLOCK_M']}x{kw['INNER']}/w{cfg.num_warps}s{cfg.num_stages}" + (
        "" if has_bias else "/nobias")
    return AOTSpec(name, _gram_kernel, sig, consts, cfg.num_warps, cfg.num_stages, meta={"divisible_by_16": div16})


def _aot_specs() -> list[AOTSpec]:
    specs = []
    for ty, cls in (("bf16", "16"), ("fp16", "16"), ("fp32", "fp32")):
        for cfg in _FAMILIES[cls][1]:
            specs.append(_aot_spec(ty, cls, cfg, True))
        specs.append(_aot_spec(ty, cls, _FAMILIES[cls][1][0], False))
    return specs


AOT_SPECS = _aot_specs()
