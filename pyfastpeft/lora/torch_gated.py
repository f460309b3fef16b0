"""``torch`` backend of token-selective LoRA: the contract of ``gated_lora_linear_fwd/bwd``.

Forward on 2-D ``x (M, K)`` returns ``(y (M, N), u (M, R), ratio (M,) fp32 (fp64 for fp64 x), selected (M,)
bool, thr () the threshold used: max(τ, 0), with a budget max(τ, 0, t_p))``;
backward saves ``x_lora`` (x itself without dropout), ``u``, ``ratio``, ``selected`` and, for
``gate_grad="full"`` with dropout, ``x``: nothing of size ``M × N``.

Backward, with ``S`` the selection, ``g = scale · dy B`` (M, R), ``⟨dy_i, m_i⟩ = g_i · u_i`` and the
scale-free triangle window ``w_i = max(0, 1 − |r_i − t| / (T σ)) / (T σ)``, ``σ = max(mean finite r, t)``
(``t`` the forward's threshold, passed to the backward as ``tau``):
    dA = (S ⊙ g)ᵀ x_lora,   dB = scale · dyᵀ (S ⊙ u),   dx = dy W + (S ⊙ g) A
    dτ = −Σ_i w_i ⟨dy_i, m_i⟩
``"full"`` adds, on the window rows only (``c_i = w_i ⟨dy_i, m_i⟩ = ∂L/∂r_i``), the gradient of
``r_i = ‖m_i‖ / ‖h_i‖`` through ``m_i`` (into A, B, x_lora) and ``h_i`` (into x): ``h`` and ``m`` are
recomputed for those rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.lora.gate import EPS, effective_threshold, finish_gate



def fwd(x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
        lora_b: Tensor, scale: float, tau: Tensor, target_fraction: Optional[float] = None
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    h = torch.mm(x, weight.t())
    u = torch.mm(x if x_lora is None else x_lora, lora_a.t())
    m = torch.mm(u, lora_b.t()).mul_(scale)
    wd = acc_dtype(x.dtype)
    ratio = m.to(wd).norm(dim=1) / h.to(wd).norm(dim=1).clamp(min=EPS)
    thr = effective_threshold(ratio, tau, target_fraction, wd)  # max(τ, 0[, batch quantile]): on the device
    selected = ratio >= thr  # a NaN ratio compares false: never selected
    # an unselected row is exactly h_i (+ b), as in the kernels that never expand it: adding 0 · m_i instead
    # would turn an inf in m_i into NaN
    y = h.add_(m.masked_fill_(~selected[:, None], 0))
    if bias is not None:
        y += bias
    return y, u, ratio, selected, thr  # ratio in fp32 (fp64 for fp64 inputs: the fp64 test path stays exact)


def bwd(dy: Tensor, x: Tensor, x_lora: Tensor, u: Tensor, ratio: Tensor, selected: Tensor, weight: Tensor,
        lora_a: Tensor, lora_b: Tensor, scale: float, tau: Tensor, gate_width: float, full: bool, dx_mode: int
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    s_col = selected.to(dy.dtype)[:, None]
    g_all = torch.mm(dy, lora_b).mul_(scale)  # s · dy B on every row (the τ gradient needs all window rows)
    g = g_all * s_col
    da = torch.mm(g.t(), x_lora)
    db = torch.mm(dy.t(), u * s_col).mul_(scale)
    dx = torch.mm(dy, weight) if dx_mode else None
    dxl = torch.mm(g, lora_a) if dx_mode else None
    return finish_gate(dy, x, x_lora, u, ratio, weight, lora_a, lora_b, scale, tau, gate_width, full, dx_mode,
                       g_all, da, db, dx, dxl)
