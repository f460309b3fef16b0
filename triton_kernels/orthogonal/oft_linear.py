"""OFT linear's memory-bound kernels; the two big GEMMs stay on the vendor library (cuBLAS via torch).

``docs/orthogonal.md`` §3. With ``K = G·b``, ``R (G or 1, b, b)`` fp32 (one shared block: ``block_share``):

* ``_oft_rotate_kernel``: ``out[:, g] = in[:, g] T_g`` with ``T_g = R_gᵀ`` (``TRANS``, the rotated weight
  ``W' = W R_bdᵀ``, and ``dx = d R_bdᵀ``) or ``R_g`` (the rotated input). One program per (row tile, block,
  column tile of the block); the block's ``b × b`` product is tiled (at most 64 × 64 per ``tl.dot``), so
  any ``b ≥ 2`` runs: a block that is not a power of two (``b = 12``) or below ``tl.dot``'s 16 is padded
  with masked lanes. The product runs in fp32 (IEEE for fp32 inputs; TF32 for bf16, whose result is rounded
  to 8 mantissa bits anyway; TF32x3 for fp16) and is rounded once to the output dtype.
* ``_oft_diag_kernel``: the ``G`` diagonal ``b × b`` blocks of ``aᵀ c`` (``E_g = a_gᵀ c_g``), the rows split
  over programs to fill the GPU; each split writes its partial sums (fp32) and torch adds them in a fixed
  order: deterministic, no atomics.

The launchers compose them with ``torch.mm`` (``pyfastpeft.orthogonal.oft_linear`` picks the side):
weight side ``y = x W'ᵀ + b``, ``dx = dy W'``, ``dR_g = E_g(x, dx) R_g⁻ᵀ``; input side
``y = rot(x) Wᵀ + b``, ``d = dy W``, ``dR_g = E_g(x, d)``, ``dx = d R_bdᵀ``.
Under the interpreter bf16 dots are wrong (``UPCAST`` converts operands to fp32 there) and bf16 results are
written as fp32 then cast.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.core.triton_config import AOTSpec, interpreting
from pyfastpeft.orthogonal.blocks import inv_transpose, oft_weight_side
from pyfastpeft.triton_kernels.orthogonal._oft_cost import (  # noqa: F401  (re-exported for tests)
    diag_splits, oft_diag_cost, oft_rotate_cost, oft_tiles, oft_triton_supports)


@triton.jit
def _oft_rotate_kernel(in_ptr, r_ptr, out_ptr, ROWS, stride_in, stride_out, R_STRIDE_G,
                       B: tl.constexpr, TRANS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r, g, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cj = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # output columns within the block
    row_ok, cj_ok = rows < ROWS, cj < B
    k0 = g * B
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for kb in tl.static_range(0, B, BLOCK_C):  # the block's inner dimension, tile by tile
        kk = kb + tl.arange(0, BLOCK_C)
        kk_ok = kk < B
        t = tl.load(in_ptr + rows[:, None] * stride_in + (k0 + kk)[None, :], mask=row_ok[:, None] & kk_ok[None, :],
                    other=0.0).to(tl.float32)
        if TRANS:  # T[k, j] = R_g[j, k]
            r_off = cj[None, :] * B + kk[:, None]
        else:
            r_off = kk[:, None] * B + cj[None, :]
        Rt = tl.load(r_ptr + g * R_STRIDE_G + r_off, mask=kk_ok[:, None] & cj_ok[None, :], other=0.0)
        acc += tl.dot(t, Rt, input_precision="ieee" if UPCAST else PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_out + (k0 + cj)[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & cj_ok[None, :])


@triton.jit
def _oft_diag_kernel(a_ptr, c_ptr, part_ptr, M, ROWS_PER_SPLIT, G, stride_a, stride_c,
                     B: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    s, g, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NJ: tl.constexpr = (B + BLOCK_C - 1) // BLOCK_C
    ii = (t // NJ) * BLOCK_C + tl.arange(0, BLOCK_C)
    jj = (t % NJ) * BLOCK_C + tl.arange(0, BLOCK_C)
    ii_ok, jj_ok = ii < B, jj < B
    k0 = g * B
    m_lo = s * ROWS_PER_SPLIT
    m_hi = tl.minimum(M, m_lo + ROWS_PER_SPLIT)
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        ok = rows < m_hi
        a = tl.load(a_ptr + rows[:, None] * stride_a + (k0 + ii)[None, :], mask=ok[:, None] & ii_ok[None, :], other=0.0)
        c = tl.load(c_ptr + rows[:, None] * stride_c + (k0 + jj)[None, :], mask=ok[:, None] & jj_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(tl.trans(a.to(tl.float32)), c.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), c, input_precision=PRECISION)
    tl.store(part_ptr + ((s * G + g) * B + ii[:, None]) * B + jj[None, :], acc, mask=ii_ok[:, None] & jj_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    """The rotation's fp32 product: IEEE for fp32 inputs (PEFT parity 1e-5), TF32 for bf16 (10 mantissa bits
    against bf16's 8), TF32x3 for fp16 (whose 10 bits TF32 alone would not keep). The diagonal-block pass
    multiplies 16-bit operands natively (exact products, fp32 sums); its PRECISION matters for fp32 only."""
    return {torch.float32: "ieee", torch.bfloat16: "tf32", torch.float16: "tf32x3"}[dtype]


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype != torch.float32


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def rotate(t: torch.Tensor, R: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``t (rows, K)`` block-wise times ``R_gᵀ`` (``transpose``) or ``R_g``, in fp32, rounded to t's dtype."""
    rows, K = t.shape
    b = R.shape[-1]
    G = K // b
    t = t if t.stride(-1) == 1 else t.contiguous()
    Rc = R.float().contiguous()
    out_dtype = torch.float32 if (interpreting() and t.dtype == torch.bfloat16) else t.dtype
    out = empty_out((rows, K), like=t, dtype=out_dtype)
    if rows and G:
        cfg = oft_tiles(b)
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), G, triton.cdiv(b, cfg["BLOCK_C"]))
        _oft_rotate_kernel[grid](t, Rc, out, rows, t.stride(0), out.stride(0), 0 if R.shape[0] == 1 else b * b,
                                 B=b, TRANS=transpose, PRECISION=_precision(t.dtype), UPCAST=_upcast(t.dtype),
                                 BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return out if out.dtype == t.dtype else out.to(t.dtype)


def diag_blocks(a: torch.Tensor, c: torch.Tensor, b: int) -> torch.Tensor:
    """``(G, b, b)`` fp32: the diagonal blocks ``a_gᵀ c_g`` of ``aᵀ c`` (``a``, ``c`` of shape ``(M, K)``)."""
    M, K = a.shape
    G = K // b
    a = a if a.stride(-1) == 1 else a.contiguous()
    c = c if c.stride(-1) == 1 else c.contiguous()
    cfg = oft_tiles(b)
    S, rows_per_split = diag_splits(M, G, b, _sm_count(a.device), interpret=interpreting())
    part = empty_out((S, G, b, b), like=a, dtype=torch.float32)
    if S == 0:
        return torch.zeros((G, b, b), device=a.device, dtype=torch.float32)
    nt = triton.cdiv(b, cfg["BLOCK_C"])
    _oft_diag_kernel[(S, G, nt * nt)](a, c, part, M, rows_per_split, G, a.stride(0), c.stride(0), B=b,
                                      PRECISION=_precision(a.dtype), UPCAST=_upcast(a.dtype),
                                      BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["diag_warps"])
    return part.sum(0)


def _linear(x, weight, bias):
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def oft_fwd(x, weight, bias, R):
    """``y (M, N)`` in x's dtype: the rotation kernel, then the vendor GEMM."""
    if oft_weight_side(x.shape[0], weight.shape[0]):
        return _linear(x, rotate(weight, R, transpose=True), bias)
    return _linear(rotate(x, R, transpose=False), weight, bias)


def oft_bwd(dy, x, weight, R, need_dx: bool, orthogonal: bool):
    """``(dx (M, K) or (0,), dR like R)``: vendor GEMM for ``dy W'`` (or ``dy W``), the kernels for the rest."""
    M, K = x.shape
    b = R.shape[-1]
    if need_dx and oft_weight_side(M, weight.shape[0]):
        dx = torch.mm(dy, rotate(weight, R, transpose=True))
        E = diag_blocks(x, dx, b)
        if R.shape[0] == 1:
            E = E.sum(0, keepdim=True)
        return dx, torch.bmm(E, inv_transpose(R.float(), orthogonal)).to(R.dtype)
    d = torch.mm(dy, weight)  # the gradient of the rotated input, in the compute dtype
    dR = diag_blocks(x, d, b)
    if R.shape[0] == 1:
        dR = dR.sum(0, keepdim=True)
    dx = rotate(d, R, transpose=True) if need_dx else empty_out((0,), like=dy)
    return dx, dR.to(R.dtype)


# ----------------------------------------------------------------------------------- ahead-of-time specs
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AOT_BLOCKS = (2, 12, 16, 32, 64, 128)  # below tl.dot's 16, not a power of two, PEFT's default 32, and up


def _aot_specs() -> list[AOTSpec]:
    """Each kernel as a real launch on contiguous tensors specialises it: sizes and row strides divisible by
    16 for the block sizes whose ``K`` multiples are (the JIT marks them at launch), ``R_STRIDE_G = b²``."""
    specs = []
    for ty in ("bf16", "fp16", "fp32"):
        for b in AOT_BLOCKS:
            cfg = oft_tiles(b)
            div = ["stride_in", "stride_out"] if b % 16 == 0 else []
            div_r = ["R_STRIDE_G"] if (b * b) % 16 == 0 else []
            specs.append(AOTSpec(
                f"oft_rotate/{ty}/b{b}/{cfg['BLOCK_R']}x{cfg['BLOCK_C']}", _oft_rotate_kernel,
                {"in_ptr": f"*{ty}", "r_ptr": "*fp32", "out_ptr": f"*{ty}", "ROWS": "i32", "stride_in": "i32",
                 "stride_out": "i32", "R_STRIDE_G": "i32", "B": "constexpr", "TRANS": "constexpr",
                 "PRECISION": "constexpr", "UPCAST": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
                dict(B=b, TRANS=True, PRECISION=_precision(_DT[ty]), UPCAST=False, BLOCK_R=cfg["BLOCK_R"],
                     BLOCK_C=cfg["BLOCK_C"]), num_warps=cfg["num_warps"],
                meta={"divisible_by_16": ["ROWS"] + div + div_r}))
            specs.append(AOTSpec(
                f"oft_diag/{ty}/b{b}/{cfg['BLOCK_M']}x{cfg['BLOCK_C']}", _oft_diag_kernel,
                {"a_ptr": f"*{ty}", "c_ptr": f"*{ty}", "part_ptr": "*fp32", "M": "i32", "ROWS_PER_SPLIT": "i32",
                 "G": "i32", "stride_a": "i32", "stride_c": "i32", "B": "constexpr", "PRECISION": "constexpr",
                 "UPCAST": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr"},
                dict(B=b, PRECISION=_precision(_DT[ty]), UPCAST=False, BLOCK_M=cfg["BLOCK_M"],
                     BLOCK_C=cfg["BLOCK_C"]), num_warps=cfg["diag_warps"],
                meta={"divisible_by_16": ["ROWS_PER_SPLIT"] + (["stride_a", "stride_c"] if b % 16 == 0 else [])}))
    return specs


AOT_SPECS = _aot_specs()
