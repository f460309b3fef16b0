"""``pfp.cayley`` vs the fp64 reference for every backend here: ``R`` and ``dv`` for the exact transform
(both conventions) and PEFT's Cayley-Neumann series (T = 1..8, with and without the eps rescale);
orthogonality of the exact fp32 result for ``b ≤ 64`` and ``‖Q‖_F`` up to 10; fp16/bf16 parameters;
argument errors."""
import math

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.orthogonal import torch_impl as fb
from pyfastpeft.orthogonal.reference import cayley_ref, neumann_series_ref, skew_ref
from pyfastpeft.testing import compare

BACKENDS = pfp.available_backends("cayley", "cpu")


def _v(G, b, q_norm, seed=0, dtype=torch.float64):
    """Random packed generators whose skew matrices have Frobenius norm ``q_norm`` (never zero)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(G, b * (b - 1) // 2, generator=g, dtype=torch.float64)
    v = v * (q_norm / math.sqrt(2.0) / v.norm(dim=1, keepdim=True))  # ‖Q‖_F = √2 ‖v‖
    return v.to(dtype)


def _grad_check(backend, v64, b, dtype=torch.float32, **kw):
    """R and dv from ``backend`` in fp32 vs the fp64 reference (random upstream gradient)."""
    v = v64.to(dtype).requires_grad_()
    R = pfp.cayley(v, b, backend=backend, **kw)
    gR = torch.randn(R.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (dv,) = torch.autograd.grad(R, v, gR.to(R.dtype))
    vr = v64.detach().clone().requires_grad_()
    R64 = cayley_ref(vr, b, **kw)
    (dv64,) = torch.autograd.grad(R64, vr, gR, allow_unused=True, materialize_grads=True)
    return R, R64, dv, dv64


# The fp32 error of R grows with cond(I ± Q) <= 1 + ‖Q‖₂ and with b (the length of the solve's
# reductions); ``reduction`` below is the longest chain of rounded sums behind each result.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", ["minus", "plus"])
@pytest.mark.parametrize("G,b,q", [(3, 2, 0.5), (4, 5, 1.0), (5, 16, 2.0), (2, 33, 1.0), (2, 64, 3.0),
                                   (2, 100, 1.0), (1, 128, 2.0)])
def test_cayley_exact_vs_reference(backend, convention, G, b, q):
    R, R64, dv, dv64 = _grad_check(backend, _v(G, b, q, seed=b), b, method="exact", convention=convention)
    assert R.dtype == torch.float32
    v = compare(R, R64, reduction=4 * b * (1 + q))
    assert v.ok, f"R: {v}"
    v = compare(dv, dv64, reduction=8 * b * (1 + q) ** 2)
    assert v.ok, f"dv: {v}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("terms", range(1, 9))
def test_cayley_neumann_vs_reference(backend, terms):
    b = 12
    R, R64, dv, dv64 = _grad_check(backend, _v(3, b, 0.6, seed=terms), b, method="neumann", terms=terms)
    assert compare(R, R64, reduction=b * terms).ok
    assert compare(dv, dv64, reduction=b * terms * terms).ok


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.3, 0.9, 50.0])
def test_cayley_neumann_eps_rescale(backend, eps):
    """PSOFT's Frobenius rescale, per block; 50 leaves Q alone (‖Q‖ = 2); the gradient goes through the norm."""
    b = 9
    R, R64, dv, dv64 = _grad_check(backend, _v(4, b, 2.0, seed=11), b, method="neumann", terms=6, eps=eps)
    assert compare(R, R64, reduction=b * 6).ok
    assert compare(dv, dv64, reduction=b * 36).ok


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,terms,eps", [(40, 5, None), (64, 6, 0.9), (64, 3, None), (64, 2, None)])
def test_cayley_neumann_large_blocks(backend, b, terms, eps):
    """Blocks above 32 (the Triton kernels' workspace path: products as rank-1 updates through memory)."""
    R, R64, dv, dv64 = _grad_check(backend, _v(2, b, 1.2, seed=b + terms), b, method="neumann", terms=terms, eps=eps)
    v = compare(R, R64, reduction=b * terms)
    assert v.ok, f"R: {v}"
    v = compare(dv, dv64, reduction=b * terms * terms)
    assert v.ok, f"dv: {v}"


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend's dispatch")
def test_cayley_triton_limits():
    """Triton: exact forward to b = 128 (one launch), exact backward kernel to 64 (above it the triton backend
    runs two batched GEMMs from the saved R), Neumann to 64 both ways (one launch each); beyond, torch."""
    from pyfastpeft.orthogonal import cayley as cy

    for b, method, fwd, bwd in ((128, "exact", "triton:cayley_fwd", "aten.bmm"),
                                (64, "exact", "triton:cayley_fwd", "triton:cayley_bwd"),
                                (64, "neumann", "triton:cayley_fwd", "triton:cayley_bwd"),
                                (65, "neumann", None, None), (129, "exact", None, None)):
        v = torch.zeros(2, b * (b - 1) // 2, requires_grad=True)
        want = "triton" if fwd else "torch"
        assert cy.FWD.explain(torch.device("cpu"), v, b, method, "minus", 5, None).chosen == want, (b, method)
        if fwd:
            c = pfp.perf.count(lambda t: pfp.cayley(t, b, method=method, backend="triton"), v, mode="fwd+bwd")
            assert [o.name for o in c.phase("fwd").ops] == [fwd], (b, method)
            assert bwd in [o.name for o in c.phase("bwd").ops], (b, method)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [2, 8, 31, 64])
def test_cayley_exact_orthogonal(backend, b):
    """‖RᵀR − I‖_max <= 1e-5 in fp32 for b <= 64 and ‖Q‖_F up to 10 (one batch: blocks of norm 0.1, 1, 10)."""
    v = torch.cat([_v(1, b, q, seed=b + i, dtype=torch.float32) for i, q in enumerate((0.1, 1.0, 10.0))])
    for convention in ("minus", "plus"):
        R = pfp.cayley(v, b, convention=convention, backend=backend)
        err = (R.mT @ R - torch.eye(b)).abs().amax(dim=(1, 2))
        assert err.max().item() <= 1e-5, f"b={b} {convention}: ‖RᵀR − I‖_max per block (‖Q‖ 0.1, 1, 10) = {err}"


def test_cayley_conventions_are_transposes():
    v = _v(3, 7, 1.5)
    Rm = pfp.cayley(v, 7, convention="minus", backend="torch")
    Rp = pfp.cayley(v, 7, convention="plus", backend="torch")
    torch.testing.assert_close(Rm.mT, Rp, rtol=1e-12, atol=1e-12)


def test_neumann_series_is_peft_term_for_term():
    """T=3 and T=4 give the same I + 2Q + 2Q² + Q³ (PEFT's loop); T=5 adds 2Q³ + Q⁴."""
    Q = skew_ref(_v(2, 6, 0.5), 6)
    eye = torch.eye(6, dtype=torch.float64)
    s3 = eye + 2 * Q + 2 * Q @ Q + Q @ Q @ Q
    torch.testing.assert_close(neumann_series_ref(Q, 3), s3)
    torch.testing.assert_close(neumann_series_ref(Q, 4), s3)
    torch.testing.assert_close(neumann_series_ref(Q, 5), s3 + Q @ Q @ Q + Q @ Q @ Q @ Q)
    assert fb.neumann_coeffs(3) == fb.neumann_coeffs(4) == [1.0, 2.0, 2.0, 1.0]
    assert fb.neumann_coeffs(6) == [1.0, 2.0, 2.0, 2.0, 2.0, 1.0]


def test_cayley_fallback_gradcheck():
    """The hand-derived backward (exact from R alone; Neumann by reverse recursion; eps chain) in fp64."""
    for kw in (dict(method="exact", convention="minus"), dict(method="exact", convention="plus"),
               dict(method="neumann", terms=5), dict(method="neumann", terms=7, eps=0.4)):
        v = _v(2, 5, 1.2).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: pfp.cayley(t, 5, backend="torch", **kw), (v,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cayley_half_params_solve_in_fp32(backend, dtype):
    """fp16/bf16 parameters: R is solved in fp32 and rounded once (PEFT #3087 solved in half precision)."""
    b = 24
    v = _v(2, b, 3.0, dtype=dtype).requires_grad_()
    R = pfp.cayley(v, b, backend=backend)
    assert R.dtype == dtype
    want = cayley_ref(v.detach().double(), b).to(dtype)  # exact maths on the rounded v, one rounding
    ulp = torch.finfo(dtype).eps
    assert (R.double() - want.double()).abs().max().item() <= 2 * ulp
    R.backward(torch.randn_like(R))
    assert v.grad.dtype == dtype and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cayley_backward_twice(backend):
    v = _v(3, 8, 1.0, dtype=torch.float32).requires_grad_()
    R = pfp.cayley(v, 8, method="neumann", backend=backend)
    g = torch.randn_like(R)
    (d1,) = torch.autograd.grad(R, v, g, retain_graph=True)
    (d2,) = torch.autograd.grad(R, v, g)
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(v=torch.zeros(3, 5), block_size=4), "block_size\\*\\(block_size-1\\)/2"),
    (dict(v=torch.zeros(3, 6), block_size=0), "block_size"),
    (dict(v=torch.zeros(3, 6), block_size=4, method="lu"), "method"),
    (dict(v=torch.zeros(3, 6), block_size=4, convention="left"), "convention"),
    (dict(v=torch.zeros(3, 6), block_size=4, method="neumann", terms=0), "terms"),
    (dict(v=torch.zeros(3, 6), block_size=4, eps=0.5), "eps"),
    (dict(v=torch.zeros(3, 6), block_size=4, method="neumann", eps=-1.0), "eps"),
    (dict(v=torch.zeros(6), block_size=4), "v must have shape"),
    (dict(v=torch.zeros(3, 6, dtype=torch.int32), block_size=4), "floating"),
])
def test_cayley_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pfp.cayley(**kwargs)


def test_cayley_explain_and_forced_backend():
    v = torch.zeros(2, 6)
    assert "torch" in str(pfp.explain("cayley", v, 4, backend="torch"))
    with pytest.raises(pfp.BackendUnavailable):
        pfp.cayley(v, 4, backend="cuda")


def test_cayley_declared_cost():
    """One launch for the whole batch (the Triton kernel's declared cost), forward and backward."""
    v = torch.zeros(128, 32 * 31 // 2, requires_grad=True)
    c = pfp.perf.count(lambda t: pfp.cayley(t, 32), v, mode="fwd+bwd")
    names = [o.name for o in c.ops]
    assert names.count("triton:cayley_fwd") == 1 and names.count("triton:cayley_bwd") == 1


@pytest.mark.skipif("triton" not in BACKENDS, reason="traces the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("method,terms,eps", [("exact", 5, None), ("neumann", 5, None), ("neumann", 3, 0.5)])
@pytest.mark.parametrize("G,b,vdtype", [(3, 7, torch.float32), (2, 20, torch.bfloat16)])
def test_cayley_triton_declared_bytes(method, terms, eps, G, b, vdtype):
    """The declared cost formulas equal the bytes the kernels' loads and stores touch."""
    from pyfastpeft.triton_kernels.orthogonal import cayley as tk
    from pyfastpeft.tools.triton_trace import trace_memory

    v = _v(G, b, 1.0, dtype=vdtype)
    with trace_memory() as tr:
        R = tk.cayley_fwd(v, b, method, "minus", terms, eps)
    c = tk.cayley_fwd_cost(G, b, method, terms, v.element_size())
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
    dR = torch.randn(G, b, b)
    with trace_memory() as tr:
        tk.cayley_bwd(dR, v, R, b, method, "minus", terms, eps)
    c = tk.cayley_bwd_cost(G, b, method, terms, v.element_size())
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


def test_cayley_twin_check_separates_right_from_wrong():
    """The first-use check of the CUDA kernel accepts exact fp32 maths and rejects the other convention."""
    from pyfastpeft.core import twin as _twin
    from pyfastpeft.families import twin_checks
    from pyfastpeft.orthogonal import twin as orthogonal_twin

    good = lambda v, b, minus: fb.cayley_fwd(v, b, "exact", "minus" if minus else "plus", 5, None)  # noqa: E731
    bad = lambda v, b, minus: fb.cayley_fwd(v, b, "exact", "plus" if minus else "minus", 5, None)  # noqa: E731
    assert orthogonal_twin.check_cayley_exact(torch.device("cpu"), good) <= _twin.THRESHOLD / 4
    assert orthogonal_twin.check_cayley_exact(torch.device("cpu"), bad) > 100 * _twin.THRESHOLD
    assert "cayley_exact" in orthogonal_twin.TWIN_CHECKS and "cayley_exact" in twin_checks()


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("b", [2, 7, 32, 64, 128])
def test_cayley_cuda_kernel(b):
    v = _v(9, b, 3.0, dtype=torch.float32).cuda().requires_grad_()
    for convention in ("minus", "plus"):
        R = pfp.cayley(v, b, convention=convention, backend="cuda")
        R64 = cayley_ref(v.detach().double().cpu(), b, convention=convention)
        assert compare(R.cpu(), R64, reduction=4 * b * 4).ok
        assert (R.mT @ R - torch.eye(b, device="cuda")).abs().max().item() <= 1e-5 * max(1, b / 64)
        (dv,) = torch.autograd.grad(R, v, torch.ones_like(R))
        assert torch.isfinite(dv).all()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exact", "neumann"])
def test_cayley_triton_on_gpu(method):
    if "triton" not in pfp.available_backends("cayley", "cuda"):
        pytest.skip("triton not available")
    for b in (8, 32) + ((64,) if method == "exact" else ()):
        v = _v(64, b, 1.0, dtype=torch.bfloat16).cuda().requires_grad_()
        R = pfp.cayley(v, b, method=method, backend="triton").float()
        want = cayley_ref(v.detach().double().cpu(), b, method=method)
        assert (R.cpu().double() - want).abs().max().item() <= 2e-2
