"""Declared cost of the rank-r LoRA kernels (``lora_rank.py``) and of the cuBLAS GEMMs that follow them.

Triton-free (``pfp.perf`` reads it without importing Triton). FLOPs are what a launch issues; bytes are
unique HBM bytes (every element loaded or stored, counted once), which
``tests/lora/test_lora_rank.py`` checks against the distinct addresses the interpreter's ``tl.load`` /
``tl.store`` touch.

Block sizes live here (plain numbers) so the launcher and the cost formulas agree on them; the split
counts of the two backward passes (:func:`split_counts`) are a function of the shape, the block sizes
and the GPU's SM count.
"""
from __future__ import annotations

import functools

from pyfastpeft.core.cost import cdiv as _cdiv

H100_SMS = 132
F32 = 4  # bytes of one fp32 partial

# One config per (dtype class, rank bucket): (BLOCK_M, BLOCK_C, BLOCK_K or 0, num_warps, num_stages).
# fwd: rows x (N block, K block); dy: rows x N block; x: rows x K block. The kernels are memory-bound:
# small row blocks give many programs (>= 1 per SM at 8k tokens), and every config compiles with 0
# spilled bytes on sm_80 and sm_90a (compile report).
RANK_BUCKETS = (32, 64, 128)
CONFIGS = {
    ("16", 32): dict(fwd=(32, 64, 64, 4, 3), dy=(32, 64, 0, 4, 3), x=(32, 64, 0, 4, 3)),
    ("16", 64): dict(fwd=(32, 64, 64, 4, 3), dy=(32, 64, 0, 4, 3), x=(32, 64, 0, 4, 3)),
    ("16", 128): dict(fwd=(32, 64, 32, 4, 3), dy=(16, 32, 0, 4, 3), x=(16, 32, 0, 4, 3)),
    ("fp32", 32): dict(fwd=(16, 64, 32, 4, 3), dy=(16, 32, 0, 4, 3), x=(16, 64, 0, 2, 3)),
    ("fp32", 64): dict(fwd=(16, 64, 32, 4, 3), dy=(16, 32, 0, 4, 2), x=(16, 32, 0, 8, 3)),
    ("fp32", 128): dict(fwd=(16, 32, 16, 4, 3), dy=(16, 16, 0, 8, 3), x=(16, 32, 0, 4, 3)),
}
# Under the interpreter: 16-wide blocks everywhere, so test shapes span several blocks per chunk.
INTERP_CONFIG = dict(fwd=(16, 16, 16, 1, 1), dy=(16, 16, 0, 1, 1), x=(16, 16, 0, 1, 1))
INTERP_SMS = 4  # split targets under the interpreter: small shapes still split over M and N


def block_r(R: int) -> int:
    """The rank block: the next power of two >= R, at least 16 (``tl.dot``'s minimum)."""
    b = 16
    while b < R:
        b *= 2
    return b


def config(dtype_class: str, R: int) -> dict:
    """The shipped GPU config of a dtype class (``"16"`` or ``"fp32"``) and rank."""
    br = block_r(R)
    return CONFIGS[dtype_class, next(b for b in RANK_BUCKETS if br <= b)]


# Weights of the two partials in the split objective, per pass: how often their bytes cross HBM.
# dy pass: the g partials are written, re-read by the program's later N blocks and read by the x pass (3); the
# dB partials are written and read by the reduction (2). x pass: the dA partials are written and read by the
# reduction (2); the g partials are re-read from L2 by every K chunk (1).
DY_WEIGHTS = (2, 3)
X_WEIGHTS = (2, 1)


@functools.lru_cache(maxsize=4096)
def split_counts(M: int, C: int, block_m: int, block_c: int, sms: int,
                 weights: tuple[int, int] = (1, 1)) -> tuple[int, int, int, int]:
    """How a backward pass over an ``(M, C)`` tensor is split: ``(MC, CC, rows_per_chunk, cols_per_chunk)``.

    Program ``(i, j)`` owns rows ``[i·rows, (i+1)·rows)`` and columns ``[j·cols, (j+1)·cols)``. Its per-column
    partial (``dB`` / ``dA``) is ``MC · C · R`` and its per-row one (``g``) ``CC · M · R`` fp32 values, so
    among the splits with ``MC · CC >=`` the SM count (one full wave, or every block when there are fewer)
    the one with the least ``weights[0] · MC · C + weights[1] · CC · M`` is taken (``DY_WEIGHTS``,
    ``X_WEIGHTS``). Chunks are whole blocks and none is empty.
    """
    if M <= 0 or C <= 0:
        return 0, 0, max(block_m, 1), max(block_c, 1)
    mb, cb = _cdiv(M, block_m), _cdiv(C, block_c)
    want = min(sms, mb * cb)
    wm, wc = weights
    best = None
    for mc in range(1, mb + 1):
        cc = min(cb, _cdiv(want, mc))
        if mc * cc < want:
            continue
        key = (wm * mc * C + wc * cc * M, mc * cc)
        if best is None or key < best[0]:
            best = (key, mc, cc)
    _, mc, cc = best
    return _chunks(M, C, block_m, block_c, mc, cc)


def _chunks(M, C, block_m, block_c, mc, cc):
    rows = _cdiv(_cdiv(M, block_m), mc) * block_m
    cols = _cdiv(_cdiv(C, block_c), cc) * block_c
    return _cdiv(M, rows), _cdiv(C, cols), rows, cols


def forced_split(M: int, C: int, block_m: int, block_c: int, mc: int, cc: int) -> tuple[int, int, int, int]:
    """``split_counts``' return for a requested ``(mc, cc)`` (clamped to whole, non-empty chunks)."""
    mc = max(1, min(mc, _cdiv(M, block_m)))
    cc = max(1, min(cc, _cdiv(C, block_c)))
    return _chunks(M, C, block_m, block_c, mc, cc)


def _zero():
    return dict(flops=0, read=0, write=0)


def rank_fwd_cost(M: int, N: int, K: int, R: int, itemsize: int, *, has_bias: bool):
    """``_rank_fwd_kernel``: ``u = x_lora Aᵀ`` (stored), ``y = scale · u Bᵀ + bias`` (stored): one read of
    x_lora, one write of y."""
    if not M:
        return _zero()
    read = M * K + R * K + ((N * R + (N if has_bias else 0)) if N else 0)
    return dict(flops=2 * M * K * R + 2 * M * N * R, read=read * itemsize, write=(M * N + M * R) * itemsize)


def cublas_addmm_cost(M: int, N: int, K: int, itemsize: int, *, beta: bool = True):
    """cuBLAS ``C (M, N) ← P (M, K) @ Q (K, N) (+ C)``: with ``beta`` the C operand is read (once)."""
    if not (M and N):
        return _zero()
    return dict(flops=2 * M * N * K, read=(M * K + N * K + (M * N if beta else 0)) * itemsize,
                write=M * N * itemsize)


def rank_bwd_dy_cost(M: int, N: int, R: int, itemsize: int, *, split: tuple, block_n: int):
    """``_rank_bwd_dy_kernel``: one pass over dy gives ``g`` partials per N chunk (``(NC, M, R)`` fp32, added
    up in place while a program walks its N blocks: those chunks of >= 2 blocks re-read it) and ``dB`` partials
    per M chunk (``(MC, N, R)`` fp32)."""
    mc, nc, rows, cols = split
    if not (M and N):
        return _zero()
    read = (M * N + N * R + M * R) * itemsize
    # a chunk that spans >= 2 N blocks re-reads its g partial (M rows x R): once as distinct addresses
    rmw_chunks = sum(1 for lo in range(0, N, cols) if min(cols, N - lo) > block_n)
    read += rmw_chunks * M * R * F32
    return dict(flops=4 * M * N * R, read=read, write=(nc * M * R + mc * N * R) * F32)


def rank_bwd_x_cost(M: int, K: int, R: int, itemsize: int, *, split: tuple, g_parts: int, dx: bool,
                    da: bool = True):
    """``_rank_bwd_x_kernel``: sums the dy pass's ``g_parts`` fp32 partials of g (``(g_parts, M, R)``, read
    once from HBM; each K chunk re-reads them from L2), and in one pass over x_lora gives ``dA`` partials per
    M chunk (``(MC, R, K)`` fp32) and, with ``dx``, writes ``g A`` (dx, or dx_lora with dropout). Without
    ``da`` (A frozen) x_lora is not read and no dA partial is written."""
    mc, kc, rows, cols = split
    if not (M and K):
        return _zero()
    read = ((M * K if da else 0) + (R * K if dx else 0)) * itemsize + g_parts * M * R * F32
    write = (mc * R * K * F32 if da else 0) + (M * K * itemsize if dx else 0)
    flops = 2 * M * K * R * ((1 if dx else 0) + (1 if da else 0)) + g_parts * M * R
    return dict(flops=flops, read=read, write=write)


def reduce_cost(itemsize: int, *buffers: tuple):
    """``_reduce_kernel``: each ``(parts, P, Q)`` fp32 partial buffer summed into one ``(P, Q)`` output
    (scaled, rounded); one launch for all of them."""
    flops = read = write = 0
    for parts, P, Q in buffers:
        flops += parts * P * Q
        read += parts * P * Q * F32
        write += P * Q * itemsize
    return dict(flops=flops, read=read, write=write)
