"""gram_accumulate (SFP's accumulation op): every available backend vs the fp64 reference; blocked
summation independent of how rows are batched or split; declared bytes vs the interpreter's traffic;
the custom op's fake and schema (opcheck)."""
import os

import pytest
import torch

from pyfastpeft import available_backends, testing
from pyfastpeft.subtractive.gram_accumulate import gram_accumulate
from pyfastpeft.subtractive.reference import gram_accumulate_ref

BACKENDS = available_backends("gram_accumulate", "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 20, 11), (5, 3, 40), (70, 1, 17)]  # odd sizes; several 16-wide tiles under the interpreter


def _on_grid(*shape, g):
    """Random values exactly representable in fp16 *and* bf16, so every dtype holds the same inputs and
    the fp64 reference is exact for all of them (the op's output is fp32 whatever the input dtype)."""
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(torch.bfloat16).to(torch.float16).double()


def _check(out, ref, M):
    # G, C entries are sums of M products: the fp32 rule with reduction length M (also for fp32 results
    # added up in fp64 between batches)
    v = testing.compare(out, ref, reduction=M, as_dtype=torch.float32)
    assert v.ok, str(v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gram_accumulate_matches_reference(backend, dtype, M, K, N, bias):
    g = torch.Generator().manual_seed(M * 7 + K)
    x64, y64 = _on_grid(M, K, g=g), _on_grid(M, N, g=g)
    G, C = gram_accumulate(x64.to(dtype), y64.to(dtype), bias=bias, backend=backend)
    G0, C0 = gram_accumulate_ref(x64, y64, bias)
    assert G.dtype == C.dtype == torch.float32
    assert G.shape == G0.shape and C.shape == C0.shape
    _check(G, G0, M)
    _check(C, C0, M)
    if backend == "triton":
        assert torch.equal(G, G.t()), "G must be exactly symmetric (mirrored tiles)"
    _check(G.t(), G0, M)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_accumulate_strided_inputs(backend):
    g = torch.Generator().manual_seed(1)
    xt = _on_grid(24, 45, g=g)  # x = xt.T: column-major (45, 24)
    ybig = _on_grid(45, 30, g=g)
    x, y = xt.t().float(), ybig[:, ::2].float()  # y: a strided column slice
    G, C = gram_accumulate(x, y, backend=backend)
    G0, C0 = gram_accumulate_ref(x.double(), y.double())
    _check(G, G0, 45)
    _check(C, C0, 45)


@pytest.mark.parametrize("M", [50, 20000])  # one block; three 8192-row blocks added in fp64
def test_gram_accumulate_fp64_torch_exact(M):
    x, y = torch.randn(M, 7, dtype=torch.float64), torch.randn(M, 4, dtype=torch.float64)
    G, C = gram_accumulate(x, y, backend="torch")
    G0, C0 = gram_accumulate_ref(x, y)
    assert G.dtype == torch.float64
    torch.testing.assert_close(G, G0, **testing.FP64_TOL)
    torch.testing.assert_close(C, C0, **testing.FP64_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_batches_equal_one_batch(backend):
    """Streaming: the sum of per-batch statistics equals one big batch (fp64 accumulation between batches)."""
    x, y = torch.randn(333, 19), torch.randn(333, 9)
    Gb, Cb = gram_accumulate(x, y, backend=backend)
    Gs = torch.zeros(20, 20, dtype=torch.float64)
    Cs = torch.zeros(20, 9, dtype=torch.float64)
    for xs, ys in zip(x.split(37), y.split(37)):
        g_, c_ = gram_accumulate(xs, ys, backend=backend)
        Gs += g_.double()
        Cs += c_.double()
    G0, C0 = gram_accumulate_ref(x, y)
    _check(Gs, G0, 333)
    _check(Cs, C0, 333)
    _check(Gb, Gs, 333)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel in the interpreter")
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_triton_splits_and_blocks(splits):
    """Row splits (fp64 between them) and Kahan blocks (32 rows under the interpreter) give the same sums."""
    pytest.importorskip("triton")
    from pyfastpeft.triton_kernels.subtractive import gram_accumulate as tk

    x, y = torch.randn(150, 21), torch.randn(150, 18)
    G, C = tk.gram_fwd(x, y, True, splits=splits)
    G0, C0 = gram_accumulate_ref(x, y)
    _check(G, G0, 150)
    _check(C, C0, 150)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="traces the Triton interpreter")
@pytest.mark.parametrize("M, K, N, bias", [(37, 20, 11, True), (64, 33, 16, False), (5, 3, 40, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_declared_bytes(M, K, N, bias, dtype):
    """Each element of x and y is read once (unique bytes), and each split writes its G and C once."""
    pytest.importorskip("triton")
    from pyfastpeft.triton_kernels.subtractive import gram_accumulate as tk
    from pyfastpeft.tools.triton_trace import trace_memory

    x, y = torch.randn(M, K).to(dtype), torch.randn(M, N).to(dtype)
    with trace_memory() as tr:
        tk.gram_fwd(x, y, bias, splits=2)
    c = tk.gram_cost(M, K, N, x.element_size(), bias=bias, block_d=16, splits=2)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
    assert tr.loaded_bytes_in(x) == x.numel() * x.element_size()
    assert tr.loaded_bytes_in(y) == y.numel() * y.element_size()


def test_cost_model_bandwidth_bound():
    """d = 768 bf16 on the modeled H100: X and Y read once; the tensor-core FLOPs decide the time."""
    from pyfastpeft.tools import perf
    from pyfastpeft.triton_kernels.subtractive._gram_accumulate_cost import gram_cost

    M, d = 10 ** 6, 768
    c = gram_cost(M, d, d, 2)
    assert c["read"] - M * 2 * d * 2 < 1e5  # the rows once, plus the tile table
    cnt = perf.count(lambda a, b: gram_accumulate(a, b), torch.empty(M, d, dtype=torch.bfloat16),
                     torch.empty(M, d, dtype=torch.bfloat16))
    assert cnt.launches == 2  # the kernel and the split reduction
    assert cnt.bytes >= M * 2 * d * 2


def test_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same number of rows"):
        gram_accumulate(x, torch.randn(5, 2))
    with pytest.raises(ValueError, match="2-D"):
        gram_accumulate(torch.randn(4, 3, 1), torch.randn(4, 2))
    with pytest.raises(ValueError, match="dtype"):
        gram_accumulate(x, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="no gradient"):
        gram_accumulate(x.requires_grad_(), torch.randn(4, 2))
    with pytest.raises(ValueError, match="floating"):
        gram_accumulate(torch.ones(4, 3, dtype=torch.int32), torch.ones(4, 2, dtype=torch.int32))


def test_opcheck_and_fake():
    x, y = torch.randn(9, 5), torch.randn(9, 3)
    torch.library.opcheck(torch.ops.pyfastpeft.gram_accumulate.default, (x, y, True, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        G, C = torch.ops.pyfastpeft.gram_accumulate(torch.empty(9, 5), torch.empty(9, 3), False, None)
    assert G.shape == (5, 5) and C.shape == (5, 3)


def test_torch_backend_blocks():
    """More rows than one fp32 block (8192): blocks are added in fp64; the error stays at one block's."""
    g = torch.Generator().manual_seed(2)
    x, y = _on_grid(20000, 9, g=g).float(), _on_grid(20000, 5, g=g).float()
    G, C = gram_accumulate(x, y, backend="torch")
    G0, C0 = gram_accumulate_ref(x, y)
    _check(G, G0, 8192)
    _check(C, C0, 8192)
    assert G[9, 9] == 20000


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("M, d", [(50_000, 768), (3_001, 1024)])
def test_triton_on_gpu(dtype, M, d):
    """The compiled kernel (real tiles, several row splits, Kahan blocks of 1024 rows) vs the fp64 reference."""
    if "triton" not in available_backends("gram_accumulate", "cuda"):
        pytest.skip("triton is not installed")
    g = torch.Generator().manual_seed(0)
    x64, y64 = _on_grid(M, d, g=g), _on_grid(M, d, g=g)
    G, C = gram_accumulate(x64.to("cuda", dtype), y64.to("cuda", dtype), backend="triton")
    G0, C0 = gram_accumulate_ref(x64, y64)
    _check(G.cpu(), G0, M)
    _check(C.cpu(), C0, M)
    assert torch.equal(G, G.t())
