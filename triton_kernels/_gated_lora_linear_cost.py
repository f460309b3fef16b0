"""Declared cost of each token-selective LoRA Triton launch: FLOPs and unique HBM bytes (read, write).

Same conventions as ``_lora_linear_cost`` (unique bytes; checked against the interpreter's loads and
stores by ``tests/ops/test_lora_linear_cost.py``).
"""
from __future__ import annotations

from pyfastpeft.triton_kernels._lora_linear_cost import _cdiv, tiles_per_prog


def gated_base_cost(M: int, N: int, K: int, R: int, itemsize: int, *, has_bias: bool, has_xl: bool,
                    block_m: int = 128, block_n: int = 128, tiles: int | None = None):
    """``_gated_fwd_kernel``: y = x Wᵀ + bias, u = x_lora Aᵀ, and fp32 partial row sums of h² per group."""
    if not (M and N):
        return dict(flops=0, read=0, write=0)
    tiles = tiles or tiles_per_prog(M, N, block_m, block_n)
    groups = _cdiv(_cdiv(N, block_n), tiles)
    flops = 2 * M * N * K + 2 * M * K * R * groups + 3 * M * N  # + h² row sums
    read = (M * K + (M * K if has_xl else 0) + N * K + R * K + (N if has_bias else 0)) * itemsize
    write = (M * N + M * R) * itemsize + groups * M * 4
    return dict(flops=flops, read=read, write=write)


def gated_expand_cost(M: int, selected: int, N: int, R: int, itemsize: int):
    """``_gated_expand_kernel``: y_i += s·u_i Bᵀ on the ``selected`` rows; every row's flag is read
    (1 byte), B only by row blocks that hold a selected token."""
    if not (M and N):
        return dict(flops=0, read=0, write=0)
    read = M + (selected * (R + N) + (N * R if selected else 0)) * itemsize
    return dict(flops=2 * selected * N * R + 2 * selected * N, read=read, write=selected * N * itemsize)
