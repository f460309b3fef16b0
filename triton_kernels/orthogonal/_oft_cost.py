"""Tiles, split policy and declared costs of OFT linear's Triton kernels (``oft_linear.py``). Triton-free, so
``pfp.perf`` can use it without Triton installed.

Declared bytes are the unique bytes a launch touches (what the interpreter trace measures): every element
of the streamed operands once, ``R`` once, each partial ``b × b`` block once. For ``b > 64`` a block's
column tiles re-read their rows of the streamed operand; those repeats are L2 hits and are not counted.
FLOPs are those of the ``b × b`` blocks (padding lanes not counted). The rotation's fp32 product runs as
TF32 for bf16 inputs (counted twice: half the 16-bit tensor-core rate, so one peak per launch stays right)
and TF32x3 for fp16 (counted six times); fp32 inputs run IEEE fp32 at the fp32 peak.
"""
from __future__ import annotations

from pyfastpeft.core.cost import cdiv as _cdiv

MAX_TILE = 64  # the largest b × b tile of one tl.dot (a 128-wide fp32 R tile would crowd the registers)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def oft_tiles(b: int) -> dict:
    """``BLOCK_C``: the tile of a block's columns (a power of two, 16 ≤ BLOCK_C ≤ 64; padded lanes masked);
    ``BLOCK_R`` rows per rotation program; ``BLOCK_M`` rows per step of the diagonal-block pass; warps of each
    (the largest tiles that compile without spills on sm_80 and sm_90a, compile report)."""
    bc = min(max(_pow2(b), 16), MAX_TILE)
    if bc == MAX_TILE:  # a 64 × 64 tile: fewer rows and more warps keep fp32 / TF32x3 products out of spills
        return dict(BLOCK_C=bc, BLOCK_R=32, BLOCK_M=32, num_warps=8, diag_warps=4)
    return dict(BLOCK_C=bc, BLOCK_R=64, BLOCK_M=64 if bc == 32 else 32, num_warps=4, diag_warps=4)


def diag_splits(M: int, G: int, b: int, sm_count: int, *, interpret: bool = False) -> tuple[int, int]:
    """``(S, rows_per_split)`` for the diagonal-block pass: enough programs (``S·G·tiles``) for about four per
    SM, each split a multiple of ``BLOCK_M`` rows. The interpreter takes up to three splits so test shapes
    exercise the partial sums and the row loop."""
    if M == 0:
        return 0, 0
    bm = oft_tiles(b)["BLOCK_M"]
    steps = _cdiv(M, bm)
    nt = _cdiv(b, oft_tiles(b)["BLOCK_C"]) ** 2
    want = min(3, steps) if interpret else max(1, min(steps, _cdiv(4 * sm_count, G * nt)))
    rows = _cdiv(steps, want) * bm
    return _cdiv(M, rows), rows


def _rot_factor(itemsize: int, fp16: bool) -> int:
    if itemsize == 4:
        return 1
    return 6 if fp16 else 2


def oft_rotate_cost(rows: int, K: int, b: int, G_r: int, itemsize: int, *, fp16: bool = False) -> dict:
    """``_oft_rotate_kernel`` on ``(rows, K)``: ``2·rows·K·b`` FLOPs; reads the operand and ``R``, writes the
    rotated copy."""
    if not (rows and K):
        return dict(flops=0, read=0, write=0)
    return dict(flops=_rot_factor(itemsize, fp16) * 2 * rows * K * b,
                read=rows * K * itemsize + G_r * b * b * 4, write=rows * K * itemsize)


def oft_diag_cost(M: int, K: int, b: int, itemsize: int, splits: int) -> dict:
    """``_oft_diag_kernel``: ``E_g = a_gᵀ c_g`` for the ``G = K / b`` blocks over ``M`` rows (``2·M·K·b``
    FLOPs); reads ``a`` and ``c`` once, writes ``splits`` partial fp32 blocks."""
    if not (M and K):
        return dict(flops=0, read=0, write=0)
    return dict(flops=2 * M * K * b, read=2 * M * K * itemsize, write=splits * (K // b) * b * b * 4)


def oft_triton_supports(dtype, b: int):
    """``None`` if the Triton backend of ``oft_linear`` runs this case, else the reason. Every block size runs."""
    import torch

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dtype} (the Triton kernels take fp32, fp16, bf16; fp64 runs on the torch backend)"
    return None
