"""``pfp.atom_conv2d`` / ``pfp.atom_linear`` and ``AtomConv2d`` / ``AtomLinear`` under ``torch.autocast`` (every op ×
CPU backend × bf16/fp16 × forward and every gradient vs fp64, ``pyfastpeft.testing.check_autocast``), the fold kept
in fp32 under autocast, dtype mismatches outside autocast, and NaN/Inf propagation equal on every backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.atoms.checks import checks
from pyfastpeft.atoms.modules import AtomConv2d, AtomLinear
from pyfastpeft.atoms.ops import compose_atoms
from pyfastpeft.atoms.reference import atom_conv2d_ref, atom_linear_ref, compose_atoms_ref
from pyfastpeft.testing import check_autocast, randn

CPU = torch.device("cpu")
CONV_BACKENDS = pfp.available_backends("atom_conv2d", "cpu")
LIN_BACKENDS = pfp.available_backends("atom_linear", "cpu")
LOW = (torch.bfloat16, torch.float16)
ROUTES = ("contract", "weight_grad")


def _autocast_dtype(dtype) -> torch.dtype:
    """What nn.Conv2d / nn.Linear return under autocast(cpu, dtype) for fp32 inputs."""
    with torch.autocast("cpu", dtype=dtype):
        a = F.conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(3)).dtype
        b = F.linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3)).dtype
    assert a == b
    return a


def _verdicts_ok(v: dict, dtype, what: str) -> None:
    bad = {k: str(x) for k, x in v.items() if k != "dtype" and not x.ok}
    assert not bad, f"{what}: {bad}"
    assert v["dtype"] == dtype == _autocast_dtype(dtype), f"{what}: output dtype {v['dtype']}, autocast {dtype}"


# ------------------------------------------------------------------------------------------ ops vs fp64
def _op_params():
    out = []
    for row in checks():
        for case in row.cases(CPU, torch.float32):
            backends = CONV_BACKENDS if row.op == "atom_conv2d" else LIN_BACKENDS
            routes = ROUTES if row.op == "atom_conv2d" else ("auto",)
            for b in backends:
                for route in routes:
                    for dt in LOW:
                        out.append(pytest.param(row, case, b, route, dt,
                                                id=f"{row.op}-{case.name}-{b}-{route}-{str(dt)[6:]}".replace(" ", "_")))
    return out


@pytest.mark.parametrize("row, case, backend, route, dtype", _op_params())
def test_op_under_autocast_matches_fp64(row, case, backend, route, dtype, monkeypatch):
    """Forward and every gradient (x, atoms, or for recursive atoms beta and the sub-atoms through compose_atoms,
    bias) of the op run on fp32 leaves under autocast vs the fp64 reference; the output is in the autocast
    dtype, as nn.Conv2d's / nn.Linear's."""
    if route != "auto":
        monkeypatch.setenv("PYFASTPEFT_ATOM_GRAD", route)
    leaves = row.make(case, torch.Generator().manual_seed(0))
    v = check_autocast(lambda **kw: row.call(row.build(kw), backend), lambda **kw: row.ref(row.build(kw)), leaves,
                       row.grads, dtype, reduction=row.reduction(case))
    assert set(row.grads) <= set(v)
    _verdicts_ok(v, dtype, f"{row.op} {case.name} {backend} {route}")


# ------------------------------------------------------------------------------------------ modules vs fp64
def _conv_module(sub_atoms):
    torch.manual_seed(0)
    return AtomConv2d.from_conv(nn.Conv2d(5, 7, 3, padding=1), 4, sub_atoms=sub_atoms)


def _module_leaves(layer, x_shape, trained):
    g = torch.Generator().manual_seed(1)
    leaves = {"x": randn(*x_shape, dtype=torch.float64, generator=g)}
    for name, t in layer.named_parameters():
        scale = 0.3 if name in trained else 1.0
        leaves[name] = randn(*t.shape, dtype=torch.float64, scale=scale, generator=g) if name in trained else \
            t.detach().double()
    for name, t in layer.named_buffers():
        leaves[name] = t.detach().double()
    return leaves


def _conv_module_ref(layer):
    def ref(x, **p):
        atoms = p["atoms"] if "atoms" in p else compose_atoms_ref(p["atoms_beta"], p["atoms_sub"])
        return atom_conv2d_ref(x, p["base_layer.weight"], p["base_layer.bias"], p["atom_coeff"], atoms, 1, 1)
    return ref


def _call_module(layer, backend):
    layer.backend = backend

    def call(x, **p):
        return torch.func.functional_call(layer, p, (x,))
    return call


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("sub_atoms", [0, 3], ids=["one-level", "recursive"])
def test_atom_conv2d_module_under_autocast(sub_atoms, backend, dtype):
    layer = _conv_module(sub_atoms)
    trained = ("atoms",) if sub_atoms == 0 else ("atoms_beta", "atoms_sub")
    leaves = _module_leaves(layer, (2, 5, 7, 6), trained)
    grads = ("x", *trained, "base_layer.bias")
    v = check_autocast(_call_module(layer, backend), _conv_module_ref(layer), leaves, grads, dtype)
    _verdicts_ok(v, dtype, f"AtomConv2d sub_atoms={sub_atoms} {backend}")


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", LIN_BACKENDS)
def test_atom_linear_module_under_autocast(backend, dtype):
    torch.manual_seed(0)
    layer = AtomLinear.from_linear(nn.Linear(24, 16), 4, block=4)
    leaves = _module_leaves(layer, (3, 5, 24), ("atoms",))

    def ref(x, **p):
        return atom_linear_ref(x, p["base_layer.weight"], p["base_layer.bias"], p["atom_coeff"], p["atoms"])
    v = check_autocast(_call_module(layer, backend), ref, leaves, ("x", "atoms", "base_layer.bias"), dtype)
    _verdicts_ok(v, dtype, f"AtomLinear {backend}")


# ------------------------------------------------------------------------------------------ fp32 fold under autocast
def _explicit_vs_autocast(fn, leaves: dict, grads: tuple, dtype):
    """``fn`` on fp32 leaves under autocast vs ``fn`` outside autocast with x/weight/bias already in ``dtype``
    (what the op is documented to compute in): outputs and gradients equal bit for bit."""
    def run(auto):
        t = {k: v.clone().requires_grad_(k in grads) for k, v in leaves.items()}
        cast = {k: (v.to(dtype) if (k in ("x", "weight", "bias") and not auto) else v) for k, v in t.items()}
        with torch.autocast("cpu", dtype=dtype, enabled=auto):
            y = fn(**cast)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
        return y, torch.autograd.grad(y, [t[k] for k in grads], gy)
    (ya, ga), (ye, ge) = run(True), run(False)
    assert ya.dtype == ye.dtype == dtype
    assert torch.equal(ya, ye), f"forward under autocast differs in {(ya != ye).sum().item()} elements"
    for k, a, e in zip(grads, ga, ge):
        assert a.dtype == e.dtype and torch.equal(a, e), f"d{k} under autocast differs"


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("recursive", [False, True], ids=["one-level", "recursive"])
def test_conv_fold_stays_fp32_under_autocast(recursive, backend, dtype):
    """Autocast is still on inside a custom op's implementation; without switching it off there, the torch
    backend's fold W + ΔW ran as a bf16/fp16 addmm (up to a third of the folded weight's elements differed)."""
    g = torch.Generator().manual_seed(2)
    leaves = dict(x=torch.randn(2, 5, 7, 6, generator=g), weight=torch.randn(7, 5, 3, 3, generator=g) * 0.2,
                  bias=torch.randn(7, generator=g), coeff=torch.randn(7, 5, 4, generator=g))
    if recursive:
        leaves.update(beta=torch.randn(3, 4, 5, generator=g), sub=torch.randn(3, 4, 3, 3, generator=g) * 0.3)
    else:
        leaves.update(atoms=torch.randn(4, 3, 3, generator=g) * 0.3)

    def fn(x, weight, bias, coeff, atoms=None, beta=None, sub=None):
        a = atoms if atoms is not None else compose_atoms(beta, sub)
        return pfp.atom_conv2d(x, weight, bias, coeff, a, padding=1, backend=backend)
    grads = ("x", "bias") + (("beta", "sub") if recursive else ("atoms",))
    _explicit_vs_autocast(fn, leaves, grads, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", LIN_BACKENDS)
def test_linear_fold_stays_fp32_under_autocast(backend, dtype):
    g = torch.Generator().manual_seed(3)
    leaves = dict(x=torch.randn(2, 9, 24, generator=g), weight=torch.randn(16, 24, generator=g) * 0.2,
                  bias=torch.randn(16, generator=g), coeff=torch.randn(4, 6, 5, generator=g),
                  atoms=torch.randn(5, 4, 4, generator=g) * 0.3)

    def fn(x, weight, bias, coeff, atoms):
        return pfp.atom_linear(x, weight, bias, coeff, atoms, block=4, backend=backend)
    _explicit_vs_autocast(fn, leaves, ("x", "bias", "atoms"), dtype)


def test_compose_atoms_mixed_dtypes_and_autocast():
    """beta and sub-atoms of different dtypes compose in the wider one (einsum alone raises); under autocast the
    composition is not rounded to bf16; the gradients come back in each leaf's dtype."""
    beta = torch.randn(3, 4, 5, requires_grad=True)
    sub = torch.randn(3, 4, 3, 3).half().requires_grad_()
    d = compose_atoms(beta, sub)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, compose_atoms_ref(beta.detach().double(), sub.detach().double()).float())
    gb, gs = torch.autograd.grad(d.sum(), (beta, sub))
    assert gb.dtype == torch.float32 and gs.dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d2 = compose_atoms(beta, sub.float())
    assert d2.dtype == torch.float32 and torch.equal(d2, compose_atoms(beta, sub.float()))


# ------------------------------------------------------------------------------------------ dtypes outside autocast
def _conv_kw(xd, **over):
    g = torch.Generator().manual_seed(4)
    kw = dict(x=torch.randn(2, 4, 6, 6, generator=g), weight=torch.randn(6, 4, 3, 3, generator=g),
              bias=torch.randn(6, generator=g), coeff=torch.randn(6, 4, 2, generator=g),
              atoms=torch.randn(2, 3, 3, generator=g))
    kw = {k: v.to(over.get(k, xd)) for k, v in kw.items()}
    for k in ("x", "atoms", "bias"):
        kw[k].requires_grad_()
    return kw


def _lin_kw(xd, **over):
    g = torch.Generator().manual_seed(4)
    kw = dict(x=torch.randn(5, 8, generator=g), weight=torch.randn(8, 8, generator=g), bias=torch.randn(8, generator=g),
              coeff=torch.randn(2, 2, 3, generator=g), atoms=torch.randn(3, 4, 4, generator=g))
    kw = {k: v.to(over.get(k, xd)) for k, v in kw.items()}
    for k in ("x", "atoms", "bias"):
        kw[k].requires_grad_()
    return kw


def _run(op, kw, backend):
    if op == "conv":
        return pfp.atom_conv2d(kw["x"], kw["weight"], kw["bias"], kw["coeff"], kw["atoms"], padding=1, backend=backend)
    return pfp.atom_linear(kw["x"], kw["weight"], kw["bias"], kw["coeff"], kw["atoms"], block=4, backend=backend)


@pytest.mark.parametrize("op", ["conv", "lin"])
@pytest.mark.parametrize("xd", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
def test_weight_dtype_mismatch_names_weight(op, xd):
    other = torch.float32 if xd != torch.float32 else torch.bfloat16
    kw = (_conv_kw if op == "conv" else _lin_kw)(xd, weight=other)
    with pytest.raises(ValueError, match=rf"weight dtype {other} must match x dtype {xd} \(or run under autocast\)"):
        _run(op, kw, "torch")


@pytest.mark.parametrize("backend", sorted(set(CONV_BACKENDS) & set(LIN_BACKENDS)))
@pytest.mark.parametrize("op", ["conv", "lin"])
@pytest.mark.parametrize("arg", ["bias", "coeff", "atoms"])
@pytest.mark.parametrize("xd", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_other_dtypes_outside_autocast_are_accepted(xd, arg, op, backend):
    """bias (cast to x's dtype, as the weight is under autocast), coeff and atoms (any float dtype, folded in fp32)
    of another dtype than x run on every backend: output in x's dtype, each gradient in its leaf's dtype; nothing
    raises from inside an implementation."""
    for other in (torch.float16, torch.float64, torch.float32 if xd != torch.float32 else torch.bfloat16):
        kw = (_conv_kw if op == "conv" else _lin_kw)(xd, **{arg: other})
        y = _run(op, kw, backend)
        assert y.dtype == xd
        y.float().sum().backward()
        for k in ("x", "atoms", "bias"):
            assert kw[k].grad is not None and kw[k].grad.dtype == kw[k].dtype
            assert torch.isfinite(kw[k].grad).all(), k
        ref = (atom_conv2d_ref(*(kw[k].detach().double() for k in ("x", "weight", "bias", "coeff", "atoms")), 1, 1)
               if op == "conv" else
               atom_linear_ref(*(kw[k].detach().double() for k in ("x", "weight", "bias", "coeff", "atoms"))))
        tol = 1e-4 if xd == torch.float32 and other != torch.float16 and arg != "bias" else 0.1
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


# ------------------------------------------------------------------------------------------ NaN / Inf in x
def _masks(t):
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


def _nonfinite_runs(op, bad, dtype, route, monkeypatch):
    """``{provider: [masks of y, dx, dD, dbias]}`` for the reference and every backend, x holding ``bad``."""
    monkeypatch.setenv("PYFASTPEFT_ATOM_GRAD", route)
    g = torch.Generator().manual_seed(6)
    if op == "conv":
        x = torch.randn(2, 6, 9, 8, generator=g)
        x[0, 1, 3, 4] = bad
        x[1, 5, 0, 0] = bad  # in the padding's reach
        w, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
        c, a = torch.randn(4, 3, 4, generator=g), torch.randn(4, 3, 3, generator=g)
        gy = torch.randn(2, 4, 9, 8, generator=g)
        backends = CONV_BACKENDS
    else:
        x = torch.randn(3, 5, 24, generator=g)
        x[0, 1, 3] = bad
        x[2, 4, 17] = bad
        w, b = torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
        c, a = torch.randn(4, 6, 3, generator=g), torch.randn(3, 4, 4, generator=g)
        gy = torch.randn(3, 5, 16, generator=g)
        backends = LIN_BACKENDS
    out = {}
    for who in ("ref", *backends):
        xx, aa, bb = x.to(dtype).requires_grad_(), a.clone().requires_grad_(), b.to(dtype).requires_grad_()
        if who == "ref":  # fp32 reference, rounded to dtype
            y = (atom_conv2d_ref(xx.float(), w, bb.float(), c, aa, 1, 1, 1, 2) if op == "conv" else
                 atom_linear_ref(xx.float(), w, bb.float(), c, aa)).to(dtype)
        elif op == "conv":
            y = pfp.atom_conv2d(xx, w.to(dtype), bb, c, aa, padding=1, groups=2, backend=who)
        else:
            y = pfp.atom_linear(xx, w.to(dtype), bb, c, aa, block=4, backend=who)
        out[who] = [_masks(t) for t in (y, *torch.autograd.grad(y, (xx, aa, bb), gy.to(dtype)))]
    return out


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op, route", [("conv", "contract"), ("conv", "weight_grad"), ("lin", "auto")],
                         ids=["conv-contract", "conv-weight_grad", "lin"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_x_propagates_alike_on_every_backend(bad, op, route, dtype, monkeypatch):
    """NaN in x: the NaN masks of y, dx, dD and dbias are those of the reference on every backend and route.
    ±Inf in x: y, dx, dbias have the reference's NaN/+Inf/−Inf masks, dD is non-finite exactly where the
    reference's is; whether such a dD entry is NaN or ±Inf follows the summation order (docs/atoms.md §4): every
    backend agrees with the others on the same route, and with the reference on the weight-gradient route and for
    linear atoms."""
    runs = _nonfinite_runs(op, bad, dtype, route, monkeypatch)
    ref = runs.pop("ref")
    assert ref[0].any(), "the test input produced no non-finite output"
    first = next(iter(runs.values()))
    # which masks must equal the reference's label for label (NaN, +Inf, -Inf) and which only as "non-finite"
    labels_as_ref = {"y": True, "dx": True, "dbias": True,
                     "dD": bad != bad or op == "lin" or route == "weight_grad"}
    for who, masks in runs.items():
        for name, got, want, other in zip(("y", "dx", "dD", "dbias"), masks, ref, first):
            if labels_as_ref[name]:
                assert torch.equal(got, want), f"{who}: {name} NaN/±Inf masks differ from the reference"
            else:
                assert torch.equal(got.any(0), want.any(0)), f"{who}: {name} non-finite mask differs from the reference"
                assert torch.equal(got, other), f"{who}: {name} NaN/±Inf masks differ between backends"
