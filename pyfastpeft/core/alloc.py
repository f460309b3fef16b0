"""The one allocator kernels and fallbacks use for their outputs.

With ``PYFASTPEFT_POISON_EMPTY=1`` (on in the tests) every floating output starts as NaN, so a kernel
that forgets to write an element fails loudly instead of returning stale memory.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch


def poisoning() -> bool:
    return os.environ.get("PYFASTPEFT_POISON_EMPTY", "0") == "1"


def empty_out(shape: Sequence[int], *, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device)
    if poisoning() and out.is_floating_point():
        out.fill_(float("nan"))
    return out
