"""The one dtype rule of the library: fp64 stays fp64, every other floating dtype accumulates in fp32."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which reductions, norms, gates and small solves run for inputs of ``dtype``."""
    return torch.promote_types(dtype, torch.float32)
