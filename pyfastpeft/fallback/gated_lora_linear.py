"""``torch`` backend of token-selective LoRA: the contract of ``gated_lora_linear_fwd/bwd``.

Forward on 2-D ``x (M, K)`` returns ``(y (M, N), u (M, R), ratio (M,) fp32 (fp64 for fp64 x), selected (M,)
bool)``;
backward saves ``x_lora`` (x itself without dropout), ``u``, ``ratio``, ``selected`` and, for
``gate_grad="full"`` with dropout, ``x``: nothing of size ``M × N``.

Backward, with ``S`` the selection, ``g = scale · dy B`` (M, R), ``⟨dy_i, m_i⟩ = g_i · u_i`` and the
triangle window ``w_i = max(0, 1 − |r_i − τ_eff| / T) / T``:
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

from pyfastpeft._alloc import empty_out

EPS = 1e-6  # floor of ‖h_i‖ in r_i (spec §1)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def fwd(x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
        lora_b: Tensor, scale: float, tau: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    h = torch.mm(x, weight.t())
    u = torch.mm(x if x_lora is None else x_lora, lora_a.t())
    m = torch.mm(u, lora_b.t()).mul_(scale)
    wd = _wide(x.dtype)
    ratio = m.to(wd).norm(dim=1) / h.to(wd).norm(dim=1).clamp(min=EPS)
    selected = ratio >= tau.to(wd).clamp(min=0)
    y = h.addcmul_(selected.to(m.dtype)[:, None], m)
    if bias is not None:
        y += bias
    return y, u, ratio, selected  # ratio in fp32 (fp64 for fp64 inputs: the fp64 test path stays exact)


def tau_window(ratio: Tensor, tau: Tensor, gate_width: float, dtype: torch.dtype) -> Tensor:
    """Triangle window ``w_i = max(0, 1 − |r_i − τ_eff| / T) / T`` (= −∂S_i/∂τ of the surrogate)."""
    return (1 - (ratio.to(dtype) - tau.to(dtype).clamp(min=0)).abs() / gate_width).clamp(min=0) / gate_width


def full_terms(c: Tensor, win: Tensor, x: Tensor, x_lora: Tensor, u: Tensor, ratio: Tensor, weight: Tensor,
               lora_a: Tensor, lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``gate_grad="full"``: the gradient of ``r_i = ‖m_i‖ / ‖h_i‖`` on the window rows ``win``, with
    ``c = ∂L/∂r`` there; ``h`` and ``m`` are recomputed for those rows only.

    Returns ``(dA_add, dB_add, dx_lora_rows, dx_rows)`` (the last two: rows ``win`` of dx_lora and dx).
    """
    wd = c.dtype
    u_w, xl_w = u[win], x_lora[win]
    h_w = torch.mm(x[win], weight.t()).to(wd)
    m_w = (torch.mm(u_w, lora_b.t()) * scale).to(wd)
    hn, mn = h_w.norm(dim=1), m_w.norm(dim=1)
    q = torch.where(mn > 0, c / (mn * hn.clamp(min=EPS)), torch.zeros_like(c))
    dm = q[:, None] * m_w  # through ‖m_i‖
    du = (torch.mm(dm, lora_b.to(wd)) * scale).to(u.dtype)
    da_add = torch.mm(du.t(), xl_w)
    db_add = (torch.mm(dm.t(), u_w.to(wd)) * scale).to(lora_b.dtype)
    # through 1/max(‖h_i‖, ε): ∂r/∂h = −r h / ‖h‖² where ‖h‖ > ε
    coef = torch.where(hn > EPS, -c * ratio[win].to(wd) / hn.clamp(min=EPS) ** 2, torch.zeros_like(c))
    return da_add, db_add, torch.mm(du, lora_a), torch.mm((coef[:, None] * h_w).to(u.dtype), weight)


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


def finish_gate(dy, x, x_lora, u, ratio, weight, lora_a, lora_b, scale, tau, gate_width, full, dx_mode,
                g_all, da, db, dx, dxl):
    """The τ gradient and the ``"full"`` terms, shared by every backend (they touch only (M, R) tensors and
    the window rows). ``dx`` / ``dx_lora`` come from the selected-rows LoRA backward; in mode 1 ``dx_lora``
    may be None when ``dx`` already holds it (a fused kernel)."""
    wd = _wide(dy.dtype)
    dym = (g_all.to(wd) * u.to(wd)).sum(1)  # ⟨dy_i, m_i⟩
    w = tau_window(ratio, tau, gate_width, wd)
    dtau = -(w * dym).sum().to(tau.dtype)
    if dx_mode == 1 and dxl is not None:
        dx, dxl = dx.add_(dxl), None
    if full:
        win = torch.nonzero(w > 0).flatten()
        if win.numel():
            da_add, db_add, dxl_rows, dx_rows = full_terms((w * dym)[win], win, x, x_lora, u, ratio, weight,
                                                           lora_a, lora_b, scale)
            da, db = da + da_add, db + db_add
            if dx_mode == 1:
                dx = dx.index_add(0, win, dxl_rows + dx_rows)
            elif dx_mode == 2:
                dxl = dxl.index_add(0, win, dxl_rows)
                dx = dx.index_add(0, win, dx_rows)
    if dx_mode == 0:
        return empty_out((0,), like=dy), empty_out((0,), like=dy), da, db, dtau
    if dx_mode == 1:
        return dx, empty_out((0,), like=dy), da, db, dtau
    return dx, dxl, da, db, dtau
