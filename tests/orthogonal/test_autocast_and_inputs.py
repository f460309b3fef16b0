"""The orthogonal family under ``torch.autocast`` and with awkward inputs (``docs/orthogonal.md`` §7-8).

* Autocast: every op x every backend here x {bf16, fp16}, forward and every gradient, against the fp64
  reference with :func:`pyfastpeft.testing.check_autocast` (fp32 leaves, the low-precision rule with the
  reference itself under autocast as the baseline); the output dtype (``nn.Linear``'s for OFT/PSOFT, ``v``'s
  for Cayley); a backward called inside autocast equals one called outside; the layers in a tiny training
  step; the layers against PEFT's own under autocast.
* Non-finite inputs: NaN/inf ``scale`` and ``eps`` raise a ``ValueError`` naming them on every backend, 0-d
  tensors are accepted wherever a number is; a NaN/inf in row i of ``x`` gives the same masks (output and
  gradients) on every backend and in the reference.
* Dtype mismatches: a bias, frozen factors or vectors in another dtype are cast (as ``lora_linear`` does);
  a weight in another dtype outside autocast raises a ``ValueError`` naming ``weight``.
"""
import math

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.nn import OFTLinear, PSOFTLinear
from pyfastpeft.orthogonal.reference import cayley_ref, oft_linear_ref, psoft_linear_ref
from pyfastpeft.testing import FWD_FACTOR, GRAD_FACTOR, check_autocast, compare, randn
from tests.orthogonal.test_oft_psoft import _psoft_leaves
from tests.orthogonal.test_orthogonal_module import _perturb

CAYLEY_BACKENDS = pfp.available_backends("cayley", "cpu")
OFT_BACKENDS = pfp.available_backends("oft_linear", "cpu")
PSOFT_BACKENDS = pfp.available_backends("psoft_linear", "cpu")
LOWP = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _assert_verdicts(verdicts, names):
    bad = {k: str(verdicts[k]) for k in names if not verdicts[k].ok}
    assert not bad, bad


def _oft_triton_skip(backend, b):
    if backend == "triton":
        from pyfastpeft.triton_kernels.orthogonal._oft_cost import oft_triton_supports

        why = oft_triton_supports(torch.bfloat16, b)
        if why is not None:
            pytest.skip(f"fused Triton OFT: {why}")


# ============================================================================================ autocast: ops
CAYLEY_CASES = [
    pytest.param(dict(G=3, b=16, q=0.3, method="exact", convention="minus"), id="b16-exact-minus"),
    pytest.param(dict(G=4, b=7, q=0.5, method="exact", convention="plus"), id="b7-exact-plus"),
    pytest.param(dict(G=3, b=16, q=0.2, method="neumann", terms=5), id="b16-neumann-T5"),
    pytest.param(dict(G=2, b=9, q=0.5, method="neumann", terms=4, eps=0.4), id="b9-neumann-T4-eps"),
]


def cayley_autocast_case(c, backend, dtype, device="cpu"):
    g = torch.Generator().manual_seed(c["b"])
    leaves = dict(v=randn(c["G"], c["b"] * (c["b"] - 1) // 2, dtype=torch.float64, scale=c["q"], generator=g))
    kw = {k: c[k] for k in ("method", "convention", "terms", "eps") if k in c}
    return check_autocast(lambda v: pfp.cayley(v, c["b"], backend=backend, **kw),
                          lambda v: cayley_ref(v, c["b"], **kw), leaves, ("v",), dtype, device=device)


@pytest.mark.parametrize("backend", CAYLEY_BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("c", CAYLEY_CASES)
def test_cayley_autocast(c, dtype, backend):
    v = cayley_autocast_case(c, backend, dtype)
    assert v["dtype"] == torch.float32  # R in v's dtype (an fp32 parameter), solved in fp32 as documented
    _assert_verdicts(v, ("out", "v"))


OFT_CASES = [
    pytest.param(dict(lead=(), M=21, K=48, N=40, b=16, G_v=None, bias=True, method="exact"), id="b16-exact"),
    pytest.param(dict(lead=(2,), M=5, K=32, N=24, b=16, G_v=1, bias=True, method="neumann", terms=5),
                 id="3D-b16-neumann-shared"),
    pytest.param(dict(lead=(), M=40, K=24, N=8, b=8, G_v=None, bias=False, method="neumann", terms=3),
                 id="M>N-b8-neumann-nobias"),
]


def _oft_kw(c):
    return {k: c[k] for k in ("method", "convention", "terms") if k in c}


def oft_autocast_case(c, backend, dtype, device="cpu"):
    g = torch.Generator().manual_seed(c["K"])
    G = c["K"] // c["b"]
    leaves = dict(
        x=randn(*c["lead"], c["M"], c["K"], dtype=torch.float64, generator=g),
        weight=randn(c["N"], c["K"], dtype=torch.float64, scale=c["K"] ** -0.5, generator=g),
        bias=randn(c["N"], dtype=torch.float64, generator=g) if c["bias"] else None,
        oft_v=randn(c["G_v"] or G, c["b"] * (c["b"] - 1) // 2, dtype=torch.float64, scale=0.15, generator=g))
    kw = _oft_kw(c)
    grads = ("x", "oft_v") + (("bias",) if c["bias"] else ())
    return check_autocast(lambda x, weight, bias, oft_v: pfp.oft_linear(x, weight, bias, oft_v, c["b"],
                                                                        backend=backend, **kw),
                          lambda x, weight, bias, oft_v: oft_linear_ref(x, weight, bias, oft_v, c["b"], **kw),
                          leaves, grads, dtype, device=device), grads


@pytest.mark.parametrize("backend", OFT_BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("c", OFT_CASES)
def test_oft_linear_autocast(c, dtype, backend):
    _oft_triton_skip(backend, c["b"])
    v, grads = oft_autocast_case(c, backend, dtype)
    assert v["dtype"] == dtype  # what nn.Linear returns under autocast
    _assert_verdicts(v, ("out",) + grads)


PSOFT_CASES = [
    pytest.param(dict(lead=(), M=21, K=48, N=40, r=8, vec=(True, True), bias=True, method="exact"), id="r8-exact"),
    pytest.param(dict(lead=(2,), M=5, K=30, N=17, r=6, vec=(False, True), bias=False, method="neumann", terms=4,
                      eps=0.5), id="3D-r6-neumann-eps-vb"),
]


def psoft_autocast_case(c, backend, dtype, device="cpu", scale=1.5):
    leaves = dict(_psoft_leaves(c, seed=c["K"] + c["r"]), scale=scale)
    kw = {k: c[k] for k in ("method", "terms", "eps") if k in c}
    grads = ("x", "psoft_v") + tuple(n for n, on in zip(("vector_a", "vector_b"), c["vec"]) if on)
    grads += ("bias",) if c["bias"] else ()
    return check_autocast(lambda **a: pfp.psoft_linear(**a, backend=backend, **kw),
                          lambda **a: psoft_linear_ref(**a, **kw), leaves, grads, dtype, device=device), grads


@pytest.mark.parametrize("backend", PSOFT_BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("c", PSOFT_CASES)
def test_psoft_linear_autocast(c, dtype, backend):
    v, grads = psoft_autocast_case(c, backend, dtype)
    assert v["dtype"] == dtype
    _assert_verdicts(v, ("out",) + grads)


def test_psoft_linear_autocast_tensor_scale():
    """A 0-d tensor ``scale`` under autocast: same verdicts as the number."""
    c = dict(lead=(), M=9, K=16, N=12, r=4, vec=(True, True), bias=True, method="exact")
    v, grads = psoft_autocast_case(c, "torch", torch.bfloat16, scale=torch.tensor(1.5))
    _assert_verdicts(v, ("out",) + grads)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("backend", CAYLEY_BACKENDS)
@pytest.mark.parametrize("c", CAYLEY_CASES)
def test_cayley_autocast_changes_nothing(c, backend, dtype):
    """The transform and its backward stay fp32 under autocast: the same bits as without it (the looser
    rule of ``check_autocast`` would also pass a Neumann series run in 16 bits)."""
    kw = {k: c[k] for k in ("method", "convention", "terms", "eps") if k in c}
    v0 = torch.randn(c["G"], c["b"] * (c["b"] - 1) // 2, generator=torch.Generator().manual_seed(4)) * c["q"]
    out = []
    for on in (False, True):
        v = v0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=on):
            R = pfp.cayley(v, c["b"], backend=backend, **kw)
        out.append((R,) + torch.autograd.grad(R, v, torch.ones_like(R) / 3))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("op,backend", [("oft", b) for b in OFT_BACKENDS] + [("psoft", b) for b in PSOFT_BACKENDS])
def test_autocast_equals_explicit_cast(op, backend, dtype):
    """Under autocast an fp32 call computes exactly what the same call on inputs already cast to the
    autocast dtype computes out of autocast (fp32 rotations, 16-bit GEMMs): the same bits, forward and
    backward (gradients compared in the 16-bit leaves' dtype)."""
    g = torch.Generator().manual_seed(0)
    x0, w = torch.randn(2, 9, 32, generator=g), torch.randn(24, 32, generator=g) / 32 ** 0.5
    bias0 = torch.randn(24, generator=g)
    if op == "oft":
        v0 = torch.randn(2, 120, generator=g) * 0.1

        def f(x, w, b, v):
            return pfp.oft_linear(x, w, b, v, 16, method="neumann", backend=backend)
    else:
        a, bb = torch.randn(4, 32, generator=g) / 32 ** 0.5, torch.randn(24, 4, generator=g) / 2
        v0 = torch.randn(6, generator=g) * 0.2

        def f(x, w, b, v):
            return pfp.psoft_linear(x, w, b, a.to(x.dtype), bb.to(x.dtype), v, None, None, 1.5, backend=backend)
    out = []
    for on in (True, False):
        x = (x0 if on else x0.to(dtype)).clone().requires_grad_()
        b = (bias0 if on else bias0.to(dtype)).clone().requires_grad_()
        v = v0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=on):
            y = f(x, w if on else w.to(dtype), b, v)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
        out.append([y] + list(torch.autograd.grad(y, (x, b, v), gy)))
    for n, a, b in zip(("y", "dx", "dbias", "dv"), *out):
        assert a.dtype == (torch.float32 if n in ("dx", "dbias", "dv") else dtype), n
        torch.testing.assert_close(a.to(b.dtype), b, rtol=0, atol=0, msg=n)


def _grads_inside_outside(fn, leaves, dtype):
    out = []
    for inside in (False, True):
        ls = [t.detach().clone().requires_grad_() for t in leaves]
        with torch.autocast("cpu", dtype=dtype):
            y = fn(*ls)
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
            if inside:
                gs = torch.autograd.grad(y, ls, gy)
        if not inside:
            gs = torch.autograd.grad(y, ls, gy)
        out.append((y,) + tuple(gs))
    return out


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("op,backend", [("cayley", b) for b in CAYLEY_BACKENDS] + [("oft", b) for b in OFT_BACKENDS]
                         + [("psoft", b) for b in PSOFT_BACKENDS])
def test_backward_inside_autocast_equals_outside(op, backend, dtype):
    """The backward replays the forward's autocast state: calling it inside or outside ``torch.autocast``
    gives the same bits (PEFT's own ops would compute the backward in whichever state is current)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 32, generator=g)
    w = torch.randn(24, 32, generator=g) / 32 ** 0.5
    if op == "cayley":
        fn = lambda v: pfp.cayley(v, 16, method="neumann", backend=backend)  # noqa: E731
        leaves = [torch.randn(2, 120, generator=g) * 0.2]
    elif op == "oft":
        fn = lambda x, b, v: pfp.oft_linear(x, w, b, v, 16, method="exact", backend=backend)  # noqa: E731
        leaves = [x, torch.randn(24, generator=g), torch.randn(2, 120, generator=g) * 0.1]
    else:
        a, bb = torch.randn(4, 32, generator=g) / 32 ** 0.5, torch.randn(24, 4, generator=g) / 2
        fn = lambda x, b, v, va: pfp.psoft_linear(x, w, b, a, bb, v, va, None, 2.0,  # noqa: E731
                                                  method="neumann", backend=backend)
        leaves = [x, torch.randn(24, generator=g), torch.randn(6, generator=g) * 0.2,
                  1 + torch.randn(4, generator=g) / 10]
    outside, inside = _grads_inside_outside(fn, leaves, dtype)
    for a, b in zip(outside, inside):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ======================================================================================== autocast: modules
def _oft_layer(backend):
    torch.manual_seed(0)
    layer = _perturb(OFTLinear.from_linear(nn.Linear(32, 24), 16, method="exact"))
    layer.backend = backend
    return layer


def _psoft_layer(backend):
    torch.manual_seed(0)
    layer = _perturb(PSOFTLinear.from_linear(nn.Linear(32, 24), 6, 12, method="neumann", eps=0.5))
    layer.backend = backend
    return layer


def module_autocast_case(kind, backend, dtype):
    """``check_autocast`` on a layer (fp32 base, fp32 adapter): its adapter parameters are the leaves."""
    from torch.func import functional_call

    layer = _oft_layer(backend) if kind == "oft" else _psoft_layer(backend)
    base = layer.base_layer
    g = torch.Generator().manual_seed(2)
    x = randn(3, 7, 32, dtype=torch.float64, generator=g)
    W, b = base.weight.detach().double(), base.bias.detach().double()
    if kind == "oft":
        leaves = dict(x=x, oft_v=layer.oft_v.detach().double())

        def ref(x, oft_v):
            return oft_linear_ref(x, W.to(x.dtype), b.to(x.dtype), oft_v, 16, method="exact")
    else:
        leaves = dict(x=x, psoft_v=layer.psoft_v.detach().double(), vector_a=layer.vector_a.detach().double(),
                      vector_b=layer.vector_b.detach().double())
        A, B = layer.psoft_a.double(), layer.psoft_b.double()

        def ref(x, psoft_v, vector_a, vector_b):
            return psoft_linear_ref(x, W.to(x.dtype), b.to(x.dtype), A.to(x.dtype), B.to(x.dtype), psoft_v,
                                    vector_a, vector_b, layer.scaling, method="neumann", eps=0.5)

    def call(x, **params):
        return functional_call(layer, params, (x,))

    grads = tuple(leaves)
    return check_autocast(call, ref, leaves, grads, dtype), grads


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("kind,backend", [("oft", b) for b in OFT_BACKENDS] + [("psoft", b) for b in PSOFT_BACKENDS])
def test_modules_autocast_vs_reference(kind, backend, dtype):
    """The layers (fp32 base, fp32 adapter) under autocast: output in the autocast dtype, output and adapter
    gradients within the low-precision rule of the fp64 reference."""
    v, grads = module_autocast_case(kind, backend, dtype)
    assert v["dtype"] == dtype
    _assert_verdicts(v, ("out",) + grads)


@pytest.mark.parametrize("dtype", LOWP)
def test_modules_autocast_training_step(dtype):
    """A tiny model (fp32 bases, OFT then PSOFT) trained under autocast: the output is in the autocast dtype,
    the adapters stay fp32 with finite fp32 gradients, the frozen bases do not move, and the loss goes down."""
    torch.manual_seed(0)
    model = nn.Sequential(OFTLinear.from_linear(nn.Linear(32, 32), 16), nn.ReLU(),
                          PSOFTLinear.from_linear(nn.Linear(32, 8), 4, 8))
    for m in model:
        if hasattr(m, "backend"):
            m.backend = None  # automatic dispatch, as in a user's model
    bases = [m.base_layer.weight.detach().clone() for m in (model[0], model[2])]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.Adam(trainable, lr=2e-2)
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            y = model(x)
            assert y.dtype == dtype
            loss = (y.float() - target).pow(2).mean()
        loss.backward()
        for p in trainable:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in trainable)
    for m, w0 in zip((model[0], model[2]), bases):
        assert torch.equal(m.base_layer.weight, w0) and not m.base_layer.weight.requires_grad


@pytest.mark.filterwarnings("ignore")  # PEFT's own warnings
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("kind", ["oft-neumann", "oft-exact", "psoft"])
def test_modules_autocast_vs_peft(kind, dtype):
    """PEFT's own layers under autocast (fp32 base and input). Output dtype: PEFT's ``psoft.Linear`` returns
    the autocast dtype (as ``nn.Linear`` and ours); PEFT's ``oft.Linear`` casts its result back to the input's
    dtype (fp32). Values: ours are judged against fp64 with PEFT's own autocast error as the baseline (the
    low-precision rule), for the output and the adapter's gradients."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    if kind.startswith("oft"):
        cfg = peft.OFTConfig(target_modules=["0"], r=0, oft_block_size=16, use_cayley_neumann=kind == "oft-neumann")
    else:
        cfg = peft.PsoftConfig(target_modules=["0"], r=6, psoft_alpha=12)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(32, 24)), cfg)
    layer = model.base_model.model[0]
    if kind.startswith("oft"):
        peft_params = {"oft_v": layer.oft_R["default"].weight}
    else:
        R = layer.psoft_R["default"]
        peft_params = {"psoft_v": R.weight, "vector_a": R.vector_a, "vector_b": R.vector_b}
    peft_params = {k: p for k, p in peft_params.items() if p is not None}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ours = (OFTLinear if kind.startswith("oft") else PSOFTLinear).from_peft(layer)
    ours.backend = "torch"
    names = list(peft_params)
    params, ours_params = list(peft_params.values()), [getattr(ours, n) for n in names]
    x = torch.randn(10, 32, generator=g)
    gy = torch.randn(10, 24, generator=g, dtype=torch.float64)

    def run(mod, ps, dt=None, xx=x):
        with torch.autocast("cpu", dtype=dtype, enabled=dt is None):
            y = mod(xx)
        return (y,) + torch.autograd.grad(y, ps, gy.to(y.dtype))

    peft_out = run(layer, params)
    ours_out = run(ours, ours_params)
    assert peft_out[0].dtype == (torch.float32 if kind.startswith("oft") else dtype)
    assert ours_out[0].dtype == dtype
    ours64 = _double_copy(ours)
    want = run(ours64, [getattr(ours64, n) for n in names], torch.float64, x.double())
    for i, (o, p, w) in enumerate(zip(ours_out, peft_out, want)):
        v = compare(o, w, p.to(o.dtype) if i == 0 else p, factor=FWD_FACTOR if i == 0 else GRAD_FACTOR,
                    as_dtype=dtype)
        assert v.ok, f"{(['y'] + names)[i]}: {v}"


def _double_copy(layer):
    import copy

    m = copy.deepcopy(layer).double()
    m.backend = "torch"
    return m


# ===================================================================================== non-finite scalars
def _psoft_args(**over):
    g = torch.Generator().manual_seed(0)
    a = dict(x=torch.randn(3, 12, generator=g), weight=torch.randn(5, 12, generator=g), bias=None,
             psoft_a=torch.randn(4, 12, generator=g), psoft_b=torch.randn(5, 4, generator=g),
             psoft_v=torch.randn(6, generator=g) * 0.2, vector_a=None, vector_b=None, scale=1.0)
    a.update(over)
    return a


BAD_SCALARS = [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan")), torch.tensor(float("inf")),
               True, torch.tensor([1.0, 2.0]), "1.0"]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("backend", PSOFT_BACKENDS + [None, "triton", "cuda"])
@pytest.mark.parametrize("scale", BAD_SCALARS, ids=repr)
def test_psoft_bad_scale_raises_naming_it(scale, backend, autocast):
    """One answer on every backend (even one that cannot run here: the argument is checked first)."""
    a = _psoft_args(scale=scale)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with pytest.raises(ValueError, match="scale"):
            pfp.psoft_linear(*a.values(), backend=backend)


@pytest.mark.parametrize("backend", PSOFT_BACKENDS)
def test_psoft_tensor_scale_equals_number(backend):
    a = _psoft_args(vector_a=torch.ones(4) * 1.1)
    want = pfp.psoft_linear(*a.values(), backend=backend)
    for s in (torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64), torch.tensor([1.0]), 1):
        a["scale"] = s
        torch.testing.assert_close(pfp.psoft_linear(*a.values(), backend=backend), want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CAYLEY_BACKENDS + [None])
@pytest.mark.parametrize("eps", [float("nan"), float("inf"), torch.tensor(float("nan")), True, 0.0, -1.0], ids=repr)
def test_bad_eps_raises_naming_it(eps, backend):
    v = torch.randn(2, 6) * 0.3
    with pytest.raises(ValueError, match="eps"):
        pfp.cayley(v, 4, method="neumann", eps=eps, backend=backend)
    a = _psoft_args()
    with pytest.raises(ValueError, match="eps"):
        pfp.psoft_linear(*a.values(), method="neumann", eps=eps, backend="torch")
    with pytest.raises(ValueError, match="eps"):
        OFTLinear.from_linear(nn.Linear(8, 4), 4, coft=True, eps=eps)


@pytest.mark.parametrize("backend", CAYLEY_BACKENDS)
def test_tensor_eps_alpha_equal_numbers(backend):
    v = torch.randn(2, 36) * 0.5
    want = pfp.cayley(v, 9, method="neumann", eps=0.4, backend=backend)
    got = pfp.cayley(v, 9, method="neumann", eps=torch.tensor(0.4), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    a = _psoft_args()
    want = pfp.psoft_linear(*a.values(), method="neumann", eps=0.3)
    torch.testing.assert_close(pfp.psoft_linear(*a.values(), method="neumann", eps=torch.tensor(0.3)), want,
                               rtol=0, atol=0)
    assert OFTLinear.from_linear(nn.Linear(8, 4), 4, coft=True, eps=torch.tensor(1e-3)).eps == pytest.approx(1e-3)
    layer = PSOFTLinear.from_linear(nn.Linear(8, 6), 4, torch.tensor(8.0))
    assert layer.alpha == 8.0 and layer.scaling == 2.0
    with pytest.raises(ValueError, match="alpha"):
        PSOFTLinear.from_linear(nn.Linear(8, 6), 4, float("nan"))


# ========================================================================================= non-finite x
def _nonfinite_leaves(kind, bad, seed=0):
    g = torch.Generator().manual_seed(seed)
    M, K, N = 20, 48, 12  # M > N: the torch backend rotates W instead of x in fp32 (another path, same masks)
    L = dict(x=torch.randn(M, K, generator=g), weight=torch.randn(N, K, generator=g) / K ** 0.5,
             bias=torch.randn(N, generator=g))
    L["x"][3, 5] = bad  # block 0 of OFT
    L["x"][7, 40] = bad  # block 2
    if kind == "oft":
        L["v"] = torch.randn(3, 120, generator=g) * 0.15
    else:
        r = 6
        L.update(a=torch.randn(r, K, generator=g) / K ** 0.5, b=torch.randn(N, r, generator=g) / r ** 0.5,
                 v=torch.randn(r * (r - 1) // 2, generator=g) * 0.2, va=1 + torch.randn(r, generator=g) / 10,
                 vb=1 + torch.randn(r, generator=g) / 10)
    return L


def _nonfinite_run(kind, L, fn, dtype, autocast, kw):
    x = L["x"].to(dtype).requires_grad_()
    bias = L["bias"].to(dtype).requires_grad_()
    v = L["v"].to(torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
    leaves = [x, v, bias]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if kind == "oft":
            y = fn(x, L["weight"].to(dtype), bias, v, 16, **kw)
        else:
            va, vb = (t.to(v.dtype).requires_grad_() for t in (L["va"], L["vb"]))
            leaves += [va, vb]
            y = fn(x, L["weight"].to(dtype), bias, L["a"].to(dtype), L["b"].to(dtype), v, va, vb, 1.5, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    return [y] + list(torch.autograd.grad(y, leaves, gy))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind,kw", [
    ("oft", dict(method="exact")), ("oft", dict(method="neumann", terms=1)), ("oft", dict(method="neumann", terms=2)),
    ("oft", dict(method="neumann", terms=5)), ("psoft", dict(method="exact")),
    ("psoft", dict(method="neumann", terms=5, eps=0.3))], ids=lambda v: "-".join(map(str, v.values()))
    if isinstance(v, dict) else v)
def test_nonfinite_x_same_masks_everywhere(kind, kw, bad, autocast):
    """NaN (or ±inf) in rows 3 and 7 of x: rows 3 and 7 of y are NaN (non-finite), every other row is finite;
    dx and dbias stay finite; the generator's gradient (OFT: in the blocks hit, here 0 and 2, all of them for
    the exact transform; PSOFT: all of it, and the vectors') is NaN (non-finite). Same masks for every
    backend and for the reference."""
    L = _nonfinite_leaves(kind, bad)
    backends = OFT_BACKENDS if kind == "oft" else PSOFT_BACKENDS
    ref = oft_linear_ref if kind == "oft" else psoft_linear_ref
    op = pfp.oft_linear if kind == "oft" else pfp.psoft_linear
    bad_mask = torch.isnan if math.isnan(bad) else (lambda t: ~torch.isfinite(t))
    names = ["y", "dx", "dv", "dbias"] + (["dvector_a", "dvector_b"] if kind == "psoft" else [])
    want = [bad_mask(t) for t in _nonfinite_run(kind, L, ref, torch.float32, autocast, kw)]
    rows = torch.zeros(20, dtype=torch.bool)
    rows[[3, 7]] = True
    assert torch.equal(want[0], rows[:, None].expand(-1, 12)), "reference: rows 3 and 7 only, all of them"
    assert not want[1].any() and not want[3].any()
    if kind == "oft":
        assert want[2].any(dim=1).tolist() == [True, False, True]
        assert kw["method"] != "exact" or want[2].all(dim=1).tolist() == [True, False, True]
    else:
        assert all(w.all() for w in (want[2], want[4], want[5]))
    for be in backends:
        got = [bad_mask(t) for t in _nonfinite_run(kind, L, lambda *a, **k: op(*a, backend=be, **k), torch.float32,
                                                   autocast, kw)]
        for n, gm, wm in zip(names, got, want):
            assert torch.equal(gm, wm), f"{be}: {n} mask differs from the reference's"


# ====================================================================================== dtype mismatches
@pytest.mark.parametrize("backend", OFT_BACKENDS)
@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_oft_bias_in_another_dtype_is_cast(backend, bias_dtype):
    """As ``lora_linear``: the bias is cast to the compute dtype; its gradient comes back in its own dtype."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 32, generator=g), torch.randn(20, 32, generator=g) / 32 ** 0.5
    v = torch.randn(2, 120, generator=g) * 0.1
    bias = torch.randn(20, generator=g).to(bias_dtype).requires_grad_()
    y = pfp.oft_linear(x, w, bias, v, 16, backend=backend)
    assert y.dtype == torch.float32
    want = pfp.oft_linear(x, w, bias.detach().float(), v, 16, backend=backend)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    (db,) = torch.autograd.grad(y, bias, torch.ones_like(y))
    assert db.dtype == bias_dtype


@pytest.mark.parametrize("backend", PSOFT_BACKENDS)
def test_psoft_other_dtypes_are_cast(backend):
    """A bias, frozen factors, generator and vectors each in another floating dtype than x: cast, as
    ``lora_linear`` casts its adapters; gradients come back in each leaf's dtype."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 16, generator=g), torch.randn(12, 16, generator=g) / 4
    a, b = torch.randn(4, 16, generator=g) / 4, torch.randn(12, 4, generator=g) / 2
    v = torch.randn(6, generator=g) * 0.2
    va, vb = 1 + torch.randn(4, generator=g) / 10, 1 + torch.randn(4, generator=g) / 10
    bias = torch.randn(12, generator=g)
    want = pfp.psoft_linear(x, w, bias, a, b, v, va, vb, 1.5, backend=backend)
    mixed = dict(bias=bias.half(), a=a.bfloat16(), b=b.double(), v=v.double(), va=va.half(), vb=vb.bfloat16())
    leaves = {k: t.requires_grad_() for k, t in mixed.items() if k in ("bias", "v", "va", "vb")}
    y = pfp.psoft_linear(x, w, mixed["bias"], mixed["a"], mixed["b"], mixed["v"], mixed["va"], mixed["vb"], 1.5,
                         backend=backend)
    assert y.dtype == torch.float32
    # the same maths on the values the mixed dtypes hold
    ref = pfp.psoft_linear(x, w, mixed["bias"].float(), mixed["a"].float(), mixed["b"].float(), mixed["v"].float(),
                           mixed["va"].float(), mixed["vb"].float(), 1.5, backend=backend)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert (y - want).abs().max() < 0.1  # and close to the all-fp32 result (16-bit rounding of the leaves)
    gs = torch.autograd.grad(y, list(leaves.values()), torch.ones_like(y))
    for (k, t), gr in zip(leaves.items(), gs):
        assert gr.dtype == t.dtype and torch.isfinite(gr).all(), k


@pytest.mark.parametrize("op", ["oft", "psoft"])
def test_weight_dtype_mismatch(op):
    """Out of autocast a weight in another dtype than x raises a ValueError naming ``weight``; under autocast
    it is cast to the autocast dtype (as ``nn.Linear``'s)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 16, generator=g), (torch.randn(8, 16, generator=g) / 4).half()

    def call():
        if op == "oft":
            return pfp.oft_linear(x, w, None, torch.randn(1, 28, generator=g) * 0.1, 8, backend="torch")
        return pfp.psoft_linear(x, w, None, torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g),
                                torch.randn(6, generator=g) * 0.1, None, None, 1.0, backend="torch")

    with pytest.raises(ValueError, match="weight"):
        call()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert call().dtype == torch.bfloat16


# ================================================================================================== GPU
def _gpu_backend(op, backend):
    if backend not in pfp.available_backends(op, "cuda"):
        pytest.skip(f"{backend} not available for {op} on cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("c", CAYLEY_CASES)
def test_cayley_autocast_gpu(c, dtype, backend):
    _gpu_backend("cayley", backend)
    if backend == "cuda" and c["method"] != "exact":
        pytest.skip("the CUDA kernel is the exact solve")
    v = cayley_autocast_case(c, backend, dtype, device="cuda")
    assert v["dtype"] == torch.float32
    _assert_verdicts(v, ("out", "v"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("c", OFT_CASES)
def test_oft_linear_autocast_gpu(c, dtype, backend):
    _gpu_backend("oft_linear", backend)
    _oft_triton_skip(backend, c["b"])
    v, grads = oft_autocast_case(c, backend, dtype, device="cuda")
    assert v["dtype"] == dtype
    _assert_verdicts(v, ("out",) + grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("c", PSOFT_CASES)
def test_psoft_linear_autocast_gpu(c, dtype):
    v, grads = psoft_autocast_case(c, "torch", dtype, device="cuda")
    assert v["dtype"] == dtype
    _assert_verdicts(v, ("out",) + grads)


@pytest.mark.parametrize("kind", ["oft-exact", "oft-neumann", "psoft"])
def test_merge_under_autocast_is_unchanged(kind):
    """``merged()`` / ``unmerged()`` called inside autocast give the fp32 products they give outside it."""
    torch.manual_seed(0)
    if kind.startswith("oft"):
        layer = OFTLinear.from_linear(nn.Linear(32, 24), 16, method=kind[4:])
    else:
        layer = PSOFTLinear.from_linear(nn.Linear(32, 24), 6, 12)
    layer.backend = "torch"
    _perturb(layer)
    want = layer.merged()
    back = layer.unmerged(want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.merged()
        got_back = layer.unmerged(got)
    torch.testing.assert_close(got.weight, want.weight, rtol=0, atol=0)
    torch.testing.assert_close(got_back.weight, back.weight, rtol=0, atol=0)
