"""``pfp.oft_linear`` and ``pfp.psoft_linear`` vs the fp64 reference for every backend here: outputs and every
gradient (x, the generators, the vectors, bias) with random upstream gradients, odd shapes, 3-D inputs,
block_share, both Cayley methods, fp16/bf16 inputs; argument errors; saved activations vs PEFT's."""
import math

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.orthogonal.reference import oft_linear_ref, psoft_linear_ref
from pyfastpeft.testing import FWD_FACTOR, GRAD_FACTOR, compare, randn

OFT_BACKENDS = pfp.available_backends("oft_linear", "cpu")
PSOFT_BACKENDS = pfp.available_backends("psoft_linear", "cpu")


def _grads(out, leaves, gy):
    want = [t for t in leaves if t is not None and t.requires_grad]
    gs = torch.autograd.grad(out, want, gy.to(out.dtype), allow_unused=True, materialize_grads=True)
    return [out] + list(gs)


def _check(got, want, want_lo, reductions, names):
    for i, (g, w, lo, red, name) in enumerate(zip(got, want, want_lo, reductions, names)):
        assert torch.isfinite(g).all(), f"{name} not finite"
        v = compare(g, w, lo, factor=FWD_FACTOR if i == 0 else GRAD_FACTOR, reduction=red)
        assert v.ok, f"{name}: {v}"


# ------------------------------------------------------------------------------------------------ OFT
OFT_CASES = [
    pytest.param(dict(lead=(), M=37, K=48, N=40, b=8, G_v=None, bias=True), id="M37-K48-N40-b8"),
    pytest.param(dict(lead=(), M=70, K=96, N=130, b=32, G_v=None, bias=True), id="M70-K96-N130-b32"),
    pytest.param(dict(lead=(2, 3), M=5, K=30, N=17, b=5, G_v=None, bias=False), id="3D-b5-nobias"),
    pytest.param(dict(lead=(), M=9, K=64, N=24, b=16, G_v=1, bias=True), id="block_share-b16"),
    pytest.param(dict(lead=(), M=50, K=32, N=8, b=32, G_v=None, bias=True), id="M>N-weight-rotation-b32"),
]
OFT_METHODS = [dict(method="exact", convention="minus"), dict(method="exact", convention="plus"),
               dict(method="neumann", terms=5), dict(method="neumann", terms=3)]


def _oft_leaves(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = c["K"] // c["b"]
    n = c["b"] * (c["b"] - 1) // 2
    return dict(
        x=randn(*c["lead"], c["M"], c["K"], dtype=torch.float64, generator=g),
        weight=randn(c["N"], c["K"], dtype=torch.float64, scale=c["K"] ** -0.5, generator=g),
        bias=randn(c["N"], dtype=torch.float64, generator=g) if c["bias"] else None,
        oft_v=randn(c["G_v"] or G, n, dtype=torch.float64, scale=0.15, generator=g),
    )


def _run_oft(c, kw, backend, dtype=torch.float32):
    L = _oft_leaves(c)
    gy = torch.randn(*c["lead"], c["M"], c["N"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(fn, dt, v_dt, be=None):
        x = L["x"].to(dt).requires_grad_()
        b = None if L["bias"] is None else L["bias"].to(dt).requires_grad_()
        v = L["oft_v"].to(v_dt).requires_grad_()
        args = (x, L["weight"].to(dt), b, v, c["b"])
        y = fn(*args, backend=be, **kw) if be else fn(*args, **kw)
        return _grads(y, (x, v, b), gy)

    got = run(pfp.oft_linear, dtype, torch.float32, backend)
    want = run(oft_linear_ref, torch.float64, torch.float64)
    want_lo = [None] * len(want)  # fp32 cases only (half inputs: test_oft_linear_half_inputs)
    K, N, b = c["K"], c["N"], c["b"]
    M = c["M"] * math.prod(c["lead"])
    red = [K + b, N + b, M * b + N, M]
    return got, want, want_lo, red


@pytest.mark.parametrize("backend", OFT_BACKENDS)
@pytest.mark.parametrize("kw", OFT_METHODS, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("c", OFT_CASES)
def test_oft_linear_vs_reference(backend, kw, c):
    _skip_unsupported(backend, c["b"])
    got, want, want_lo, red = _run_oft(c, kw, backend, torch.float32)
    _check(got, want, want_lo, red, ["y", "dx", "doft_v", "dbias"])


def _skip_unsupported(backend, b, dtype=torch.float32):
    if backend == "triton":
        from pyfastpeft.triton_kernels.orthogonal._oft_cost import oft_triton_supports
        why = oft_triton_supports(dtype, b)  # every block size; fp64 is the torch backend's
        if why is not None:
            pytest.skip(f"Triton OFT: {why} (the torch backend covers it)")


def _oft_ref_lowp(x, weight, bias, oft_v, block_size, **kw):
    # PEFT's order in low precision: rotate in the adapter's fp32, cast, frozen GEMM in x's dtype
    eye = torch.eye(x.shape[-1], device=x.device)
    xr = oft_linear_ref(x.float(), eye, None, oft_v.float(), block_size, **kw).to(x.dtype)
    y = xr @ weight.t()
    return y if bias is None else y + bias


@pytest.mark.parametrize("backend", OFT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_oft_linear_half_inputs(backend, dtype):
    c = dict(lead=(), M=33, K=48, N=40, b=16, G_v=None, bias=True)
    L = _oft_leaves(c, seed=1)
    gy = torch.randn(c["M"], c["N"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(fn, dt, v_dt, **extra):
        x = L["x"].to(dt).requires_grad_()
        b = L["bias"].to(dt).requires_grad_()
        v = L["oft_v"].to(v_dt).requires_grad_()
        y = fn(x, L["weight"].to(dt), b, v, c["b"], method="exact", **extra)
        return _grads(y, (x, v, b), gy)

    got = run(pfp.oft_linear, dtype, torch.float32, backend=backend)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    want = run(oft_linear_ref, torch.float64, torch.float64)
    want_lo = run(_oft_ref_lowp, dtype, torch.float32)
    # doft_v is fp32 but computed from low-precision activations: judge it by the activations' rule
    for i, name in enumerate(["y", "dx", "doft_v", "dbias"]):
        v = compare(got[i], want[i], want_lo[i], factor=FWD_FACTOR if i == 0 else GRAD_FACTOR,
                    as_dtype=dtype if name == "doft_v" else None)
        assert v.ok, f"{name}: {v}"


# ------------------------------------------------------------------------------------------------ PSOFT
PSOFT_CASES = [
    pytest.param(dict(lead=(), M=37, K=48, N=40, r=8, vec=(True, True), bias=True), id="M37-r8"),
    pytest.param(dict(lead=(2, 3), M=5, K=30, N=17, r=17, vec=(False, True), bias=False), id="3D-r=min-vb"),
    pytest.param(dict(lead=(), M=9, K=64, N=24, r=3, vec=(False, False), bias=True), id="r3-novec"),
]
PSOFT_METHODS = [dict(method="exact"), dict(method="neumann", terms=5), dict(method="neumann", terms=4, eps=0.5)]


def _psoft_leaves(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = c["r"]
    return dict(
        x=randn(*c["lead"], c["M"], c["K"], dtype=torch.float64, generator=g),
        weight=randn(c["N"], c["K"], dtype=torch.float64, scale=c["K"] ** -0.5, generator=g),
        bias=randn(c["N"], dtype=torch.float64, generator=g) if c["bias"] else None,
        psoft_a=randn(r, c["K"], dtype=torch.float64, scale=c["K"] ** -0.5, generator=g),
        psoft_b=randn(c["N"], r, dtype=torch.float64, scale=r ** -0.5, generator=g),
        psoft_v=randn(r * (r - 1) // 2, dtype=torch.float64, scale=0.2, generator=g),
        vector_a=(1 + 0.1 * randn(r, dtype=torch.float64, generator=g)) if c["vec"][0] else None,
        vector_b=(1 + 0.1 * randn(r, dtype=torch.float64, generator=g)) if c["vec"][1] else None,
    )


def _run_psoft(c, kw, dtype, fn, param_dtype, gy, **extra):
    L = _psoft_leaves(c)
    x = L["x"].to(dtype).requires_grad_()
    b = None if L["bias"] is None else L["bias"].to(dtype).requires_grad_()
    v = L["psoft_v"].to(param_dtype).requires_grad_()
    va = None if L["vector_a"] is None else L["vector_a"].to(param_dtype).requires_grad_()
    vb = None if L["vector_b"] is None else L["vector_b"].to(param_dtype).requires_grad_()
    y = fn(x, L["weight"].to(dtype), b, L["psoft_a"].to(dtype), L["psoft_b"].to(dtype), v, va, vb, 1.5, **kw,
           **extra)
    return _grads(y, (x, v, va, vb, b), gy)


@pytest.mark.parametrize("backend", PSOFT_BACKENDS)
@pytest.mark.parametrize("kw", PSOFT_METHODS, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("c", PSOFT_CASES)
def test_psoft_linear_vs_reference(backend, kw, c):
    gy = torch.randn(*c["lead"], c["M"], c["N"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _run_psoft(c, kw, torch.float32, pfp.psoft_linear, torch.float32, gy, backend=backend)
    want = _run_psoft(c, kw, torch.float64, psoft_linear_ref, torch.float64, gy)
    M, K, N, r = c["M"] * math.prod(c["lead"]), c["K"], c["N"], c["r"]
    names = ["y", "dx", "dpsoft_v"] + (["dvector_a"] if c["vec"][0] else []) + (["dvector_b"] if c["vec"][1] else [])
    names += ["dbias"] if c["bias"] else []
    red = {"y": K + 2 * r, "dx": N + 2 * r, "dpsoft_v": M * r + N, "dvector_a": M * r + N, "dvector_b": M * r + N,
           "dbias": M}
    _check(got, want, [None] * len(got), [red[n] for n in names], names)


@pytest.mark.parametrize("backend", PSOFT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_psoft_linear_half_inputs(backend, dtype):
    c = dict(lead=(), M=33, K=48, N=40, r=8, vec=(True, True), bias=True)
    gy = torch.randn(c["M"], c["N"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _run_psoft(c, {}, dtype, pfp.psoft_linear, torch.float32, gy, backend=backend)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    want = _run_psoft(c, {}, torch.float64, psoft_linear_ref, torch.float64, gy)

    def ref_lo(x, w, bias, a, b, v, va, vb, s):  # R' in fp32 (as ours and PEFT's solve), the rest in dtype
        from pyfastpeft.orthogonal.reference import cayley_ref
        R = cayley_ref(v.reshape(1, -1), a.shape[0], convention="plus")[0]
        R = vb[:, None] * R * va[None, :]
        u = x @ a.t()
        return x @ w.t() + bias + s * ((u @ R.to(x.dtype).t() - u) @ b.t())

    want_lo = _run_psoft(c, {}, dtype, ref_lo, torch.float32, gy)
    for i, name in enumerate(["y", "dx", "dpsoft_v", "dvector_a", "dvector_b", "dbias"]):
        v = compare(got[i], want[i], want_lo[i], factor=FWD_FACTOR if i == 0 else GRAD_FACTOR,
                    as_dtype=dtype if name.startswith("dpsoft") or name.startswith("dvector") else None)
        assert v.ok, f"{name}: {v}"


def test_psoft_at_init_equals_base():
    c = dict(lead=(), M=7, K=16, N=12, r=4, vec=(True, True), bias=True)
    L = _psoft_leaves(c)
    x, w, b = L["x"].float(), L["weight"].float(), L["bias"].float()
    y = pfp.psoft_linear(x, w, b, L["psoft_a"].float(), L["psoft_b"].float(), torch.zeros(6), torch.ones(4),
                         torch.ones(4), 2.0)
    torch.testing.assert_close(y, x @ w.t() + b)


@pytest.mark.parametrize("backend", OFT_BACKENDS)
def test_oft_backward_twice(backend):
    c = dict(lead=(), M=6, K=32, N=8, b=16, G_v=None, bias=True)
    L = _oft_leaves(c)
    v = L["oft_v"].float().requires_grad_()
    y = pfp.oft_linear(L["x"].float(), L["weight"].float(), None, v, 16, backend=backend)
    g = torch.randn_like(y)
    (d1,) = torch.autograd.grad(y, v, g, retain_graph=True)
    (d2,) = torch.autograd.grad(y, v, g)
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ errors
def _oft_args(**over):
    a = dict(x=torch.randn(3, 12), weight=torch.randn(5, 12), bias=None, oft_v=torch.zeros(3, 6), block_size=4)
    a.update(over)
    return a


@pytest.mark.parametrize("over,match", [
    (dict(block_size=5, oft_v=torch.zeros(3, 10)), "block_size must divide in_features"),
    (dict(oft_v=torch.zeros(3, 5)), "block_size\\*\\(block_size-1\\)/2"),
    (dict(oft_v=torch.zeros(2, 6)), "G = in_features / block_size = 3"),
    (dict(x=torch.randn(3, 11)), "x.shape\\[-1\\]"),
    (dict(method="cg"), "method"),
    (dict(convention="x"), "convention"),
    (dict(method="neumann", terms=0), "terms"),
    (dict(weight=torch.randn(5, 12, requires_grad=True)), "frozen"),
    (dict(bias=torch.zeros(4)), "bias"),
])
def test_oft_bad_arguments(over, match):
    a = _oft_args(**over)
    kw = {k: a.pop(k) for k in ("method", "convention", "terms") if k in a}
    with pytest.raises(ValueError, match=match):
        pfp.oft_linear(*a.values(), **kw)


def _psoft_args(**over):
    a = dict(x=torch.randn(3, 12), weight=torch.randn(5, 12), bias=None, psoft_a=torch.randn(4, 12),
             psoft_b=torch.randn(5, 4), psoft_v=torch.zeros(6), vector_a=None, vector_b=None, scale=1.0)
    a.update(over)
    return a


@pytest.mark.parametrize("over,match", [
    (dict(psoft_a=torch.randn(6, 12), psoft_b=torch.randn(5, 6), psoft_v=torch.zeros(15)), "r = psoft_a.shape\\[0\\]"),
    (dict(psoft_v=torch.zeros(5)), "psoft_v must have shape"),
    (dict(psoft_b=torch.randn(5, 3)), "psoft_b"),
    (dict(vector_a=torch.ones(3)), "vector_a"),
    (dict(scale=float("nan")), "scale"),
    (dict(method="qr"), "method"),
    (dict(method="neumann", terms=-1), "terms"),
    (dict(eps=0.9), "eps"),
])
def test_psoft_bad_arguments(over, match):
    a = _psoft_args(**over)
    kw = {k: a.pop(k) for k in ("method", "terms", "eps") if k in a}
    with pytest.raises(ValueError, match=match):
        pfp.psoft_linear(*a.values(), **kw)


# ------------------------------------------------------------------------------------------------ memory
def test_saved_bytes_below_peft():
    """Activation memory per token (bf16 base, fp32 adapter as PEFT's default): ours saves bf16 x (OFT) or
    bf16 u (PSOFT); PEFT saves its fp32 casts of them (OFT always; PSOFT's rotation runs in fp32 on CPU)."""
    import copy
    import warnings

    from torch import nn
    peft = pytest.importorskip("peft")
    from pyfastpeft.nn import OFTLinear, PSOFTLinear

    warnings.filterwarnings("ignore")

    def per_token(m, K=64):
        s = [pfp.perf.saved_bytes(m, torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)).total_bytes
             for M in (16, 32)]
        return (s[1] - s[0]) / 16

    for cfg, ours_cls in ((peft.OFTConfig(target_modules=["0"], r=0, oft_block_size=16), OFTLinear),
                          (peft.PsoftConfig(target_modules=["0"], r=16), PSOFTLinear)):
        m = peft.get_peft_model(nn.Sequential(nn.Linear(64, 64)), cfg)
        layer = m.base_model.model[0]
        ours = ours_cls.from_peft(layer)
        ours.backend = "torch"
        peft16, ours16 = copy.deepcopy(layer), copy.deepcopy(ours)
        peft16.get_base_layer().to(torch.bfloat16)
        ours16.base_layer.to(torch.bfloat16)
        assert per_token(ours16) < per_token(peft16), type(ours).__name__


def test_custom_ops_opcheck():
    """torch.library.opcheck (schema, fake, aliasing) on every primitive of the family, torch backend."""
    from torch.library import opcheck

    ops = torch.ops.pyfastpeft
    v = torch.randn(3, 6) * 0.2
    R = ops.cayley_fwd(v, 4, "exact", "minus", 5, None, "torch")
    for method, eps in (("exact", None), ("neumann", 0.5)):
        opcheck(ops.cayley_fwd, (v, 4, method, "minus", 5, eps, "torch"))
        opcheck(ops.cayley_bwd, (torch.randn(3, 4, 4), v, R, 4, method, "minus", 5, eps, "torch"))
    x, w, b = torch.randn(5, 12), torch.randn(7, 12), torch.randn(7)
    opcheck(ops.oft_linear_fwd, (x, w, b, R, "torch"))
    for orthogonal in (True, False):
        opcheck(ops.oft_linear_bwd, (torch.randn(5, 7), x, w, R, True, orthogonal, "torch"))
        opcheck(ops.oft_linear_bwd, (torch.randn(15, 7), x.repeat(3, 1), w, R, True, orthogonal, "torch"))
    # PSOFT runs on the LoRA primitives; its backward passes an empty x_lora (A frozen: no dA reduction)
    a, bp = torch.randn(4, 12), torch.randn(7, 4)
    u = x @ a.t()
    for mode in (0, 1):
        opcheck(ops.lora_linear_bwd, (torch.randn(5, 7), torch.empty(0), u, w, a, bp, 1.0, mode, "torch"))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) sees the family as opaque custom ops (aot_eager on CPU): same values and
    gradients as eager."""
    x = torch.randn(5, 16)
    w, a, b = torch.randn(8, 16), torch.randn(4, 16), torch.randn(8, 4)

    def f(v, pv, va):
        y = pfp.oft_linear(x, w[:, :16], None, v, 4, method="exact", backend="torch")
        return pfp.psoft_linear(torch.cat([y, y], 1), w, None, a, b, pv, va, None, 1.5, method="neumann",
                                eps=0.5, backend="torch")

    leaves = [(torch.randn(4, 6) * 0.3), (torch.randn(6) * 0.3), torch.ones(4) + 0.1 * torch.randn(4)]
    eager = [t.clone().requires_grad_() for t in leaves]
    comp = [t.clone().requires_grad_() for t in leaves]
    ye = f(*eager)
    yc = torch.compile(f, fullgraph=True, backend="aot_eager")(*comp)
    torch.testing.assert_close(yc, ye, rtol=0, atol=0)
    g = torch.randn_like(ye)
    ye.backward(g)
    yc.backward(g)
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif("triton" not in OFT_BACKENDS, reason="traces the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("rows,K,b,shared", [(37, 64, 16, False), (70, 96, 32, True), (9, 36, 12, False),
                                             (20, 256, 128, False), (11, 8, 2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_oft_triton_declared_bytes(rows, K, b, shared, dtype):
    """OFT's rotation and diagonal-block kernels: declared bytes equal what their loads and stores touch."""
    from pyfastpeft.orthogonal.torch_impl import cayley_fwd
    from pyfastpeft.tools.triton_trace import trace_memory
    from pyfastpeft.triton_kernels.orthogonal import oft_linear as tk

    G = 1 if shared else K // b
    R = cayley_fwd(torch.randn(G, b * (b - 1) // 2) * 0.1, b, "exact", "minus", 5, None)
    t, c2 = torch.randn(rows, K, dtype=dtype), torch.randn(rows, K, dtype=dtype)
    for transpose in (True, False):
        with trace_memory() as tr:
            tk.rotate(t, R, transpose)
        c = tk.oft_rotate_cost(rows, K, b, G, t.element_size())
        assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
    with trace_memory() as tr:
        tk.diag_blocks(t, c2, b)
    S, _ = tk.diag_splits(rows, K // b, b, 1, interpret=True)
    c = tk.oft_diag_cost(rows, K, b, t.element_size(), S)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


@pytest.mark.gpu
@pytest.mark.parametrize("b", [12, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [300, 50])  # weight side (M > N) and input side
def test_oft_triton_on_gpu(b, dtype, M):
    """The Triton kernels (compiled, not interpreted) vs the fp64 reference on the GPU, 16-bit, with PEFT's
    order in the same dtype as the baseline (tolerances.md §4)."""
    if "triton" not in pfp.available_backends("oft_linear", "cuda"):
        pytest.skip("triton not available")
    c = dict(lead=(), M=M, K=4 * b, N=200, b=b, G_v=None, bias=True)
    L = _oft_leaves(c, seed=1)
    gy = torch.randn(c["M"], c["N"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(fn, dt, v_dt, dev, **extra):
        x = L["x"].to(dev, dt).requires_grad_()
        bb = L["bias"].to(dev, dt).requires_grad_()
        v = L["oft_v"].to(dev, v_dt).requires_grad_()
        y = fn(x, L["weight"].to(dev, dt), bb, v, b, method="neumann", **extra)
        return _grads(y, (x, v, bb), gy.to(dev))

    got = run(pfp.oft_linear, dtype, torch.float32, "cuda", backend="triton")
    want = run(oft_linear_ref, torch.float64, torch.float64, "cpu")
    want_lo = run(_oft_ref_lowp, dtype, torch.float32, "cuda")
    for i, name in enumerate(["y", "dx", "doft_v", "dbias"]):
        v = compare(got[i], want[i], want_lo[i], factor=FWD_FACTOR if i == 0 else GRAD_FACTOR,
                    as_dtype=dtype if name == "doft_v" else None)
        assert v.ok, f"{name}: {v}"


