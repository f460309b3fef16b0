"""``pyfastpeft check`` rows for the filter-atom ops (``atom_conv2d``, ``atom_linear``): cases, inputs, calls,
references and reduction lengths, as :class:`pyfastpeft.testing.OpCheck` rows."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyfastpeft import testing
from pyfastpeft.atoms.ops import atom_conv2d, atom_linear
from pyfastpeft.testing import OpCheck


@dataclass(frozen=True)
class ConvCase:
    name: str
    N: int
    cin: int
    cout: int
    hw: tuple[int, int]
    k: tuple[int, int]
    stride: int = 1
    padding: object = 1
    dilation: int = 1
    groups: int = 1
    m: int = 4
    m1: int = 0  # recursive atoms: m1 sub-atoms (gradients of beta and sub-atoms are checked)
    channels_last: bool = False


def _conv_cases(device, dtype):
    return [
        ConvCase("3x3 odd 5->7 m4", 2, 5, 7, (9, 8), (3, 3)),
        ConvCase("stride2 dil2 groups3 m9 cl", 2, 6, 9, (11, 10), (3, 3), stride=2, padding=2, dilation=2, groups=3,
                 m=9, channels_last=True),
        ConvCase("depthwise 7x7 C8 m4", 2, 8, 8, (10, 9), (7, 7), padding=3, groups=8),
        ConvCase("same 4x4 m5", 2, 5, 7, (9, 8), (4, 4), padding="same", m=5),
        ConvCase("recursive m4 m1=3", 2, 6, 6, (8, 8), (3, 3), m1=3),
    ]


def _conv_make(c: ConvCase, g: torch.Generator) -> dict:
    r = testing.randn
    ci = c.cin // c.groups
    kh, kw = c.k
    d = dict(x=r(c.N, c.cin, *c.hw, dtype=torch.float64, generator=g),
             weight=r(c.cout, ci, kh, kw, dtype=torch.float64, scale=(ci * kh * kw) ** -0.5, generator=g),
             bias=r(c.cout, dtype=torch.float64, generator=g),
             coeff=r(c.cout, ci, c.m, dtype=torch.float64, scale=0.5, generator=g), _case=c)
    if c.m1:
        d["beta"] = r(c.m1, c.m, ci, dtype=torch.float64, generator=g)
        d["sub"] = r(c.m1, c.m, kh, kw, dtype=torch.float64, scale=0.3, generator=g)
    else:
        d["atoms"] = r(c.m, kh, kw, dtype=torch.float64, scale=0.3, generator=g)
    return d


def _conv_build(leaves: dict) -> dict:
    kw = {k: v for k, v in leaves.items()}
    c = kw["_case"]
    if c.channels_last:
        kw["x"] = kw["x"].contiguous(memory_format=torch.channels_last)
    return kw


def _atoms_of(kw, compose):
    return kw["atoms"] if "atoms" in kw else compose(kw["beta"], kw["sub"])


def _conv_call(kw: dict, backend: str):
    from pyfastpeft.atoms.ops import compose_atoms
    c = kw["_case"]
    return atom_conv2d(kw["x"], kw["weight"], kw["bias"], kw["coeff"], _atoms_of(kw, compose_atoms),
                                  stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                                  backend=backend)


def _conv_ref(kw: dict):
    from pyfastpeft.atoms.reference import atom_conv2d_ref, compose_atoms_ref
    c = kw["_case"]
    return atom_conv2d_ref(kw["x"], kw["weight"], kw["bias"], kw["coeff"], _atoms_of(kw, compose_atoms_ref),
                           c.stride, c.padding, c.dilation, c.groups)


def _conv_reduction(c: ConvCase) -> dict:
    ci, kk = c.cin // c.groups, c.k[0] * c.k[1]
    big = c.N * c.hw[0] * c.hw[1] * c.cout * ci
    return {"out": ci * kk + c.m, "x": (c.cout // c.groups) * kk * c.m, "atoms": big, "beta": big * kk, "sub": big,
            "bias": c.N * c.hw[0] * c.hw[1]}


def _conv_sample(device, dtype):
    z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
    return (z(2, 4, 6, 6), z(6, 4, 3, 3), None, z(6, 4, 2), z(2, 3, 3))


@dataclass(frozen=True)
class LinCase:
    name: str
    M: int
    K: int
    N: int
    kc: int
    m: int
    lead: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        return self.M * math.prod(self.lead)


def _lin_cases(device, dtype):
    return [LinCase("37x24->16 kc4 m5", 37, 24, 16, 4, 5), LinCase("3-D (2,7,32)->48 kc8 m3", 7, 32, 48, 8, 3, (2,))]


def _lin_make(c: LinCase, g: torch.Generator) -> dict:
    r = testing.randn
    return dict(x=r(*c.lead, c.M, c.K, dtype=torch.float64, generator=g),
                weight=r(c.N, c.K, dtype=torch.float64, scale=c.K ** -0.5, generator=g),
                bias=r(c.N, dtype=torch.float64, generator=g),
                coeff=r(c.N // c.kc, c.K // c.kc, c.m, dtype=torch.float64, generator=g),
                atoms=r(c.m, c.kc, c.kc, dtype=torch.float64, scale=0.3, generator=g), _case=c)


def _lin_call(kw: dict, backend: str):
    return atom_linear(kw["x"], kw["weight"], kw["bias"], kw["coeff"], kw["atoms"], block=kw["_case"].kc,
                                  backend=backend)


def _lin_ref(kw: dict):
    from pyfastpeft.atoms.reference import atom_linear_ref
    return atom_linear_ref(kw["x"], kw["weight"], kw["bias"], kw["coeff"], kw["atoms"])


def _lin_reduction(c: LinCase) -> dict:
    return {"out": c.K + c.m, "x": c.N + c.m, "atoms": c.tokens * c.N * c.K // c.kc, "bias": c.tokens}


def _lin_sample(device, dtype):
    z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
    return (z(4, 8), z(8, 8), None, z(2, 2, 3), z(3, 4, 4))


def _one_level(device, dtype):
    return [c for c in _conv_cases(device, dtype) if not c.m1]


def _recursive(device, dtype):
    return [c for c in _conv_cases(device, dtype) if c.m1]


def checks() -> list[OpCheck]:
    """The ``OpCheck`` rows : one-level
    conv atoms, recursive conv atoms (gradients of beta and the sub-atoms), channel-block linear atoms."""
    conv = dict(op="atom_conv2d", make=_conv_make, build=_conv_build, call=_conv_call, ref=_conv_ref,
                reduction=_conv_reduction, sample_args=_conv_sample)
    return [
        OpCheck(cases=_one_level, grads=("x", "atoms", "bias"), **conv),
        OpCheck(cases=_recursive, grads=("x", "beta", "sub", "bias"), **conv),
        OpCheck(op="atom_linear", cases=_lin_cases, make=_lin_make, build=lambda leaves: dict(leaves), call=_lin_call,
                ref=_lin_ref, grads=("x", "atoms", "bias"), reduction=_lin_reduction, sample_args=_lin_sample),
    ]
