"""``pyfastpeft check`` rows for ``gram_accumulate`` (the subtractive fit's accumulation op): cases, inputs,
call, reference and reduction lengths, as :class:`pyfastpeft.testing.OpCheck` rows.

The op has no gradient (``grads=()``) and returns fp32 ``G`` and ``C`` whatever the input dtype; the
inputs are drawn on the grid that fp16 and bf16 both hold exactly, so the fp64 reference is exact for
every dtype and the fp32 rule (reduction length = rows) judges the accumulation alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyfastpeft.testing import OpCheck


@dataclass(frozen=True)
class GramCase:
    name: str
    M: int
    K: int
    N: int
    bias: bool = True
    noncontig: bool = False  # x is a transposed (column-major) view


def _cases(device, dtype):
    return [
        GramCase("37 rows 20->11", 37, 20, 11),
        GramCase("odd 70 rows 33->17 no bias", 70, 33, 17, bias=False),
        GramCase("non-contig x 45 rows 24->30", 45, 24, 30, noncontig=True),
        GramCase("1 feature 50 rows 1->9", 50, 1, 9),
    ]


def _grid(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(torch.bfloat16).to(torch.float16).double()


def _make(c: GramCase, g: torch.Generator) -> dict:
    x = _grid(c.K, c.M, g=g) if c.noncontig else _grid(c.M, c.K, g=g)
    return dict(x=x, y=_grid(c.M, c.N, g=g), _bias=c.bias, _noncontig=c.noncontig)


def _build(leaves: dict) -> dict:
    x = leaves["x"].t() if leaves["_noncontig"] else leaves["x"]
    return dict(x=x, y=leaves["y"], bias=leaves["_bias"])


def _call(kw: dict, backend: str) -> torch.Tensor:
    from pyfastpeft.subtractive.gram_accumulate import gram_accumulate

    G, C = gram_accumulate(kw["x"], kw["y"], bias=kw["bias"], backend=backend)
    return torch.cat([G, C], 1)


def _ref(kw: dict) -> torch.Tensor:
    from pyfastpeft.subtractive.reference import gram_accumulate_ref

    G, C = gram_accumulate_ref(kw["x"], kw["y"], kw["bias"])
    return torch.cat([G, C], 1)


def _reduction(c: GramCase) -> dict:
    return {"out": c.M}  # every entry is a sum over the rows


def _sample(device, dtype):
    return (torch.zeros(4, 3, device=device, dtype=dtype), torch.zeros(4, 2, device=device, dtype=dtype))


def checks() -> list[OpCheck]:
    return [OpCheck(op="gram_accumulate", cases=_cases, make=_make, build=_build, call=_call, ref=_ref, grads=(),
                    reduction=_reduction, sample_args=_sample)]
