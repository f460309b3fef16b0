"""Declared cost of each Triton launch of the orthogonal family: FLOPs and unique HBM bytes (read, write).

Triton-free, so ``pfp.perf.count`` can use it without Triton installed. The batched Cayley kernels do the
whole batch in one launch, one ``b × b`` block per program, all in registers: HBM traffic is the packed
``v`` (its own dtype) and ``R`` / ``dR`` / ``dv`` in fp32. FLOPs count what a program issues on the
``b × b`` block (the padding to a power of two is not counted):

* exact forward: Gauss-Jordan inversion of ``N = I ± Q`` without pivoting, ``b`` rank-1 updates of
  ``2b²`` FLOPs, then ``R = 2N⁻¹ − I``;
* Neumann forward: ``d − 1`` products of ``b × b`` blocks (``2b³`` each) and ``d`` scaled adds, ``d`` the
  degree of PEFT's series (:func:`neumann_degree`);
* exact backward: ``dQ = ∓½ (Rᵀ + I) dR (Rᵀ + I)``: two products;
* Neumann backward: a reverse Horner recursion, three products per degree.

The PSOFT layer cost is that of its torch path (counted by ``pfp.perf`` on the meta device) plus these
launches; OFT linear's kernels declare theirs in ``_oft_cost.py``.
"""
from __future__ import annotations

from pyfastpeft.core.cost import cdiv as _cdiv


def neumann_degree(terms: int) -> int:
    """Highest power of ``Q`` in PEFT's series with ``terms`` terms (3 for both ``T = 3`` and ``T = 4``)."""
    if terms <= 1:
        return 0
    if terms == 2:
        return 1
    return max(3, terms - 1)


def cayley_fwd_cost(G: int, b: int, method: str, terms: int, v_itemsize: int) -> dict:
    n = b * (b - 1) // 2
    if method == "exact":
        flops = G * (2 * b ** 3 + 2 * b * b)
    else:
        d = neumann_degree(terms)
        flops = G * (2 * b ** 3 * max(d - 1, 0) + 2 * d * b * b)
    return dict(flops=flops, read=G * n * v_itemsize, write=G * b * b * 4)


def cayley_bwd_cost(G: int, b: int, method: str, terms: int, v_itemsize: int) -> dict:
    n = b * (b - 1) // 2
    if method == "exact":
        # reads dR and R (fp32), writes dv (fp32): the upper triangle stored, then the lower one atomically
        # added, so dv is also read once (an L2 hit on a GPU; the interpreter trace counts it)
        return dict(flops=G * (4 * b ** 3 + 2 * b * b), read=G * (2 * b * b + n) * 4, write=G * n * 4)
    d = neumann_degree(terms)
    return dict(flops=G * (6 * b ** 3 * d + 4 * b * b * d), read=G * (b * b * 4 + n * v_itemsize), write=G * n * 4)
