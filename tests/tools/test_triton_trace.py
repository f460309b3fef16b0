"""Tests of pyfastpeft.tools.triton_trace: unique bytes touched by tl.load / tl.store under the interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` on machines without CUDA before this module defines its
kernels; where it is not set (a GPU machine) the kernels compile for the GPU, nothing can be traced,
and the module is skipped.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = pytest.importorskip("triton.language", reason="triton is not installed")

from pyfastpeft.tools.triton_trace import MemoryTrace, trace_memory, unique_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1",
    reason="traces the Triton interpreter: needs TRITON_INTERPRET=1 (set by conftest.py without CUDA)",
)


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _neighbour_sum_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # y[i] = x[i] + x[(i + 1) % n]: every element of x is loaded twice (by two lanes / programs)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(x_ptr + offs, mask=mask, other=0.0)
    b = tl.load(x_ptr + (offs + 1) % n, mask=mask, other=0.0)
    tl.store(y_ptr + offs, a + b, mask=mask)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _atomic_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(out_ptr, tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0)))


def _cdiv(a, b):
    return (a + b - 1) // b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_masked_copy_non_multiple(dtype):
    n, block = 1000, 128  # 8 programs, the last one 104 lanes masked off
    x = torch.randn(n, dtype=dtype)
    y = torch.full_like(x, float("nan"))
    with trace_memory() as tr:
        _copy_kernel[(_cdiv(n, block),)](x, y, n, BLOCK=block)
    assert torch.equal(x, y)
    nbytes = n * x.element_size()
    assert (tr.loaded_bytes, tr.stored_bytes) == (nbytes, nbytes)
    assert (tr.load_ops, tr.store_ops) == (n, n)  # masked-off lanes excluded
    assert tr.loaded_bytes_in(x) == nbytes and tr.stored_bytes_in(x) == 0
    assert tr.stored_bytes_in(y) == nbytes and tr.loaded_bytes_in(y) == 0
    assert tr.load_calls == tr.store_calls == _cdiv(n, block)


def test_repeated_loads_count_once():
    n, block = 300, 64
    x = torch.randn(n)
    y = torch.empty_like(x)
    with trace_memory() as tr:
        _neighbour_sum_kernel[(_cdiv(n, block),)](x, y, n, BLOCK=block)
    torch.testing.assert_close(y, x + torch.roll(x, -1))
    assert tr.loaded_bytes == 4 * n  # unique
    assert tr.load_ops == 2 * n  # with repeats
    assert tr.stored_bytes == 4 * n and tr.store_ops == n


def test_dot_kernel_2d_masks():
    M, K, N = 37, 40, 29  # none a multiple of the blocks
    BM, BN, BK = 16, 16, 16
    a = torch.randn(M, K)
    b = torch.randn(N, K).t()  # non-contiguous (K, N) operand
    c = torch.full((M, N), float("nan"))
    grid = (_cdiv(M, BM), _cdiv(N, BN))
    with trace_memory() as tr:
        _matmul_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                             c.stride(0), c.stride(1), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    torch.testing.assert_close(c, a @ b, rtol=1e-4, atol=1e-4)
    assert tr.loaded_bytes == (M * K + K * N) * 4
    assert tr.stored_bytes == M * N * 4
    assert tr.loaded_bytes_in(a) == M * K * 4 and tr.loaded_bytes_in(b) == K * N * 4
    # A is re-read by every column of programs, B by every row
    assert tr.load_ops == M * K * grid[1] + K * N * grid[0]
    assert tr.store_ops == M * N


def test_atomics_count_as_load_and_store():
    n, block = 70, 32
    x = torch.randn(n)
    out = torch.zeros(1)
    with trace_memory() as tr:
        _atomic_sum_kernel[(_cdiv(n, block),)](x, out, n, BLOCK=block)
    torch.testing.assert_close(out[0], x.sum(), rtol=1e-5, atol=1e-5)
    assert tr.loaded_bytes == 4 * n + 4  # x, and the accumulator read by the read-modify-write
    assert tr.stored_bytes == 4
    assert tr.store_ops == _cdiv(n, block)


def test_patches_restored_and_nesting():
    from triton.runtime import interpreter as interp

    cls = interp.InterpreterBuilder
    before = {n: cls.__dict__.get(n) for n in ("create_load", "create_masked_load", "create_store",
                                                 "create_masked_store")}
    n = 50
    x, y = torch.randn(n), torch.empty(n)
    with trace_memory() as outer:
        with trace_memory() as inner:
            _copy_kernel[(1,)](x, y, n, BLOCK=64)
        _copy_kernel[(1,)](x, y, n, BLOCK=64)
    assert inner.load_ops == n and outer.load_ops == 2 * n
    assert outer.loaded_bytes == inner.loaded_bytes == 4 * n
    assert {k: cls.__dict__.get(k) for k in before} == before

    with pytest.raises(RuntimeError, match="boom"):
        with trace_memory():
            raise RuntimeError("boom")
    assert {k: cls.__dict__.get(k) for k in before} == before

    # outside any trace nothing is recorded
    _copy_kernel[(1,)](x, y, n, BLOCK=64)
    assert outer.load_ops == 2 * n
    assert isinstance(outer, MemoryTrace)


def test_unique_bytes_intervals():
    import numpy as np

    addrs = np.array([0, 4, 4, 8, 2], dtype=np.int64)
    widths = np.array([4, 4, 4, 2, 4], dtype=np.int64)
    assert unique_bytes(addrs, widths) == 10  # [0, 10)
    assert unique_bytes(np.array([0, 100]), np.array([8, 8])) == 16
    assert unique_bytes(np.zeros(0, np.int64), np.zeros(0, np.int64)) == 0
