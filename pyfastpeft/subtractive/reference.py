"""Reference Gram accumulation for the subtractive fit (``docs/subtractive.md`` §1), in fp64.

    X̃ = [X, 1]  (the bias column only when ``bias``),   G = X̃ᵀ X̃,   C = X̃ᵀ Y

``x (M, K)``, ``y (M, N)``; returns ``G (K+1, K+1)`` and ``C (K+1, N)`` (``K`` rows/columns without the
bias column). Materialises ``X̃`` and runs two plain fp64 matmuls: the oracle, never a backend.
"""
from __future__ import annotations

import torch


def gram_accumulate_ref(x: torch.Tensor, y: torch.Tensor, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    xd, yd = x.double(), y.double()
    if bias:
        xd = torch.cat([xd, torch.ones(xd.shape[0], 1, dtype=torch.float64, device=xd.device)], dim=1)
    return xd.t() @ xd, xd.t() @ yd
