"""First-use twin check of the filter-atom family's CUDA op (the framework: :mod:`pyfastpeft.core.twin`)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from pyfastpeft.core.twin import DTYPES, _norm_err, _randn


def check_atom_grad_conv2d(device: torch.device, op: Optional[Callable] = None) -> float:
    """Filter-atom gradient ``dD (C_in, m, kh, kw)`` against float64 (``docs/atoms.md`` §1), per global input
    channel: ``Σ_{o in group(i)} coeff[o, i mod C_in/g, j] · dW'[o, i mod C_in/g, p, q]`` with ``dW'`` the conv
    weight gradient of ``(x, dy)`` in float64. Cases: 3x3 with odd channels and padding; stride 2 and dilation
    with groups and m = 9; a depthwise 7x7 with x channels_last. L = N·Ho·Wo·(C_out/g)."""
    op = op if op is not None else torch.ops.pyfastpeft_C.atom_grad_conv2d
    gen = torch.Generator().manual_seed(99)
    worst = 0.0
    for N, cin, cout, H, W, k, s, p, d, g, m, cl in ((2, 5, 7, 9, 8, 3, 1, 1, 1, 1, 4, False),
                                                     (2, 6, 9, 11, 10, 3, 2, 2, 2, 3, 9, False),
                                                     (1, 8, 8, 12, 12, 7, 1, 3, 1, 8, 4, True)):
        x64, coeff = _randn(gen, N, cin, H, W), _randn(gen, cout, cin // g, m).float()
        ho, wo = (H + 2 * p - d * (k - 1) - 1) // s + 1, (W + 2 * p - d * (k - 1) - 1) // s + 1
        dy64 = _randn(gen, N, cout, ho, wo)
        for dtype in DTYPES:
            x_lo, dy_lo = x64.to(dtype), dy64.to(dtype)
            dw = torch.nn.grad.conv2d_weight(x_lo.double(), (cout, cin // g, k, k), dy_lo.double(), s, p, d, g)
            ref = torch.cat([torch.einsum("oij,oipq->ijpq", coeff.double()[gi * (cout // g):(gi + 1) * (cout // g)],
                                          dw[gi * (cout // g):(gi + 1) * (cout // g)]) for gi in range(g)])
            x = x_lo.to(device)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            out = op(dy_lo.to(device), x, coeff.to(device), k, k, [s, s], [p, p], [d, d], g)
            if tuple(out.shape) != tuple(ref.shape) or out.dtype != torch.float32:
                return math.inf
            worst = max(worst, _norm_err(out, ref, dtype, N * ho * wo * (cout // g)))
    return worst




# CUDA op name -> twin check (see pyfastpeft.core.twin)
TWIN_CHECKS: dict[str, Callable[[torch.device], float]] = {
    "atom_grad_conv2d": check_atom_grad_conv2d,
}
