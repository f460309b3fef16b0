"""Fused OFT linear: the block rotation of ``x`` runs in the base GEMM's prologue (no rotated copy of ``x``
in memory), and its backward rotates ``dy W`` back in the epilogue while accumulating ``dR``.

Forward, ``x (M, K)``, ``W (N, K)``, ``R (G or 1, b, b)`` fp32, ``K = G·b``:
    for each K step g (width b):  xr = (x[:, g] in fp32) @ R_g  (fp32 as PEFT: IEEE for fp32 x, TF32 for
                                  fp16/bf16 x, whose result is rounded to 16 bits anyway)
                                  acc += xr.to(x.dtype) @ W[:, g]ᵀ   (fp32 accumulation)
    y = acc + bias
Extra FLOPs over the frozen GEMM: ``2·M·K·b`` per N tile (the rotation is recomputed by every N tile).
Backward, one program per (M tile, block g):
    d = dy @ W[:, g]   (M tile × b, over N)       dx[:, g] = d @ R_gᵀ       dR_g += x[:, g]ᵀ @ d  (atomic)
so ``dy W`` (the gradient of the rotated input) never reaches memory either.

Limits: ``b ∈ {16, 32, 64}`` (``tl.dot`` needs ≥ 16; one block is one K step), and not fp32 with b = 64
(its backward spills). Other cases use the torch backend. Under the interpreter bf16 dots are wrong (NOTES.md): ``UPCAST`` converts operands to fp32 there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.triton_kernels.orthogonal._cayley_cost import (  # noqa: F401  (re-exported for tests)
    oft_bwd_cost, oft_fwd_cost, oft_kernel_supports, oft_triton_supports)
from pyfastpeft.core.triton_config import AOTSpec, interpreting

BLOCKS = (16, 32, 64)
# (BLOCK_M, BLOCK_N, num_warps) per block size: the fp32 rotation tile (BLOCK_M × b) and R_g (b × b) live
# beside the accumulator; these are the largest tiles that compile without spills on sm_80 and sm_90a
_CFG = {16: (64, 64, 4), 32: (64, 64, 8), 64: (32, 64, 8)}
_BWD_CFG = {16: (64, 32, 4), 32: (64, 64, 8), 64: (32, 32, 8)}  # backward: BLOCK_N is its reduction step


def _cfg(b: int, bwd: bool = False) -> tuple[dict, int]:
    bm, bn, w = (_BWD_CFG if bwd else _CFG)[b]
    return dict(BLOCK_M=bm, BLOCK_N=bn), w


def supports(dtype: torch.dtype, b: int):
    """Kernel capability (the ``oft_linear`` backend is narrower: see ``oft_triton_supports``)."""
    return oft_kernel_supports(dtype, b)


@triton.jit
def _oft_fwd_kernel(x_ptr, w_ptr, bias_ptr, r_ptr, y_ptr, M, N, G, stride_xm, stride_wn, stride_ym, R_STRIDE_G,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, B: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    kk = tl.arange(0, B)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, G):
        k0 = g * B
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + kk)[None, :], mask=row_ok[:, None], other=0.0)
        Rg = tl.load(r_ptr + g * R_STRIDE_G + kk[:, None] * B + kk[None, :])  # (B, B) fp32
        xr = tl.dot(x.to(tl.float32), Rg, input_precision=PRECISION)  # rotate in fp32/tf32 (PEFT: fp32)
        wt = tl.load(w_ptr + cols[None, :] * stride_wn + (k0 + kk)[:, None], mask=col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(xr.to(x_ptr.dtype.element_ty).to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xr.to(x_ptr.dtype.element_ty), wt, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _oft_bwd_kernel(dy_ptr, w_ptr, x_ptr, r_ptr, dx_ptr, dr_ptr, M, N, stride_dym, stride_wn, stride_xm, stride_dxm,
                    R_STRIDE_G, NEED_DX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, g = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    kk = tl.arange(0, B)
    row_ok = rows < M
    k0 = g * B
    d = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + (k0 + kk)[None, :], mask=col_ok[:, None], other=0.0)
        if UPCAST:
            d += tl.dot(dy.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            d += tl.dot(dy, w, input_precision=PRECISION)
    # d is the gradient of the rotated input (PEFT casts it to fp32 for the fp32 rotation's backward)
    d = d.to(dy_ptr.dtype.element_ty).to(tl.float32)
    Rg = tl.load(r_ptr + g * R_STRIDE_G + kk[:, None] * B + kk[None, :])
    if NEED_DX:
        dx = tl.dot(d, tl.trans(Rg), input_precision=PRECISION)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + (k0 + kk)[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
    x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + kk)[None, :], mask=row_ok[:, None], other=0.0)
    dRg = tl.dot(tl.trans(x.to(tl.float32)), d, input_precision=PRECISION)
    tl.atomic_add(dr_ptr + g * R_STRIDE_G + kk[:, None] * B + kk[None, :], dRg, sem="relaxed")


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE everywhere (PEFT parity 1e-5; TF32 would cost ~1e-3). fp16/bf16: the fp32 rotations
    # run as TF32 on tensor cores (10 mantissa bits, more than the bf16/fp16 rounding of their results)
    return "ieee" if dtype == torch.float32 else "tf32"


def oft_fwd(x, weight, bias, R):
    M, K = x.shape
    N = weight.shape[0]
    b = R.shape[-1]
    G = K // b
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    R = R.float().contiguous()
    out_dtype = torch.float32 if (interpreting() and x.dtype == torch.bfloat16) else x.dtype
    y = empty_out((M, N), like=x, dtype=out_dtype)
    if M and N:
        cfg, warps = _cfg(b)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
        _oft_fwd_kernel[grid](x, weight, bias if bias is not None else x, R, y, M, N, G, x.stride(0),
                              weight.stride(0), y.stride(0), 0 if R.shape[0] == 1 else b * b,
                              HAS_BIAS=bias is not None, UPCAST=interpreting() and x.dtype != torch.float32,
                              PRECISION=_precision(x.dtype), B=b, **cfg, num_warps=warps)
    return y.to(x.dtype)


def oft_bwd(dy, x, weight, R, need_dx: bool):
    M, K = x.shape
    N = weight.shape[0]
    b = R.shape[-1]
    G = K // b
    dy = dy.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    Rc = R.float().contiguous()
    dRfull = torch.zeros((G if R.shape[0] != 1 else 1, b, b), device=x.device, dtype=torch.float32)
    out_dtype = torch.float32 if (interpreting() and x.dtype == torch.bfloat16) else x.dtype
    dx = empty_out((M, K) if need_dx else (0,), like=x, dtype=out_dtype)
    if M and G:
        cfg, warps = _cfg(b, bwd=True)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), G)
        _oft_bwd_kernel[grid](dy, weight, x, Rc, dx, dRfull, M, N, dy.stride(0), weight.stride(0), x.stride(0),
                              dx.stride(0) if need_dx else 0, 0 if R.shape[0] == 1 else b * b, NEED_DX=need_dx,
                              UPCAST=interpreting() and x.dtype != torch.float32, PRECISION=_precision(x.dtype),
                              B=b, **cfg, num_warps=warps)
    return dx.to(x.dtype), dRfull.to(R.dtype)


_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _aot_specs() -> list[AOTSpec]:
    specs = []
    for ty in ("bf16", "fp16", "fp32"):
        for b in BLOCKS if ty != "fp32" else (16, 32):  # fp32 b=64: torch backend (see supports)
            cfg, w = _cfg(b)
            tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}"
            specs.append(AOTSpec(
                f"oft_fwd/{ty}/b{b}/{tile}", _oft_fwd_kernel,
                {"x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "r_ptr": "*fp32", "y_ptr": f"*{ty}",
                 "M": "i32", "N": "i32", "G": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32",
                 "R_STRIDE_G": "i32", "HAS_BIAS": "constexpr", "UPCAST": "constexpr", "PRECISION": "constexpr",
                 "B": "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                dict(HAS_BIAS=True, UPCAST=False, PRECISION=_precision(_DT[ty]), B=b, **cfg), num_warps=w))
            cfg, w = _cfg(b, bwd=True)
            tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}"
            specs.append(AOTSpec(
                f"oft_bwd/{ty}/b{b}/{tile}", _oft_bwd_kernel,
                {"dy_ptr": f"*{ty}", "w_ptr": f"*{ty}", "x_ptr": f"*{ty}", "r_ptr": "*fp32", "dx_ptr": f"*{ty}",
                 "dr_ptr": "*fp32", "M": "i32", "N": "i32", "stride_dym": "i32", "stride_wn": "i32",
                 "stride_xm": "i32", "stride_dxm": "i32", "R_STRIDE_G": "i32", "NEED_DX": "constexpr",
                 "UPCAST": "constexpr", "PRECISION": "constexpr", "B": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                dict(NEED_DX=True, UPCAST=False, PRECISION=_precision(_DT[ty]), B=b, **cfg), num_warps=w))
    return specs


AOT_SPECS = _aot_specs()
