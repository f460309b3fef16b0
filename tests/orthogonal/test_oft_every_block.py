"""OFT linear at every block size PEFT accepts (issue #14): the weight-side identity itself, every backend at
b in {2, 4, 8, 12, 16, 32, 64, 128} on both sides (M > N rotates W, else x), fp32 / fp16 / bf16 (and fp64 on
torch), block_share, exact and Neumann, odd M, 3-D and non-contiguous x, forward and every gradient against
the fp64 reference with random upstream gradients; PEFT's own OFT layer at every block size; saved bytes."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.orthogonal.reference import cayley_ref, oft_linear_ref
from pyfastpeft.testing import FP64_TOL, FWD_FACTOR, GRAD_FACTOR, assert_rel_close, compare, randn
from tests.orthogonal.test_oft_psoft import _check, _grads, _oft_ref_lowp

OFT_BACKENDS = pfp.available_backends("oft_linear", "cpu")
BLOCKS = [2, 4, 8, 12, 16, 32, 64, 128]
METHODS = [dict(method="exact", convention="minus"), dict(method="exact", convention="plus"),
           dict(method="neumann", terms=5), dict(method="neumann", terms=3)]
SIDES = {"weight": (37, 24), "input": (9, 24)}  # (M, N): M > N rotates the weight; odd M either way


def _v(G, b, seed, dtype=torch.float64, norm=0.6):
    """Generators with ‖Q_g‖₂ about ``norm`` whatever b (a random skew b×b with entries σ has ‖Q‖₂ ≈ 2σ√b),
    where PEFT's Neumann series approximates the Cayley transform."""
    g = torch.Generator().manual_seed(seed)
    return randn(G, b * (b - 1) // 2, dtype=dtype, scale=norm / (2 * b ** 0.5), generator=g)


def _case(M, N, K, b, G_v, seed=0, lead=(), bias=True):
    g = torch.Generator().manual_seed(seed)
    return dict(x=randn(*lead, M, K, dtype=torch.float64, generator=g),
                weight=randn(N, K, dtype=torch.float64, scale=K ** -0.5, generator=g),
                bias=randn(N, dtype=torch.float64, generator=g) if bias else None,
                oft_v=_v(G_v, b, seed + 1), gy=randn(*lead, M, N, dtype=torch.float64, generator=g))


# ------------------------------------------------------------------------------------- the identity itself
@pytest.mark.parametrize("kw", METHODS, ids=lambda k: "-".join(map(str, k.values())))
@pytest.mark.parametrize("b,shared", [(2, False), (12, False), (16, True), (32, False)])
def test_weight_side_identity_fp64(kw, b, shared):
    """``dR_g = (x_gᵀ dx_g) R_g⁻ᵀ`` with ``dx = dy W'``, ``W' = W R_bdᵀ``: equal (fp64) to autograd's ``dR``
    through the input-centric reference; and ``x W'ᵀ`` equals ``(x R_bd) Wᵀ``."""
    M, N, K = 29, 10, 3 * b
    G = K // b
    c = _case(M, N, K, b, 1 if shared else G)
    R = cayley_ref(c["oft_v"], b, **kw).detach().requires_grad_()
    Rb = R.expand(G, b, b)
    x, W, dy = c["x"], c["weight"], c["gy"]
    y_in = torch.einsum("mgk,gkc->mgc", x.reshape(M, G, b), Rb).reshape(M, K) @ W.t()
    dR_auto, = torch.autograd.grad(y_in, R, dy)
    Wp = torch.einsum("ngk,gck->ngc", W.reshape(N, G, b), Rb).reshape(N, K)  # W[:, g] R_gᵀ
    torch.testing.assert_close(x @ Wp.t(), y_in.detach(), **FP64_TOL)
    dx = dy @ Wp
    E = torch.einsum("mgi,mgj->gij", x.reshape(M, G, b), dx.reshape(M, G, b))
    if shared:
        E = E.sum(0, keepdim=True)
    dR = torch.linalg.solve(R.detach().transpose(1, 2), E, left=False)  # E R⁻ᵀ
    torch.testing.assert_close(dR, dR_auto, rtol=1e-9, atol=1e-11)
    if kw["method"] == "exact":  # R⁻ᵀ = R
        torch.testing.assert_close(E @ R.detach(), dR_auto, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------ every block size, fp32/fp64
def _run(c, b, kw, backend, dtype, v_dtype):
    def run(fn, dt, vdt, **extra):
        x = c["x"].to(dt).requires_grad_()
        bb = c["bias"].to(dt).requires_grad_() if c["bias"] is not None else None
        v = c["oft_v"].to(vdt).requires_grad_()
        y = fn(x, c["weight"].to(dt), bb, v, b, **kw, **extra)
        return _grads(y, (x, v, bb), c["gy"])

    return run(pfp.oft_linear, dtype, v_dtype, backend=backend), run(oft_linear_ref, torch.float64, torch.float64)


@pytest.mark.parametrize("backend", OFT_BACKENDS)
@pytest.mark.parametrize("kw", [METHODS[0], METHODS[2]], ids=["exact", "neumann5"])
@pytest.mark.parametrize("side", list(SIDES))
@pytest.mark.parametrize("b", BLOCKS)
def test_every_block_size_fp32(backend, kw, side, b):
    M, N = SIDES[side]
    K = 2 * b
    c = _case(M, N, K, b, K // b, seed=b)
    got, want = _run(c, b, kw, backend, torch.float32, torch.float32)
    _check(got, want, [None] * 4, [K + b, N + b, M * b + N, M], ["y", "dx", "doft_v", "dbias"])


@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("side", list(SIDES))
def test_every_block_size_fp64_torch(side, b):
    M, N = SIDES[side]
    c = _case(M, N, 2 * b, b, 1, seed=b + 1)  # block_share too
    got, want = _run(c, b, METHODS[3], "torch", torch.float64, torch.float64)
    for g, w, name in zip(got, want, ["y", "dx", "doft_v", "dbias"]):
        torch.testing.assert_close(g, w, **FP64_TOL, msg=name)


@pytest.mark.parametrize("backend", OFT_BACKENDS)
@pytest.mark.parametrize("kw", [METHODS[1], METHODS[3]], ids=["exact-plus", "neumann3"])
@pytest.mark.parametrize("b", [4, 12, 64])
def test_block_share_3d_noncontiguous(backend, kw, b):
    """block_share, a 3-D input, and a non-contiguous one (a strided view), both sides."""
    K = 2 * b
    for lead, M, N in (((2, 3), 7, 16), ((), 41, 16)):
        c = _case(M, N, K, b, 1, seed=7, lead=lead)
        big = torch.zeros(*lead, M, 2 * K, dtype=torch.float64)
        big[..., ::2] = c["x"]
        c["x"] = big[..., ::2]  # stride 2 along the features
        assert not c["x"].is_contiguous()
        got, want = _run(c, b, kw, backend, torch.float32, torch.float32)
        Mt = M * (6 if lead else 1)
        _check(got, want, [None] * 4, [K + b, N + b, Mt * b + N, Mt], ["y", "dx", "doft_v", "dbias"])


# ----------------------------------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("backend", OFT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("side", list(SIDES))
@pytest.mark.parametrize("b", [2, 12, 32, 128])
def test_half_inputs_every_side(backend, dtype, side, b):
    """16-bit inputs: our weight side rounds ``W'`` once to the compute dtype where PEFT rounds ``x R_bd``;
    judged against fp64 with PEFT's order run in the same dtype as the baseline (tolerances.md §4)."""
    M, N = SIDES[side]
    K = max(2 * b, 32) // b * b  # at least 16 blocks for small b: a max over 2 values makes a fragile baseline
    c = _case(M, N, K, b, K // b, seed=3 * b)
    got, want = _run(c, b, METHODS[2], backend, dtype, torch.float32)
    x = c["x"].to(dtype).requires_grad_()
    bb = c["bias"].to(dtype).requires_grad_()
    v = c["oft_v"].float().requires_grad_()
    want_lo = _grads(_oft_ref_lowp(x, c["weight"].to(dtype), bb, v, b, **METHODS[2]), (x, v, bb), c["gy"])
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    for i, name in enumerate(["y", "dx", "doft_v", "dbias"]):
        v = compare(got[i], want[i], want_lo[i], factor=FWD_FACTOR if i == 0 else GRAD_FACTOR,
                    as_dtype=dtype if name == "doft_v" else None)
        assert v.ok, f"{name}: {v}"


@pytest.mark.parametrize("backend", OFT_BACKENDS)
@pytest.mark.parametrize("norm", [0.3, 0.8])
def test_neumann_weight_side_conditioning(backend, norm):
    """The Neumann ``R_g`` is inverted on the weight side: for T = 5 its singular values are ``|1 − λ⁴|`` over
    the eigenvalues ``±iλ`` of ``Q_g`` (docs/orthogonal.md §3); at ‖Q_g‖₂ ≈ 0.8 (cond ≈ 1.7) the gradient still
    meets the fp32 rule."""
    b, M, N = 16, 45, 12
    c = _case(M, N, 4 * b, b, 4, seed=11)
    c["oft_v"] = _v(4, b, 12, norm=norm)
    got, want = _run(c, b, METHODS[2], backend, torch.float32, torch.float32)
    _check(got, want, [None] * 4, [4 * b + b, N + b, M * b + N, M], ["y", "dx", "doft_v", "dbias"])


# ------------------------------------------------------------------------------------- PEFT's own OFT layer
def _peft_layer(K, N, b, **opts):
    peft = pytest.importorskip("peft")
    warnings.filterwarnings("ignore")
    torch.manual_seed(b)
    m = peft.get_peft_model(nn.Sequential(nn.Linear(K, N)),
                            peft.OFTConfig(target_modules=["0"], r=0, oft_block_size=b, init_weights=False, **opts))
    layer = m.base_model.model[0]
    with torch.no_grad():  # PEFT's random init is large for big b: bring ‖Q_g‖₂ to about 0.6
        w = layer.oft_R["default"].weight
        w.copy_(_v(w.shape[0], b, 5 * b, dtype=torch.float32))
    return layer


@pytest.mark.parametrize("opts", [dict(use_cayley_neumann=True), dict(use_cayley_neumann=False),
                                  dict(use_cayley_neumann=True, block_share=True),
                                  dict(use_cayley_neumann=False, coft=True, eps=1e-3)],
                         ids=["neumann", "exact", "block_share", "coft"])
@pytest.mark.parametrize("M", [40, 6])  # weight side (M > N = 24) and input side
@pytest.mark.parametrize("b", BLOCKS)
def test_vs_peft_every_block_size(b, M, opts):
    """Outputs, dx and the adapter's gradient against PEFT 0.21's ``oft.Linear`` (fp32, norm-wise 1e-5)."""
    from pyfastpeft.nn import OFTLinear

    K, N = 2 * b, 24
    layer = _peft_layer(K, N, b, **opts)
    ours = OFTLinear.from_peft(copy.deepcopy(layer))
    ours.backend = "torch"
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g)
    gy = torch.randn(M, N, generator=g)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yo = layer(xp), ours(xo)
    assert_rel_close("y", yo, yp)
    yp.backward(gy)
    yo.backward(gy)
    assert_rel_close("dx", xo.grad, xp.grad)
    assert_rel_close("oft_v.grad", ours.oft_v.grad, layer.oft_R["default"].weight.grad)


@pytest.mark.skipif("triton" not in OFT_BACKENDS, reason="runs the Triton kernels in the interpreter")
@pytest.mark.parametrize("b", [12, 32])
@pytest.mark.parametrize("M", [40, 6])
def test_vs_peft_triton(b, M):
    from pyfastpeft.nn import OFTLinear

    K, N = 2 * b, 24
    layer = _peft_layer(K, N, b, use_cayley_neumann=True)
    ours = OFTLinear.from_peft(copy.deepcopy(layer))
    ours.backend = "triton"
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    gy = torch.randn(M, N, generator=torch.Generator().manual_seed(M + 1))
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yo = layer(xp), ours(xo)
    assert_rel_close("y", yo, yp)
    yp.backward(gy)
    yo.backward(gy)
    assert_rel_close("dx", xo.grad, xp.grad)
    assert_rel_close("oft_v.grad", ours.oft_v.grad, layer.oft_R["default"].weight.grad)


@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("M", [16, 256])  # input side and weight side (N = 128)
def test_saved_bytes_not_above_peft(b, M):
    """Activation bytes saved for backward (bf16 base, fp32 adapter): ours (x and R; W' is rebuilt) ≤ PEFT's
    (its fp32 rotated copy of x and more), on both sides."""
    from pyfastpeft.nn import OFTLinear

    layer = _peft_layer(128, 128, b, use_cayley_neumann=True)
    ours = OFTLinear.from_peft(copy.deepcopy(layer))
    ours.backend = "torch"
    layer.get_base_layer().to(torch.bfloat16)
    ours.base_layer.to(torch.bfloat16)
    x = torch.randn(M, 128, dtype=torch.bfloat16, requires_grad=True)
    s_ours = pfp.perf.saved_bytes(ours, x).total_bytes
    s_peft = pfp.perf.saved_bytes(layer, x).total_bytes
    assert s_ours <= s_peft, (s_ours, s_peft)
    assert s_ours <= M * 128 * 2 + 128 * b * 4 + 4096  # x (bf16) + R (fp32) + small bookkeeping
