"""Declared cost of the Gram-accumulation Triton launch: FLOPs and unique HBM bytes (read, write).

Tiling (``triton_kernels/subtractive/gram_accumulate.py``): square ``BLOCK_D`` output tiles over the K features of X
(the bias row/column is the column sums, made by the first tile row), ``TI = cdiv(K, BLOCK_D)``,
``TJ = cdiv(N, BLOCK_D)``; programs = (upper-triangle tiles of G + tiles of C) x row splits.

"Unique bytes": every element of X and Y is read once (the programs of one row split read the same rows
at the same time, so the re-reads of a row tile by the other output tiles hit L2), plus the tile table;
each split writes its fp32 partial ``G`` (both triangles, the mirror stores included, all but ``G[K, K]``)
and ``C``. A test checks these formulas against the interpreter's distinct load/store addresses.
FLOPs are what the tiles issue: a diagonal tile of G is computed whole.
"""
from __future__ import annotations

from pyfastpeft.core.cost import cdiv as _cdiv

H100_SMS = 132
MAX_SPLITS = 16


def tile_counts(K: int, N: int, block_d: int) -> tuple[int, int, int]:
    """(TI, number of G tiles, number of C tiles)."""
    ti, tj = _cdiv(K, block_d), _cdiv(N, block_d)
    return ti, ti * (ti + 1) // 2, ti * tj


def num_splits(M: int, K: int, N: int, block_d: int, rows_per_block: int, sms: int = H100_SMS) -> int:
    """Row splits: enough programs for two per SM, at most one per Kahan row block, at most 16."""
    _, tg, tc = tile_counts(K, N, block_d)
    tiles = max(tg + tc, 1)
    return max(1, min(_cdiv(2 * sms, tiles), _cdiv(max(M, 1), rows_per_block), MAX_SPLITS))


def split_rows(M: int, splits: int) -> tuple[int, int]:
    """(splits, rows per split) as launched: whole 16-row tiles per split, no empty split."""
    m = max(M, 1)
    s = max(1, min(splits, _cdiv(m, 16)))
    rps = _cdiv(_cdiv(m, s), 16) * 16
    return _cdiv(m, rps), rps


def gram_cost(M: int, K: int, N: int, itemsize: int, *, bias: bool = True, block_d: int = 64,
              rows_per_block: int = 1024, splits: int | None = None) -> dict:
    """``_gram_kernel``: G = X̃ᵀX̃ (upper tiles, mirrored) and C = X̃ᵀY over M rows, fp32 partials per split.

    Returns ``dict(flops, read, write, splits)`` (bytes)."""
    ti, tg, tc = tile_counts(K, N, block_d)
    s = split_rows(M, splits if splits is not None else num_splits(M, K, N, block_d, rows_per_block))[0]
    if M == 0 or K == 0:
        return dict(flops=0, read=0, write=0, splits=s)
    sizes = [min(block_d, K - i * block_d) for i in range(ti)]
    g_elems = (K * K + sum(z * z for z in sizes)) // 2  # upper tiles, diagonal tiles whole
    flops = 2 * M * (g_elems + K * N)
    if bias:  # column sums of X and Y by the first tile row
        flops += M * (K + N)
    kb = K + 1 if bias else K
    read = (M * K + M * N) * itemsize + 3 * 4 * (tg + tc)
    write = s * (kb * kb - (1 if bias else 0) + kb * N) * 4
    return dict(flops=flops, read=read, write=write, splits=s)


def split_sum_cost(K: int, N: int, splits: int, *, bias: bool = True) -> dict:
    """The torch reduction of the fp32 split partials into one G and C (fp64 sum, fp32 result)."""
    kb = K + 1 if bias else K
    e = kb * kb + kb * N
    return dict(flops=splits * e, read=splits * e * 4, write=e * 4)
