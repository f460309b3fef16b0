"""``torch`` backend of LoRA linear: the contract every backend of ``lora_linear_fwd/bwd`` implements.

Forward, on 2-D ``x (M, K)``:
    y = x Wᵀ + bias + scale · u Bᵀ,   u = x_lora Aᵀ   (x_lora = dropout(x), or x itself when None)
returns ``(y (M, N), u (M, R))``; backward saves only ``x_lora`` and ``u`` (W, A, B are parameters).

The base GEMM runs last and adds onto the rank-r term (its ``C`` operand, ``beta = 1``), so nothing of size
M × N (M × K for ``dx``) is read or written twice.

Backward, with ``g = scale · dy B (M, R)``:
    dx = dy W + g A         (dx_mode 1: one tensor)
    dx = dy W,  dx_lora = g A   (dx_mode 2: dropout, the LoRA part flows back through the mask)
    dA = gᵀ x_lora,  dB = scale · dyᵀ u
``dx_mode`` 0 skips the input gradient entirely (x does not require grad). An ``x_lora`` of shape ``(0,)``
(1-D, empty) means ``A`` is frozen: the ``dA`` reduction is skipped and nothing of size M × K was saved for it
(PSOFT runs on these primitives that way: ``pyfastpeft.orthogonal.psoft_linear``). Outputs that are not
computed come back as empty ``(0,)`` tensors (custom ops return tensors, never None).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyfastpeft.core.alloc import empty_out


def fwd(x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
        lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    u = torch.mm(x if x_lora is None else x_lora, lora_a.t())
    # The rank-r term first, then the base GEMM adds x Wᵀ onto it as its C operand (beta = 1): y is written
    # once by the small GEMM and read once inside the compute-bound cuBLAS GEMM, never re-read after it.
    y = torch.mm(u.mul(scale), lora_b.t()) if bias is None else torch.addmm(bias, u, lora_b.t(), alpha=scale)
    return y.addmm_(x, weight.t()), u


def bwd(dy: Tensor, x_lora: Tensor, u: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
        dx_mode: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    db = torch.mm(dy.t(), u).mul_(scale)
    skip_da = x_lora.dim() == 1  # A frozen: no dA reduction (and no g when dx is not wanted either)
    if skip_da and dx_mode == 0:
        return empty_out((0,), like=dy), empty_out((0,), like=dy), empty_out((0,), like=dy), db
    g = torch.mm(dy, lora_b).mul_(scale)
    da = empty_out((0,), like=dy) if skip_da else torch.mm(g.t(), x_lora)
    if dx_mode == 0:  # custom-op outputs may not alias each other: two distinct empty tensors
        return empty_out((0,), like=dy), empty_out((0,), like=dy), da, db
    if dx_mode == 1:  # g A first, then dy W onto it as the base GEMM's C operand (as in the forward)
        return torch.mm(g, lora_a).addmm_(dy, weight), empty_out((0,), like=dy), da, db
    return torch.mm(dy, weight), torch.mm(g, lora_a), da, db
