"""Declared cost of each LoRA Triton launch: FLOPs and unique HBM bytes (read, write).

"Unique bytes" is every element a launch loads or stores, counted once: the HBM traffic when tiles
that are re-read hit L2. A test runs each kernel under the interpreter and checks these formulas
against the distinct addresses its ``tl.load`` / ``tl.store`` touch. FLOPs count what the kernel
issues, including the shrink each N tile recomputes (``fwd``) and ``dy B`` each K tile recomputes (``dx``).
Default block sizes are the first shipped GPU config of each kernel.
"""
from __future__ import annotations


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fwd_cost(M: int, N: int, K: int, R: int, itemsize: int, *, has_bias: bool, has_xl: bool, block_n: int = 128):
    """``_lora_fwd_kernel``: y = x Wᵀ + bias + scale·(x_lora Aᵀ) Bᵀ, u = x_lora Aᵀ."""
    n_tiles = _cdiv(N, block_n) if M and N else 0
    flops = 2 * M * N * K + 2 * M * K * R * n_tiles + 2 * M * N * R
    if not (M and N):
        return dict(flops=0, read=0, write=0)
    read = M * K + (M * K if has_xl else 0) + N * K + R * K + N * R + (N if has_bias else 0)
    write = M * N + M * R
    return dict(flops=flops, read=read * itemsize, write=write * itemsize)


def bwd_dx_cost(M: int, N: int, K: int, R: int, itemsize: int, *, dx_mode: int, block_k: int = 128):
    """``_lora_bwd_dx_kernel``: g = scale·dy B, and dx = dy W + g A (mode 1) or apart (mode 2)."""
    if not (M and N):
        return dict(flops=0, read=0, write=0)
    k_tiles = _cdiv(K, block_k) if dx_mode else 1
    flops = 2 * M * N * R * k_tiles + ((2 * M * N * K + 2 * M * R * K) if dx_mode else 0)
    read = M * N + N * R + ((N * K + R * K) if dx_mode else 0)
    write = M * R + (M * K if dx_mode else 0) + (M * K if dx_mode == 2 else 0)
    return dict(flops=flops, read=read * itemsize, write=write * itemsize)


def tn_cost(M: int, P: int, Q: int, itemsize: int):
    """``_matmul_tn_kernel``: C (P, Q) = alpha·Pmatᵀ Qmat reduced over M."""
    if not M:
        return dict(flops=0, read=0, write=0)
    return dict(flops=2 * M * P * Q, read=(M * P + M * Q) * itemsize, write=P * Q * itemsize)
