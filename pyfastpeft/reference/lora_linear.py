"""Reference LoRA linear, exactly PEFT's ``lora.Linear`` forward.

    y = x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ

x (..., K), W (N, K), b (N,) or None, A (r, K), B (N, r). ``dropout_mask`` (same shape as x, already
divided by 1 - p) stands in for PEFT's ``nn.Dropout`` on A's input so that a kernel's random mask can be
replayed here; ``None`` means no dropout.
"""
from __future__ import annotations

from typing import Optional

import torch


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    y = torch.matmul(x, weight.t())
    if bias is not None:
        y = y + bias
    xa = x if dropout_mask is None else x * dropout_mask
    u = torch.matmul(xa, lora_a.t())
    return y + scale * torch.matmul(u, lora_b.t())
