"""Block-diagonal helpers shared by OFT's ``torch`` and ``triton`` backends (neither imports the other)."""
from __future__ import annotations

import torch
from torch import Tensor


def oft_weight_side(M: int, N: int) -> bool:
    """Rotate the weight (``N·K·b`` FLOPs, one pass over ``W``) rather than the input (``M·K·b``, passes over
    ``x`` and ``dy W``) when there are more tokens than output features: training batches, not decoding."""
    return M > N


def inv_transpose(R: Tensor, orthogonal: bool) -> Tensor:
    """``R_g⁻ᵀ`` per block: ``R`` itself when orthogonal (exact Cayley), else a batched inverse (Neumann)."""
    if orthogonal:
        return R
    return torch.linalg.inv_ex(R.transpose(1, 2))[0]  # no error check: no host sync (R_g is invertible, §3)
