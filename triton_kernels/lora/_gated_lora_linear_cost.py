"""Declared cost of each token-selective LoRA Triton launch: FLOPs and unique HBM bytes (read, write).

Same conventions as ``_lora_linear_cost`` (unique bytes; checked against the interpreter's loads and
stores by ``tests/lora/test_lora_linear_cost.py``).
"""
from __future__ import annotations

from pyfastpeft.core.cost import cdiv as _cdiv
from pyfastpeft.triton_kernels.lora._lora_linear_cost import tiles_per_prog


def base_groups(M: int, N: int, block_m: int = 128, block_n: int = 128, tiles: int | None = None) -> int:
    """Program groups along N of ``_gated_fwd_kernel``: the rows of its partial row sums of h²."""
    return _cdiv(_cdiv(N, block_n), tiles or tiles_per_prog(M, N, block_m, block_n))


def gated_base_cost(M: int, N: int, K: int, R: int, itemsize: int, *, has_bias: bool, has_xl: bool,
                    block_m: int = 128, block_n: int = 128, tiles: int | None = None):
    """``_gated_fwd_kernel``: y = x Wᵀ + bias, u = x_lora Aᵀ, and fp32 partial row sums of h² per group."""
    if not (M and N):
        return dict(flops=0, read=0, write=0)
    groups = base_groups(M, N, block_m, block_n, tiles)
    flops = 2 * M * N * K + 2 * M * K * R * groups + 3 * M * N  # + h² row sums
    read = (M * K + (M * K if has_xl else 0) + N * K + R * K + (N if has_bias else 0)) * itemsize
    write = (M * N + M * R) * itemsize + groups * M * 4
    return dict(flops=flops, read=read, write=write)


def gate_cost(M: int, R: int, G: int, selected: int, itemsize: int):
    """``_gate_kernel`` then ``_compact_kernel``, summed: reads u, the fp32 Gram (R x R), the ``G`` partial
    sums of h² and τ (fp32), writes ratio (fp32) and the flags (1 byte); the compaction re-reads the flags
    and writes the ``selected`` indices (int32) and the count."""
    if not M:
        return dict(flops=0, read=0, write=0)
    return dict(flops=2 * M * R * R + 2 * M * R + (G + 6) * M,
                read=M * R * itemsize + R * R * 4 + G * M * 4 + 4 + M, write=M * 4 + M + selected * 4 + 4)


def gated_expand_cost(M: int, selected: int, N: int, R: int, itemsize: int):
    """``_gated_expand_kernel``: y_i += s·u_i Bᵀ on the ``selected`` rows, gathered through the compacted
    index list; every program reads the count (4 bytes), B is read only when a row is selected."""
    if not (M and N):
        return dict(flops=0, read=0, write=0)
    read = 4 + selected * 4 + (selected * (R + N) + (N * R if selected else 0)) * itemsize
    return dict(flops=2 * selected * N * R + 2 * selected * N, read=read, write=selected * N * itemsize)
