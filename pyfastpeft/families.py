"""The library's one table of method families.

:data:`FAMILIES` names every family; each is a package ``pyfastpeft/<name>/`` whose ``FAMILY``
(:class:`pyfastpeft.core.family.Family`) declares its ops, layers, ``inject`` methods and their PEFT
counterparts, references, check rows, twin checks, cost tables, Triton kernel modules and benchmarks.
Everything that loops over methods (``pfp.<op>``, ``pfp.nn``, ``pfp.reference``, ``pfp.explain``,
``inject``, ``from_peft``, adapter files, ``pyfastpeft check / bench / demo / compile-report / info``, the
performance model) reads it through the functions below. Adding a method: ``docs/adding-a-method.md``.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

from pyfastpeft.core.family import Family, Method, Op, resolve

FAMILIES: tuple[str, ...] = ("lora", "orthogonal", "atoms", "subtractive")


@functools.lru_cache(maxsize=None)
def families() -> tuple[Family, ...]:
    """Every family's declaration, in :data:`FAMILIES` order."""
    return tuple(importlib.import_module(f"pyfastpeft.{name}").FAMILY for name in FAMILIES)


def family(name: str) -> Family:
    for fam in families():
        if fam.name == name:
            return fam
    raise ValueError(f"unknown family {name!r}; known: {list(FAMILIES)}")


def ops() -> dict[str, Op]:
    """Public op name -> :class:`Op`."""
    return {op.name: op for fam in families() for op in fam.ops}


def modules() -> dict[str, type]:
    """Class name -> ``nn.Module`` class of every adapter layer (``pfp.nn``)."""
    return {cls.__name__: cls for fam in families() for cls in fam.modules}


def methods() -> dict[str, Method]:
    """``inject`` method name -> :class:`Method`."""
    return {m.name: m for fam in families() for m in fam.methods}


def references() -> dict[str, Callable]:
    """``<op>_ref`` -> the fp64 reference of every op."""
    return {f"{op.name}_ref": op.reference for op in ops().values() if op.reference is not None}


def exports() -> dict[str, Any]:
    """Every family's other public names (``pfp.<name>``)."""
    return {k: v for fam in families() for k, v in fam.exports.items()}


def check_rows() -> list:
    """Every family's ``pyfastpeft check`` rows (:class:`pyfastpeft.testing.OpCheck`)."""
    return [row for fam in families() if fam.checks for row in resolve(fam.checks)()]


def twin_checks() -> dict[str, Callable]:
    """CUDA op name -> its first-use twin check, over every family."""
    out: dict[str, Callable] = {}
    for fam in families():
        if fam.twins:
            out.update(resolve(fam.twins))
    return out


def cost_tables() -> dict[str, Callable]:
    """``"pyfastpeft::<op>"`` -> declared cost function, over every family (read by ``pfp.perf``)."""
    out: dict[str, Callable] = {}
    for fam in families():
        for ref in fam.costs:
            out.update(resolve(ref))
    return out


def kernel_modules() -> list[str]:
    """Every Triton kernel module (their ``AOT_SPECS`` make the compile report)."""
    return [m for fam in families() for m in fam.kernels]


def benchmarks() -> list[str]:
    """Every family's benchmark scripts (paths from the repository root)."""
    return [b for fam in families() for b in fam.benchmarks]
