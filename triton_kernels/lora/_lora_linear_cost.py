"""Declared cost of each LoRA Triton launch: FLOPs and unique HBM bytes (read, write).

"Unique bytes" is every element a launch loads or stores, counted once: the HBM traffic when tiles
that are re-read hit L2. A test runs each kernel under the interpreter and checks these formulas
against the distinct addresses its ``tl.load`` / ``tl.store`` touch. FLOPs count what the kernel
issues, including the shrink each N tile recomputes (``fwd``) and ``dy B`` each K tile recomputes (``dx``).
Default block sizes are the first shipped GPU config of each kernel's 16-bit r<=32 family, and the
tiles per program are what the launcher picks for an H100 (132 SMs).
"""
from __future__ import annotations

from pyfastpeft.core.cost import cdiv as _cdiv


H100_SMS = 132
MAX_TILES_PER_PROG = 8


def tiles_per_prog(M: int, n_cols: int, block_m: int, block_n: int, sms: int = H100_SMS) -> int:
    """Output tiles (along N in forward, K in dx) one program computes, sharing one shrink.

    The largest power of two <= 8 that still leaves at least two programs per SM: more tiles per
    program means fewer recomputed shrinks (``2·M·K·R`` FLOPs each), fewer programs means idle SMs.
    """
    rows, cols = _cdiv(M, block_m), _cdiv(n_cols, block_n)
    p = 1
    while p < MAX_TILES_PER_PROG and rows * _cdiv(cols, 2 * p) >= 2 * sms:
        p *= 2
    return p


def fwd_cost(M: int, N: int, K: int, R: int, itemsize: int, *, has_bias: bool, has_xl: bool, block_m: int = 128,
             block_n: int = 128, tiles: int | None = None):
    """``_lora_fwd_kernel``: y = x Wᵀ + bias + scale·(x_lora Aᵀ) Bᵀ, u = x_lora Aᵀ; the shrink is computed
    once per group of ``tiles`` N tiles (default: the launcher's choice on an H100)."""
    tiles = tiles or tiles_per_prog(M, N, block_m, block_n)
    groups = _cdiv(_cdiv(N, block_n), tiles) if M and N else 0
    flops = 2 * M * N * K + 2 * M * K * R * groups + 2 * M * N * R
    if not (M and N):
        return dict(flops=0, read=0, write=0)
    read = M * K + (M * K if has_xl else 0) + N * K + R * K + N * R + (N if has_bias else 0)
    write = M * N + M * R
    return dict(flops=flops, read=read * itemsize, write=write * itemsize)


def bwd_dx_cost(M: int, N: int, K: int, R: int, itemsize: int, *, dx_mode: int, block_m: int = 128,
                block_k: int = 64, tiles: int | None = None, has_sel: bool = False):
    """``_lora_bwd_dx_kernel``: g = scale·dy B, and dx = dy W + g A (mode 1) or apart (mode 2); ``dy B`` is
    computed once per group of ``tiles`` K tiles. ``has_sel``: token-selective LoRA's (M,) bool selection
    is read (1 byte per token) by the programs that apply ``g A``."""
    if not (M and N):
        return dict(flops=0, read=0, write=0)
    tiles = tiles or tiles_per_prog(M, K, block_m, block_k)
    groups = _cdiv(_cdiv(K, block_k), tiles) if dx_mode else 1
    flops = 2 * M * N * R * groups + ((2 * M * N * K + 2 * M * R * K) if dx_mode else 0)
    read = M * N + N * R + ((N * K + R * K) if dx_mode else 0)
    write = M * R + (M * K if dx_mode else 0) + (M * K if dx_mode == 2 else 0)
    return dict(flops=flops, read=read * itemsize + (M if has_sel else 0), write=write * itemsize)


MIN_ROWS_PER_SPLIT = 256


def tn_split(M: int, P: int, Q: int, block_p: int = 128, block_q: int = 64, sms: int = H100_SMS) -> int:
    """How many slices of M the reduction ``Pmatᵀ Qmat`` is split into so that its grid fills every SM.

    dA = gᵀ x (P = R) and dB = dyᵀ u (Q = R) have few output tiles (r=16, K=4096: 64 tiles on 132 SMs), so
    each tile's reduction is split over M into ``split`` programs writing fp32 partials, summed in order by a
    second launch: ``tiles · split >= sms``, each slice at least ``MIN_ROWS_PER_SPLIT`` rows."""
    tiles = _cdiv(P, block_p) * _cdiv(Q, block_q)
    if not (M and tiles) or tiles >= sms:
        return 1
    return max(1, min(_cdiv(sms, tiles), M // MIN_ROWS_PER_SPLIT))


def tn_cost(M: int, P: int, Q: int, itemsize: int, selected: int | None = None, split: int | None = None):
    """``_matmul_tn_kernel``: C (P, Q) = alpha·Pmatᵀ Qmat reduced over M, or over the ``selected`` rows only
    (then every row's 1-byte flag is read, and only selected rows of Pmat and Qmat). With ``split > 1``
    (default: the launcher's choice on an H100, :func:`tn_split`) the kernel writes ``split`` fp32 partials
    and ``_tn_reduce_kernel`` reads them and writes C: both launches' traffic is counted here."""
    if not M:
        return dict(flops=0, read=0, write=0)
    split = split or tn_split(M, P, Q)
    rows = M if selected is None else selected
    flags = 0 if selected is None else M
    read = (rows * P + rows * Q) * itemsize + flags
    write = P * Q * itemsize
    if split > 1:
        read += split * P * Q * 4
        write += split * P * Q * 4
    return dict(flops=2 * M * P * Q + (split - 1) * P * Q if split > 1 else 2 * M * P * Q, read=read, write=write)
