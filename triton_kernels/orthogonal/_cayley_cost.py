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

# the Triton kernels' limits (one b × b block per program, in registers; the compile report checks them)
MAX_B = 128  # exact forward (Gauss-Jordan on one register tile)
# exact backward (two register ``tl.dot``; at 128 they spill, and so did a rank-1 workspace version on sm_90a:
# the registry runs the torch backward, two batched GEMMs from the saved R, above it)
MAX_B_EXACT_BWD = 64
MAX_B_NEUMANN = 64  # Neumann series (Horner forward, reverse-Horner backward)
# the largest BLOCK whose Neumann products run as register ``tl.dot``; above it (BLOCK 64) they are rank-1
# updates through a per-program fp32 workspace (the dots spill there)
DOT_MAX_NEUMANN = 32


def neumann_degree(terms: int) -> int:
    """Highest power of ``Q`` in PEFT's series with ``terms`` terms (3 for both ``T = 3`` and ``T = 4``)."""
    if terms <= 1:
        return 0
    if terms == 2:
        return 1
    return max(3, terms - 1)


def _block(b: int) -> int:
    return max(16, 1 << (max(b, 1) - 1).bit_length())


def cayley_fwd_cost(G: int, b: int, method: str, terms: int, v_itemsize: int) -> dict:
    n = b * (b - 1) // 2
    ws = 0  # workspace tiles written once and read back (counted as HBM traffic, though mostly L2 hits)
    if method == "exact":
        flops = G * (2 * b ** 3 + 2 * b * b)
    else:
        d = neumann_degree(terms)
        flops = G * (2 * b ** 3 * max(d - 1, 0) + 2 * d * b * b)
        if _block(b) > DOT_MAX_NEUMANN and d >= 2:
            ws = 2  # Q_s in the workspace, the running S through R itself
    return dict(flops=flops, read=G * (n * v_itemsize + ws * b * b * 4), write=G * (1 + ws) * b * b * 4)


def cayley_bwd_cost(G: int, b: int, method: str, terms: int, v_itemsize: int) -> dict:
    n = b * (b - 1) // 2
    if method == "exact":
        # reads dR and R (fp32), writes dv (fp32): the upper triangle stored, then the lower one atomically
        # added, so dv is also read once (an L2 hit on a GPU; the interpreter trace counts it)
        return dict(flops=G * (4 * b ** 3 + 2 * b * b), read=G * (2 * b * b + n) * 4, write=G * n * 4)
    d = neumann_degree(terms)
    if _block(b) > DOT_MAX_NEUMANN:  # Qᵀ, S and W through a three-tile workspace
        return dict(flops=G * (6 * b ** 3 * d + 4 * b * b * d), read=G * (4 * b * b * 4 + n * v_itemsize + n * 4),
                    write=G * (n + 3 * b * b) * 4)
    # reads dR (fp32) and v, writes dv (fp32) as the exact backward does: upper triangle, then lower one added
    return dict(flops=G * (6 * b ** 3 * d + 4 * b * b * d), read=G * (b * b * 4 + n * v_itemsize + n * 4),
                write=G * n * 4)
