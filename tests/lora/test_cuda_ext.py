"""The raw CUDA ops of pyfastpeft._C (torch.ops.pyfastpeft_C.*) against float64 PyTorch.

GPU tests carry ``gpu`` and ``cuda_ext`` (they run on a machine with a CUDA GPU and the extension built);
the CPU test carries only ``cuda_ext``: a built extension must reject CPU tensors with an error that
names the device. The skipif marks repeat conftest's rule so this file is safe on its own.
Tolerances come from pyfastpeft.testing.compare (fp32: reduction-length rule; fp16/bf16: 2x plain
PyTorch's own error at that precision plus a floor).
"""
import pytest
import torch

from pyfastpeft.core import ext as _ext
from pyfastpeft.core import twin as _twin
from pyfastpeft.families import twin_checks
from pyfastpeft.testing import compare

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_ext = pytest.mark.skipif(not _ext.has_op("lora_shrink"),
                               reason=f"pyfastpeft._C not available: {_ext.LOAD_ERROR}")


def gpu_ext(fn):
    return pytest.mark.gpu(pytest.mark.cuda_ext(needs_gpu(needs_ext(fn))))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "row-sliced", "transposed"]

# (M, K, R): odd sizes, R = 1, M = 0, K = 0, every rank-chunk template (4/8/16/32) and R > 32 / > 128.
SHRINK_SHAPES = [
    (37, 120, 3), (1, 64, 1), (0, 64, 8), (64, 0, 4), (16, 128, 8), (17, 129, 16), (300, 1000, 32),
    (257, 1000, 64), (33, 130, 128), (17, 77, 200), (2048, 4096, 16),
]
# (M, N, R)
EXPAND_SHAPES = [
    (37, 72, 3), (1, 5, 1), (0, 8, 4), (8, 0, 4), (8, 8, 0), (33, 129, 31), (300, 1000, 16),
    (65, 257, 64), (40, 200, 129), (2048, 4096, 16),
]


def _place(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` on the GPU as a contiguous tensor, a column slice of a wider one, or a transposed view."""
    if layout == "row-sliced":
        buf = torch.full((t.shape[0], t.shape[1] + 3), float("nan"), dtype=t.dtype, device="cuda")
        buf[:, : t.shape[1]] = t
        return buf[:, : t.shape[1]]
    if layout == "transposed":
        return t.T.contiguous().cuda().T
    return t.cuda()


@gpu_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M,K,R", [pytest.param(*s, id="M{}-K{}-R{}".format(*s)) for s in SHRINK_SHAPES])
def test_lora_shrink_matches_torch(M, K, R, dtype, layout):
    gen = torch.Generator().manual_seed(M * 7919 + K * 31 + R)
    x = torch.randn(M, K, generator=gen, dtype=torch.float64).to(dtype)
    a = torch.randn(R, K, generator=gen, dtype=torch.float64).to(dtype)
    ref64 = x.double() @ a.double().T
    xg, ag = _place(x, layout), a.cuda()
    u = torch.ops.pyfastpeft_C.lora_shrink(xg, ag)
    torch.cuda.synchronize()
    assert u.shape == (M, R) and u.dtype == dtype and u.device == xg.device
    assert torch.isfinite(u).all()
    ref_lo = None if dtype == torch.float32 else (xg @ ag.T)
    v = compare(u, ref64, ref_lo, reduction=K)
    assert v.ok, f"lora_shrink M={M} K={K} R={R} {dtype} {layout}: {v}"


@gpu_ext
@pytest.mark.parametrize("scale", [0.5, -2.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M,N,R", [pytest.param(*s, id="M{}-N{}-R{}".format(*s)) for s in EXPAND_SHAPES])
def test_lora_expand_add_matches_torch(M, N, R, dtype, scale):
    gen = torch.Generator().manual_seed(M * 7919 + N * 31 + R)
    y = torch.randn(M, N, generator=gen, dtype=torch.float64).to(dtype)
    u = torch.randn(M, R, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(N, R, generator=gen, dtype=torch.float64).to(dtype)
    ref64 = y.double() + scale * (u.double() @ b.double().T)
    # y is a column slice of a wider buffer whose extra columns must stay untouched
    buf = torch.full((M, N + 5), 7.0, dtype=dtype, device="cuda")
    buf[:, :N] = y.cuda()
    yg, ug, bg = buf[:, :N], u.cuda(), b.cuda()
    ref_lo = None if dtype == torch.float32 else torch.addmm(y.cuda(), ug, bg.T, alpha=scale)
    out = torch.ops.pyfastpeft_C.lora_expand_add_(yg, ug, bg, scale)
    torch.cuda.synchronize()
    assert out is None
    assert (buf[:, N:] == 7.0).all(), "lora_expand_add_ wrote outside y"
    assert torch.isfinite(yg).all()
    v = compare(yg, ref64, ref_lo, reduction=R + 1)
    assert v.ok, f"lora_expand_add_ M={M} N={N} R={R} {dtype} scale={scale}: {v}"


@gpu_ext
def test_ops_run_on_the_current_stream():
    x = torch.randn(64, 256, device="cuda")
    a = torch.randn(8, 256, device="cuda")
    y = torch.zeros(64, 32, device="cuda")
    b = torch.randn(32, 8, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        u = torch.ops.pyfastpeft_C.lora_shrink(x, a)
        torch.ops.pyfastpeft_C.lora_expand_add_(y, u, b, 1.0)
    s.synchronize()
    ref = (x.double() @ a.double().T) @ b.double().T
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-3)


@gpu_ext
@pytest.mark.parametrize("op", sorted(twin_checks()))
def test_twin_checks_pass_on_this_gpu(op):
    err = twin_checks()[op](torch.device("cuda"))
    assert err <= _twin.THRESHOLD, f"{op}: normalised error {err:.3g} > {_twin.THRESHOLD}"


@gpu_ext
def test_lora_shrink_argument_errors():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="a must have the dtype of x"):
        torch.ops.pyfastpeft_C.lora_shrink(x, torch.randn(2, 8, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"a must have shape \(R, K\)"):
        torch.ops.pyfastpeft_C.lora_shrink(x, torch.randn(2, 9, device="cuda"))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.pyfastpeft_C.lora_shrink(x.double(), torch.randn(2, 8, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.pyfastpeft_C.lora_shrink(x, torch.randn(2, 8))
    with pytest.raises(RuntimeError, match=r"x must be 2-D \(M, K\)"):
        torch.ops.pyfastpeft_C.lora_shrink(x[None], torch.randn(2, 8, device="cuda"))


@gpu_ext
def test_lora_expand_add_argument_errors():
    y = torch.zeros(4, 6, device="cuda")
    u = torch.randn(4, 2, device="cuda")
    b = torch.randn(6, 2, device="cuda")
    with pytest.raises(RuntimeError, match="contiguous in its last dimension"):
        torch.ops.pyfastpeft_C.lora_expand_add_(torch.zeros(6, 4, device="cuda").T, u, b, 1.0)
    with pytest.raises(RuntimeError, match=r"b must have shape \(N, R\)"):
        torch.ops.pyfastpeft_C.lora_expand_add_(y, u, torch.randn(6, 3, device="cuda"), 1.0)
    with pytest.raises(RuntimeError, match="u must have the dtype of y"):
        torch.ops.pyfastpeft_C.lora_expand_add_(y, u.half(), b, 1.0)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.pyfastpeft_C.lora_expand_add_(y, u.cpu(), b, 1.0)


@pytest.mark.cuda_ext
@needs_ext
def test_cpu_tensors_are_rejected_with_the_device_named():
    # Only the CUDA dispatch key is registered: the dispatcher refuses CPU tensors and says so.
    with pytest.raises((NotImplementedError, RuntimeError), match="CPU"):
        torch.ops.pyfastpeft_C.lora_shrink(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises((NotImplementedError, RuntimeError), match="CPU"):
        torch.ops.pyfastpeft_C.lora_expand_add_(torch.zeros(3, 5), torch.randn(3, 2), torch.randn(5, 2), 1.0)


# ------------------------------------------------------------------------------ token-selective LoRA
@gpu_ext
@pytest.mark.parametrize("op", ["gated_gate", "gated_expand_add_"])
def test_gated_twin_checks_pass_on_this_gpu(op):
    assert twin_checks()[op](torch.device("cuda")) <= _twin.THRESHOLD


GATED_CASES = [(37, 120, 72, 3, dt) for dt in DTYPES] + [(64, 64, 160, 128, dt) for dt in DTYPES] + [
    (0, 32, 16, 4, torch.float32), (2100, 256, 136, 16, torch.float32)]  # M = 2100: three scan chunks


@gpu_ext
@pytest.mark.parametrize("M,K,N,R,dtype", GATED_CASES, ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else None)
def test_gated_cuda_backend_matches_reference(M, K, N, R, dtype):
    """The whole ``cuda`` backend of ``gated_lora_linear`` (forward kernels, torch backward) vs fp64, with
    τ in the widest gap between the ratios of the middle half of the tokens, so that rounding cannot flip a
    token's selection (fp16/bf16 only at small M, where the gaps are wide)."""
    import pyfastpeft as pfp
    from pyfastpeft.reference import gated_lora_linear_ref
    from pyfastpeft.testing import FWD_FACTOR, GRAD_FACTOR, lora_inputs

    d = lora_inputs(M, K, N, R, dtype=torch.float64, bias=True)
    _, _, ratio = gated_lora_linear_ref(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["scale"],
                                        torch.tensor(0.0, dtype=torch.float64), return_gate=True)
    r = ratio.sort().values
    if M >= 4:
        lo, hi = M // 4, 3 * M // 4
        k = lo + int((r[lo + 1:hi + 1] - r[lo:hi]).argmax())
        tau = float((r[k] + r[k + 1]) / 2)
    else:
        tau = 0.1
    gy = torch.randn(M, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(dt, dev, backend):
        t = {k: (v.to(dev, dt) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
        x, a, b = (t[k].requires_grad_() for k in ("x", "lora_a", "lora_b"))
        tt = torch.tensor(tau, device=dev, dtype=torch.float64 if dt == torch.float64 else torch.float32,
                          requires_grad=True)
        if backend is None:
            y = gated_lora_linear_ref(x, t["weight"], t["bias"], a, b, t["scale"], tt)
        else:
            y = pfp.gated_lora_linear(x, t["weight"], t["bias"], a, b, t["scale"], tt, backend=backend)
        return (y,) + torch.autograd.grad(y, (x, a, b, tt), gy.to(dev, y.dtype))

    got = run(dtype, "cuda", "cuda")
    want = run(torch.float64, "cpu", None)
    want_lo = run(dtype, "cuda", None) if dtype != torch.float32 else (None,) * 5
    red = {0: K + R, 1: N + R + K, 2: M + N, 3: M + R, 4: M * (N + R)}
    for i, name in enumerate(("y", "dx", "dA", "dB", "dtau")):
        v = compare(got[i].cpu(), want[i], None if want_lo[i] is None else want_lo[i].cpu(),
                    factor=FWD_FACTOR if i == 0 else GRAD_FACTOR, reduction=red[i],
                    as_dtype=dtype if name == "dtau" else None)
        assert v.ok, f"{name}: {v}"
