"""Every available backend of ``pfp.atom_conv2d`` / ``pfp.atom_linear`` vs the fp64 reference: forward and every
gradient (x, atoms, sub-atoms and their coefficients, bias), conv options, odd channels, fp16/bf16, bad input."""
from __future__ import annotations

import os

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft import BackendUnavailable
from pyfastpeft.atoms.torch_impl import seed_atom_conv2d
from pyfastpeft.atoms.ops import compose_atoms
from pyfastpeft.atoms.reference import atom_conv2d_ref, atom_linear_ref, compose_atoms_ref
from pyfastpeft.testing import GRAD_FACTOR, compare, randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = pfp.available_backends("atom_conv2d", DEVICE)
LIN_BACKENDS = pfp.available_backends("atom_linear", DEVICE)
HALF = (torch.float16, torch.bfloat16)


def test_backends_present_on_this_machine():
    assert "torch" in BACKENDS and "torch" in LIN_BACKENDS
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in BACKENDS, pfp.format_backend_info()


def conv_case(N=2, cin=5, cout=7, hw=(9, 8), k=(3, 3), stride=1, padding=1, dilation=1, groups=1, m=4, m1=0,
              bias=True, channels_last=False, dtype=torch.float32, id=None):
    d = dict(N=N, cin=cin, cout=cout, hw=hw, k=k, stride=stride, padding=padding, dilation=dilation, groups=groups,
             m=m, m1=m1, bias=bias, channels_last=channels_last, dtype=dtype)
    return pytest.param(d, id=id)


# Interpreter programs run in numpy: small spatial sizes and channel counts.
CONV_CASES = [
    conv_case(id="3x3-odd-channels"),
    conv_case(cin=3, cout=5, stride=2, padding=0, bias=False, m=9, id="stride2-nopad-m9-nobias"),
    conv_case(k=(3, 2), padding=(2, 0), dilation=(2, 1), m=3, id="asym-kernel-dilation"),
    conv_case(cin=6, cout=4, groups=2, m=2, id="groups2"),
    conv_case(cin=6, cout=6, groups=6, k=(7, 7), padding=3, hw=(10, 9), m=4, id="depthwise7x7"),
    conv_case(cin=4, cout=8, groups=4, m=3, id="depthwise-multiplier2"),
    conv_case(padding="same", k=(4, 4), dilation=1, m=5, id="same-even-kernel"),
    conv_case(padding="same", dilation=2, id="same-dilated"),
    conv_case(padding="valid", m=1, id="valid-m1"),
    conv_case(channels_last=True, id="channels-last"),
    conv_case(m=4, m1=3, id="recursive-m1-3"),
    conv_case(cin=6, cout=9, groups=3, stride=2, m=3, m1=2, channels_last=True, id="recursive-groups-cl"),
    conv_case(cin=4, cout=4, groups=4, m=4, m1=3, id="recursive-depthwise"),
    conv_case(dtype=torch.float16, id="fp16"),
    conv_case(dtype=torch.bfloat16, m1=3, id="bf16-recursive"),
    conv_case(dtype=torch.float16, cin=6, cout=6, groups=6, k=(7, 7), padding=3, id="fp16-depthwise"),
    conv_case(dtype=torch.float64, m1=2, id="fp64-recursive"),
]


def make_conv(c, seed=0):
    """fp64 leaves; coeff/atoms non-zero so every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = c["k"]
    ci = c["cin"] // c["groups"]
    d = dict(
        x=randn(c["N"], c["cin"], *c["hw"], dtype=torch.float64, generator=g),
        weight=randn(c["cout"], ci, kh, kw, dtype=torch.float64, scale=(ci * kh * kw) ** -0.5, generator=g),
        bias=randn(c["cout"], dtype=torch.float64, generator=g) if c["bias"] else None,
        coeff=randn(c["cout"], ci, c["m"], dtype=torch.float64, scale=0.5, generator=g),
    )
    if c["m1"]:
        d["beta"] = randn(c["m1"], c["m"], ci, dtype=torch.float64, generator=g)
        d["sub"] = randn(c["m1"], c["m"], kh, kw, dtype=torch.float64, scale=0.3, generator=g)
    else:
        d["atoms"] = randn(c["m"], kh, kw, dtype=torch.float64, scale=0.3, generator=g)
    return d


TRAIN = ("x", "atoms", "beta", "sub", "bias")


def _leaves(d, dtype, device, train_dtype=None):
    out = {}
    for k, v in d.items():
        if v is None:
            out[k] = None
            continue
        dt = (train_dtype or dtype) if k in ("coeff", "atoms", "beta", "sub") else dtype
        out[k] = v.to(device=device, dtype=dt).requires_grad_(k in TRAIN)
    return out


def _conv_call(fn, c, t):
    atoms = t["atoms"] if "atoms" in t else fn[1](t["beta"], t["sub"])
    x = t["x"].contiguous(memory_format=torch.channels_last) if c["channels_last"] else t["x"]
    return fn[0](x, t["weight"], t["bias"], t["coeff"], atoms, c)


def _ours(backend):
    def f(x, w, b, coeff, atoms, c):
        return pfp.atom_conv2d(x, w, b, coeff, atoms, stride=c["stride"], padding=c["padding"],
                               dilation=c["dilation"], groups=c["groups"], backend=backend)
    return f, compose_atoms


def _ref(x, w, b, coeff, atoms, c):
    return atom_conv2d_ref(x, w, b, coeff, atoms, c["stride"], c["padding"], c["dilation"], c["groups"])


def run_conv(c, backend, seed=0):
    d = make_conv(c, seed)
    dt = c["dtype"]
    lo = dt in HALF
    t = _leaves(d, dt, DEVICE, torch.float32 if lo else None)  # a model's fp32 atoms with fp16/bf16 activations
    y = _conv_call(_ours(backend), c, t)
    assert torch.isfinite(y).all(), "non-finite output (NaN-poisoned element never written?)"
    if c["channels_last"]:
        assert y.is_contiguous(memory_format=torch.channels_last)
    names = [k for k in TRAIN if t.get(k) is not None]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    grads = torch.autograd.grad(y, [t[k] for k in names], gy.to(device=y.device, dtype=y.dtype))

    def ref(rdt):
        r = _leaves(d, rdt, "cpu")
        out = _conv_call((_ref, compose_atoms_ref), c, r)
        return out, torch.autograd.grad(out, [r[k] for k in names], gy.to(rdt))

    y64, g64 = ref(torch.float64)
    y_lo, g_lo = ref(dt) if lo else (None, [None] * len(names))
    kh, kw = c["k"]
    ci = c["cin"] // c["groups"]
    big = c["N"] * c["hw"][0] * c["hw"][1] * c["cout"] * ci
    red = {"y": ci * kh * kw + c["m"], "x": (c["cout"] // c["groups"]) * kh * kw * c["m"], "atoms": big,
           "beta": big * kh * kw, "sub": big, "bias": c["N"] * c["hw"][0] * c["hw"][1]}
    verdicts = {"y": compare(y, y64, y_lo, reduction=red["y"])}
    for k, got, want, want_lo in zip(names, grads, g64, g_lo):
        assert torch.isfinite(got).all(), f"d{k} has non-finite values"
        verdicts[f"d{k}"] = compare(got, want, want_lo, factor=GRAD_FACTOR, reduction=red[k],
                                    as_dtype=dt if lo else None)
    return verdicts


PAIRS = [pytest.param(c.values[0], b, id=f"{c.id}-{b}") for c in CONV_CASES for b in BACKENDS
         if b == "torch" or c.values[0]["dtype"] != torch.float64]


@pytest.mark.parametrize("c, backend", PAIRS)
def test_atom_conv2d_matches_reference(c, backend, monkeypatch):
    # the contraction route (the Triton / CUDA atom-gradient kernel, no weight gradient) on every case
    monkeypatch.setenv("PYFASTPEFT_ATOM_GRAD", "contract")
    for name, v in run_conv(c, backend).items():
        assert v.ok, f"{backend} {name}: {v}"


ROUTE_CASES = [CONV_CASES[i] for i in (0, 4, 11, 14)]
ROUTE_PAIRS = [pytest.param(c.values[0], b, id=f"{c.id}-{b}") for c in ROUTE_CASES for b in BACKENDS]


@pytest.mark.parametrize("c, backend", ROUTE_PAIRS)
def test_atom_conv2d_weight_grad_route_matches_reference(c, backend, monkeypatch):
    """The other exact route (weight gradient once, then a weight-sized contraction), which auto picks when it is
    cheaper (m = kh·kw, depthwise convs)."""
    monkeypatch.setenv("PYFASTPEFT_ATOM_GRAD", "weight_grad")
    for name, v in run_conv(c, backend).items():
        assert v.ok, f"{backend} weight_grad route {name}: {v}"


def test_route_rules():
    from pyfastpeft.atoms.torch_impl import fewer_flops
    from pyfastpeft.triton_kernels.atoms._atoms_cost import prefer_weight_grad
    assert not fewer_flops(4, 9, 64) and fewer_flops(9, 9, 64) and fewer_flops(4, 49, 1)
    # modeled H100, bf16, ResNet-50 56^2 64->64 at batch 64: the weight gradient on tensor cores beats the kernel's
    # FMA-unit correlation; a depthwise 7x7 always takes the weight-gradient route
    assert prefer_weight_grad(64, 64, 56, 56, 64, 64, 3, 3, 56, 56, 9, 2, 1)
    assert prefer_weight_grad(64, 128, 56, 56, 128, 1, 7, 7, 56, 56, 4, 2, 128)


def test_bad_route_env(monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_ATOM_GRAD", "fast")
    kw = _conv_args()
    atoms = kw["atoms"].requires_grad_()
    y = pfp.atom_conv2d(kw["x"], kw["weight"], None, kw["coeff"], atoms, padding=1, backend="torch")
    with pytest.raises(ValueError, match="PYFASTPEFT_ATOM_GRAD"):
        y.sum().backward()


def test_seed_formulation_equals_reference():
    c = CONV_CASES[3].values[0]
    d = make_conv(c)
    a = atom_conv2d_ref(d["x"], d["weight"], d["bias"], d["coeff"], d["atoms"], 1, 1, 1, c["groups"])
    b = seed_atom_conv2d(d["x"], d["weight"], d["bias"], d["coeff"], d["atoms"], 1, 1, 1, c["groups"])
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_atom_conv2d_grad_flags_and_backward_twice(backend):
    """x without grad: no dx; atoms frozen: no dD; backward twice gives the same gradients."""
    c = CONV_CASES[0].values[0]
    d = make_conv(c)
    x, w, coeff = d["x"].float(), d["weight"].float(), d["coeff"].float()
    atoms = d["atoms"].float().requires_grad_()
    y = pfp.atom_conv2d(x, w, None, coeff, atoms, padding=1, backend=backend)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, atoms, g, retain_graph=True)[0]
    second = torch.autograd.grad(y, atoms, g)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    y = pfp.atom_conv2d(xg, w, None, coeff, atoms.detach(), padding=1, backend=backend)
    (dx,) = torch.autograd.grad(y, xg, g)
    ref = torch.nn.grad.conv2d_input(x.shape, w + torch.einsum("oij,jpq->oipq", coeff, atoms.detach()), g, padding=1)
    torch.testing.assert_close(dx, ref, rtol=1e-5, atol=1e-5)


def test_zero_atoms_equal_base_conv_exactly():
    c = torch.nn.Conv2d(5, 7, 3, padding=1)
    x = torch.randn(2, 5, 8, 8)
    coeff = torch.randn(7, 5, 4)
    y = pfp.atom_conv2d(x, c.weight.detach(), c.bias.detach(), coeff, torch.zeros(4, 3, 3), padding=1)
    torch.testing.assert_close(y, c(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- linear
LIN_CASES = [
    pytest.param(dict(M=13, K=24, N=16, kc=4, m=5, lead=(), bias=True, dtype=torch.float32), id="13x24->16-kc4"),
    pytest.param(dict(M=7, K=16, N=32, kc=8, m=3, lead=(2,), bias=False, dtype=torch.float32), id="3d-kc8-nobias"),
    pytest.param(dict(M=9, K=12, N=6, kc=1, m=1, lead=(), bias=True, dtype=torch.float32), id="kc1-m1"),
    pytest.param(dict(M=11, K=24, N=16, kc=4, m=4, lead=(), bias=True, dtype=torch.float16), id="fp16"),
    pytest.param(dict(M=11, K=24, N=16, kc=4, m=4, lead=(), bias=True, dtype=torch.bfloat16), id="bf16"),
    pytest.param(dict(M=11, K=24, N=16, kc=4, m=4, lead=(), bias=True, dtype=torch.float64), id="fp64"),
]


@pytest.mark.parametrize("backend", LIN_BACKENDS)
@pytest.mark.parametrize("c", LIN_CASES)
def test_atom_linear_matches_reference(c, backend):
    if c["dtype"] == torch.float64 and backend != "torch":
        pytest.skip("fp64 is a torch-backend dtype")
    g = torch.Generator().manual_seed(3)
    M, K, N, kc, m = c["M"], c["K"], c["N"], c["kc"], c["m"]
    d = dict(x=randn(*c["lead"], M, K, dtype=torch.float64, generator=g),
             weight=randn(N, K, dtype=torch.float64, scale=K ** -0.5, generator=g),
             bias=randn(N, dtype=torch.float64, generator=g) if c["bias"] else None,
             coeff=randn(N // kc, K // kc, m, dtype=torch.float64, generator=g),
             atoms=randn(m, kc, kc, dtype=torch.float64, scale=0.3, generator=g))
    dt = c["dtype"]
    lo = dt in HALF
    t = _leaves(d, dt, DEVICE, torch.float32 if lo else None)
    y = pfp.atom_linear(t["x"], t["weight"], t["bias"], t["coeff"], t["atoms"], block=kc, backend=backend)
    names = [k for k in ("x", "atoms", "bias") if t.get(k) is not None]
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, [t[k] for k in names], gy.to(y.dtype))

    def ref(rdt):
        r = _leaves(d, rdt, "cpu")
        out = atom_linear_ref(r["x"], r["weight"], r["bias"], r["coeff"], r["atoms"])
        return out, torch.autograd.grad(out, [r[k] for k in names], gy.to(rdt))

    y64, g64 = ref(torch.float64)
    y_lo, g_lo = ref(dt) if lo else (None, [None] * len(names))
    red = {"x": N + m, "atoms": M * N * K // kc, "bias": M}
    v = compare(y, y64, y_lo, reduction=K + m)
    assert v.ok, f"y: {v}"
    for k, got, want, want_lo in zip(names, grads, g64, g_lo):
        v = compare(got, want, want_lo, factor=GRAD_FACTOR, reduction=red[k], as_dtype=dt if lo else None)
        assert v.ok, f"d{k}: {v}"


# --------------------------------------------------------------------------------------------- bad input
def _conv_args():
    return dict(x=torch.randn(2, 4, 6, 6), weight=torch.randn(6, 4, 3, 3), bias=None, coeff=torch.randn(6, 4, 2),
                atoms=torch.randn(2, 3, 3))


@pytest.mark.parametrize("change, match", [
    (dict(coeff=torch.randn(6, 4, 0)), "coeff"),
    (dict(coeff=torch.randn(5, 4, 2)), "coeff"),
    (dict(atoms=torch.randn(3, 3, 3)), "atoms"),
    (dict(atoms=torch.randn(2, 3, 2)), "atoms"),
    (dict(x=torch.randn(4, 6, 6)), "x"),
    (dict(weight=torch.randn(6, 4, 3, 3, requires_grad=True)), "weight"),
    (dict(coeff=torch.randn(6, 4, 2, requires_grad=True)), "coeff"),
    (dict(bias=torch.randn(5)), "bias"),
    (dict(x=torch.randn(2, 4, 6, 6, dtype=torch.float64)), "dtype"),
])
def test_atom_conv2d_bad_input(change, match):
    kw = dict(_conv_args(), **change)
    with pytest.raises(ValueError, match=match):
        pfp.atom_conv2d(kw["x"], kw["weight"], kw["bias"], kw["coeff"], kw["atoms"], padding=1)


@pytest.mark.parametrize("opts, match", [
    (dict(groups=3), "groups"), (dict(stride=0), "stride"), (dict(padding="full"), "padding"),
    (dict(padding="same", stride=2), "stride"), (dict(dilation=(1, 0)), "dilation"),
])
def test_atom_conv2d_bad_options(opts, match):
    kw = _conv_args()
    with pytest.raises(ValueError, match=match):
        pfp.atom_conv2d(kw["x"], kw["weight"], kw["bias"], kw["coeff"], kw["atoms"], **opts)


def test_atom_linear_block_must_divide_both_dimensions():
    x, w = torch.randn(3, 12), torch.randn(10, 12)
    with pytest.raises(ValueError, match=r"block=4 .*out_features=10.*in_features=12"):
        pfp.atom_linear(x, w, None, torch.randn(2, 3, 2), torch.randn(2, 4, 4), block=4)


def test_forced_backend_that_cannot_run_raises():
    kw = _conv_args()
    kw = {k: (v.double() if v is not None else None) for k, v in kw.items()}
    with pytest.raises(BackendUnavailable):
        pfp.atom_conv2d(kw["x"], kw["weight"], None, kw["coeff"], kw["atoms"], padding=1, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_atom_conv2d(backend):
    kw = _conv_args()
    x = kw["x"].contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.pyfastpeft.atom_conv2d_fwd.default,
                          (x, kw["weight"], torch.randn(6), kw["coeff"], kw["atoms"], [1, 1], [1, 1], [1, 1], 1,
                           backend))
    dy = torch.randn(2, 6, 6, 6)
    torch.library.opcheck(torch.ops.pyfastpeft.atom_conv2d_bwd.default,
                          (dy, kw["x"], kw["weight"], kw["coeff"], kw["atoms"], [1, 1], [1, 1], [1, 1], 1, True,
                           True, backend))


def test_compile_fullgraph_atom_conv2d():
    torch._dynamo.reset()
    conv = pfp.nn.AtomConv2d.from_conv(torch.nn.Conv2d(4, 6, 3, padding=1), 3, sub_atoms=2)
    with torch.no_grad():
        conv.atoms_sub.normal_()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    g = torch.randn(2, 6, 6, 6)
    y1, y2 = conv(x), compiled(x)
    torch.testing.assert_close(y1, y2)
    a = torch.autograd.grad(y1, (x, conv.atoms_sub), g)
    b = torch.autograd.grad(y2, (x, conv.atoms_sub), g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_perf_counts_one_conv_forward():
    """The declared forward is one conv (plus the weight-sized fold), the backward never a full weight gradient."""
    from pyfastpeft.tools import perf
    x = torch.randn(4, 64, 28, 28, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(64, 64, 3, 3, dtype=torch.bfloat16)
    coeff = torch.randn(64, 64, 4)
    atoms = torch.zeros(4, 3, 3, requires_grad=True)
    counts = perf.count(lambda a, b: pfp.atom_conv2d(a, w.to(a.device), None, coeff.to(a.device), b, padding=1),
                        x, atoms, mode="fwd+bwd")
    names = [o.name for o in counts.ops]
    assert names.count("cudnn:conv2d") == 1 and "cudnn:conv2d_dx" in names
    assert not any("weight" in n or n == "aten.convolution_backward" for n in names)


def test_twin_check_of_the_cuda_atom_grad_kernel_catches_errors():
    """The first-use check of ``pyfastpeft_C::atom_grad_conv2d`` passes an exact stand-in and fails a kernel that
    drops one tap (run on CPU with a torch stand-in: the real op needs a GPU)."""
    from pyfastpeft.atoms import twin as atoms_twin
    from pyfastpeft.atoms.torch_impl import atom_grad_conv
    from pyfastpeft.core import twin as _twin
    from pyfastpeft.families import twin_checks

    def standin(dy, x, coeff, kh, kw, s, p, d, g):
        cout, ci, _ = coeff.shape
        return torch.cat([atom_grad_conv(dy[:, gi * (cout // g):(gi + 1) * (cout // g)].float(),
                                         x[:, gi * ci:(gi + 1) * ci].float(),
                                         coeff[gi * (cout // g):(gi + 1) * (cout // g)].float(), (kh, kw), s, p, d,
                                         1, shared=False) for gi in range(g)])

    def broken(*a):
        out = standin(*a)
        out[:, :, 0, 0] = 0
        return out

    assert "atom_grad_conv2d" in atoms_twin.TWIN_CHECKS and "atom_grad_conv2d" in twin_checks()
    assert atoms_twin.check_atom_grad_conv2d(torch.device("cpu"), op=standin) <= _twin.THRESHOLD
    assert atoms_twin.check_atom_grad_conv2d(torch.device("cpu"), op=broken) > _twin.THRESHOLD


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("c", [CONV_CASES[0], CONV_CASES[4], CONV_CASES[11], CONV_CASES[14]])
def test_atom_conv2d_cuda_backend_matches_reference(c):
    for name, v in run_conv(c, "cuda").items():
        assert v.ok, f"cuda {name}: {v}"
