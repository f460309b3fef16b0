"""First-use twin check of the orthogonal family's CUDA op (the framework: :mod:`pyfastpeft.core.twin`)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from pyfastpeft.core.twin import DTYPES, _norm_err, _randn


def check_cayley_exact(device: torch.device, op: Optional[Callable] = None) -> float:
    """Exact batched Cayley ``R (G, b, b)`` from packed ``v (G, b(b-1)/2)`` fp32, both conventions, against
    float64 ``torch.linalg.solve`` on the same (fp32-rounded) ``v``. Cases: b = 7 (odd, padded), 32, 128
    (the largest block, 66 KB of shared memory), G = 0; ``‖Q‖_F`` about 2 (cond(I ± Q) <= 3). Length
    ``L = b²`` (a Gauss-Jordan entry accumulates ~b rounded updates of growth ~b)."""
    op = op if op is not None else torch.ops.pyfastpeft_C.cayley_exact
    gen = torch.Generator().manual_seed(777)
    worst = 0.0
    for G, b in ((5, 7), (3, 32), (2, 128), (0, 4)):
        n = b * (b - 1) // 2
        v64 = _randn(gen, G, n)
        v64 = v64 * (2.0 / max(b, 2) ** 1.0)  # ‖Q‖_F ≈ √2 ‖v‖ ≈ 2 per block
        v32 = v64.float()
        rows, cols = torch.triu_indices(b, b, 1)
        Q = torch.zeros(G, b, b, dtype=torch.float64)
        Q[:, rows, cols] = v32.double()
        Q = Q - Q.transpose(1, 2)
        eye = torch.eye(b, dtype=torch.float64).expand(G, b, b)
        for minus in (True, False):
            ref = (torch.linalg.solve(eye + Q, eye - Q, left=False) if minus
                   else torch.linalg.solve(eye - Q, eye + Q, left=False))
            out = op(v32.to(device), b, minus)
            if tuple(out.shape) != (G, b, b) or out.dtype != torch.float32:
                return math.inf
            worst = max(worst, _norm_err(out, ref, torch.float32, b * b))
    return worst




# CUDA op name -> twin check (see pyfastpeft.core.twin)
TWIN_CHECKS: dict[str, Callable[[torch.device], float]] = {
    "cayley_exact": check_cayley_exact,
}
