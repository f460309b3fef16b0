"""``pyfastpeft check`` rows for the orthogonal family: ``cayley``, ``oft_linear``, ``psoft_linear``.

The generators (and PSOFT's vectors) stay fp32 in fp16/bf16 cases, as adapter parameters do in a model;
their gradients are judged by the activations' low-precision rule. The low-precision reference follows
PEFT's order: the transform in fp32, the rotation in fp32, the frozen GEMMs in the activations' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pyfastpeft import testing
from pyfastpeft.orthogonal.cayley import cayley
from pyfastpeft.orthogonal.oft_linear import oft_linear
from pyfastpeft.orthogonal.psoft_linear import psoft_linear
from pyfastpeft.testing import OpCheck


@dataclass(frozen=True)
class CayleyCase:
    name: str
    G: int
    b: int
    q: float  # scale of v
    method: str = "exact"
    convention: str = "minus"
    terms: int = 5
    eps: Optional[float] = None


@dataclass(frozen=True)
class OrthLinearCase:
    name: str
    M: int
    K: int
    N: int
    b: int  # OFT block size or PSOFT rank
    method: str
    shared: bool = False  # OFT block_share / PSOFT: vectors on
    bias: bool = True
    terms: int = 5
    eps: Optional[float] = None


def _cayley_cases(device, dtype):
    return [CayleyCase("G128 b32 exact-minus", 128, 32, 0.05), CayleyCase("G5 b7 exact-plus", 5, 7, 0.3,
                                                                          convention="plus"),
            CayleyCase("G4 b64 exact", 4, 64, 0.05), CayleyCase("G16 b16 neumann T5", 16, 16, 0.05, "neumann"),
            CayleyCase("G3 b9 neumann T6 eps", 3, 9, 0.5, "neumann", terms=6, eps=0.4),
            CayleyCase("G1 b100 exact", 1, 100, 0.02)]


def _cayley_make(c: CayleyCase, g):
    return dict(v=testing.randn(c.G, c.b * (c.b - 1) // 2, dtype=torch.float64, scale=c.q, generator=g), _c=c)


def _cayley_kw(c):
    return dict(method=c.method, convention=c.convention, terms=c.terms, eps=c.eps)


def _cayley_call(kw, backend):
    c = kw["_c"]
    return cayley(kw["v"], c.b, backend=backend, **_cayley_kw(c))


def _cayley_ref(kw):
    from pyfastpeft.orthogonal.reference import cayley_ref
    c = kw["_c"]
    v = kw["v"]
    return cayley_ref(v if v.dtype == torch.float64 else v.float(), c.b, **_cayley_kw(c)).to(v.dtype)


def _cayley_sample(device, dtype):
    return (torch.zeros(2, 6, device=device, dtype=dtype), 4)


def _oft_cases(device, dtype):
    return [OrthLinearCase("OFT 37x64->48 b16 neumann", 37, 64, 48, 16, "neumann"),
            OrthLinearCase("OFT 20x96->40 b32 exact", 20, 96, 40, 32, "exact"),
            OrthLinearCase("OFT 9x48->24 b8 shared nobias", 9, 48, 24, 8, "neumann", shared=True, bias=False),
            # more tokens than outputs: the weight is rotated (W' = W R_bd^T, dR from the diagonal blocks of x^T dx)
            # (b = 2 not shared: a shared 2 x 2 block has one generator, and a max over one value is a fragile baseline)
            OrthLinearCase("OFT 70x48->24 b12 neumann shared (weight side)", 70, 48, 24, 12, "neumann", shared=True),
            OrthLinearCase("OFT 41x32->16 b2 exact (weight side)", 41, 32, 16, 2, "exact"),
            OrthLinearCase("OFT 45x256->40 b128 exact (weight side)", 45, 256, 40, 128, "exact")]


def _psoft_cases(device, dtype):
    return [OrthLinearCase("PSOFT 37x64->48 r16 exact vec", 37, 64, 48, 16, "exact", shared=True),
            OrthLinearCase("PSOFT 20x96->40 r32 neumann eps", 20, 96, 40, 32, "neumann", eps=0.9, shared=True),
            OrthLinearCase("PSOFT 9x48->24 r5 exact novec nobias", 9, 48, 24, 5, "exact", bias=False)]


def _lin_common(c: OrthLinearCase, g):
    r = testing.randn
    return dict(x=r(c.M, c.K, dtype=torch.float64, generator=g),
                weight=r(c.N, c.K, dtype=torch.float64, scale=c.K ** -0.5, generator=g),
                bias=r(c.N, dtype=torch.float64, generator=g) if c.bias else None, _c=c)


def _oft_make(c, g):
    d = _lin_common(c, g)
    G = 1 if c.shared else c.K // c.b
    d["oft_v"] = testing.randn(G, c.b * (c.b - 1) // 2, dtype=torch.float64, scale=0.05, generator=g)
    return d


def _oft_call(kw, backend):
    c = kw["_c"]
    return oft_linear(kw["x"], kw["weight"], kw["bias"], kw["oft_v"], c.b, method=c.method,
                                 terms=c.terms, backend=backend)


def _oft_ref(kw):
    from pyfastpeft.orthogonal.reference import oft_linear_ref
    c, x = kw["_c"], kw["x"]
    if x.dtype == torch.float64:
        return oft_linear_ref(x, kw["weight"], kw["bias"], kw["oft_v"], c.b, method=c.method, terms=c.terms)
    wd = kw["oft_v"].dtype  # fp32: rotate in the adapter's dtype, cast, frozen GEMM in x's dtype (PEFT)
    xr = oft_linear_ref(x.to(wd), torch.eye(c.K, dtype=wd, device=x.device), None, kw["oft_v"], c.b,
                        method=c.method, terms=c.terms).to(x.dtype)
    y = xr @ kw["weight"].t()
    return y if kw["bias"] is None else y + kw["bias"]


def _oft_sample(device, dtype):
    return (torch.zeros(4, 8, device=device, dtype=dtype), torch.zeros(6, 8, device=device, dtype=dtype), None,
            torch.zeros(2, 6, device=device, dtype=dtype), 4)


def _psoft_make(c, g):
    d = _lin_common(c, g)
    r, K = c.b, c.K
    d["psoft_a"] = testing.randn(r, K, dtype=torch.float64, scale=K ** -0.5, generator=g)
    d["psoft_b"] = testing.randn(c.N, r, dtype=torch.float64, scale=r ** -0.5, generator=g)
    d["psoft_v"] = testing.randn(r * (r - 1) // 2, dtype=torch.float64, scale=0.1, generator=g)
    # without vectors the leaves are all-ones and unused (the call passes None): every grad leaf is a tensor
    d["vector_a"] = 1 + testing.randn(r, dtype=torch.float64, scale=0.1 if c.shared else 0.0, generator=g)
    d["vector_b"] = 1 + testing.randn(r, dtype=torch.float64, scale=0.1 if c.shared else 0.0, generator=g)
    return d


def _psoft_call(kw, backend):
    c = kw["_c"]
    va, vb = (kw["vector_a"], kw["vector_b"]) if c.shared else (None, None)
    return psoft_linear(kw["x"], kw["weight"], kw["bias"], kw["psoft_a"], kw["psoft_b"], kw["psoft_v"],
                                   va, vb, 1.5, method=c.method, terms=c.terms, eps=c.eps,
                                   backend=backend)


def _psoft_ref(kw):
    from pyfastpeft.orthogonal.reference import cayley_ref, psoft_linear_ref
    c, x = kw["_c"], kw["x"]
    va, vb = (kw["vector_a"], kw["vector_b"]) if c.shared else (None, None)
    if x.dtype == torch.float64:
        return psoft_linear_ref(x, kw["weight"], kw["bias"], kw["psoft_a"], kw["psoft_b"], kw["psoft_v"],
                                va, vb, 1.5, method=c.method, terms=c.terms, eps=c.eps)
    R = cayley_ref(kw["psoft_v"].reshape(1, -1), c.b, method=c.method, convention="plus", terms=c.terms,
                   eps=c.eps)[0]
    if vb is not None:
        R = vb[:, None] * R * va[None, :]
    u = x @ kw["psoft_a"].t()
    y = x @ kw["weight"].t() + 1.5 * ((u @ R.to(x.dtype).t() - u) @ kw["psoft_b"].t())
    return y if kw["bias"] is None else y + kw["bias"]


def _psoft_sample(device, dtype):
    z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
    return (z(4, 8), z(6, 8), None, z(3, 8), z(6, 3), z(3), None, None, 1.0)


def _build(leaves):
    return dict(leaves)


def checks() -> list[OpCheck]:
    """The three rows' :class:`pyfastpeft.tools.check.OpCheck` entries (OpCheck passed in: no import cycle)."""
    return [
        OpCheck(op="cayley", cases=_cayley_cases, make=_cayley_make, build=_build, call=_cayley_call,
                ref=_cayley_ref, grads=("v",), sample_args=_cayley_sample, keep_fp32=("v",),
                # the solve's error grows with b and cond(I ± Q); dv chains two b-long products more
                reduction=lambda c: {"out": 4 * c.b * c.terms, "v": 16 * c.b * c.terms}),
        OpCheck(op="oft_linear", cases=_oft_cases, make=_oft_make, build=_build, call=_oft_call, ref=_oft_ref,
                grads=("x", "oft_v"), sample_args=_oft_sample, keep_fp32=("oft_v",),
                reduction=lambda c: {"out": c.K + c.b, "x": c.N + c.b, "oft_v": c.M * c.b + c.N, "bias": c.M}),
        OpCheck(op="psoft_linear", cases=_psoft_cases, make=_psoft_make, build=_build, call=_psoft_call,
                ref=_psoft_ref, grads=("x", "psoft_v", "vector_a", "vector_b"), sample_args=_psoft_sample,
                keep_fp32=("psoft_v", "vector_a", "vector_b"),
                reduction=lambda c: {"out": c.K + 2 * c.b, "x": c.N + 2 * c.b, "psoft_v": c.M * c.b + c.N,
                                     "vector_a": c.M * c.b + c.N, "vector_b": c.M * c.b + c.N, "bias": c.M}),
    ]
