"""The gate maths of token-selective LoRA shared by the torch backend, the Triton backend and the modules.

The fp64 reference (:mod:`pyfastpeft.lora.reference`) keeps its own copy on purpose: a bug here cannot
hide in the oracle. The maths is in ``docs/token_selective.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.core.amp import autocast_off

EPS = 1e-6  # floor of ‖h_i‖ in r_i (docs/token_selective.md §1)


def gram(lora_b: Tensor) -> Tensor:
    """``BᵀB`` (R, R) in fp32, the matrix of the identity ``‖m_i‖² = s² u_iᵀ (BᵀB) u_i`` (the Triton and CUDA
    gates). Computed with autocast off: under ``torch.autocast`` a matmul of fp32 tensors would be recast to
    the 16-bit dtype, and the gate kernels take (and need) the fp32 Gram."""
    with autocast_off(lora_b.device.type):
        b = lora_b.float()
        return b.t() @ b


def smooth_step(z: Tensor) -> Tensor:
    """H(z): 0 for z ≤ −1, (1+z)²/2 on (−1, 0], 1 − (1−z)²/2 on (0, 1), 1 for z ≥ 1."""
    zc = z.clamp(-1.0, 1.0)
    return torch.where(zc <= 0, 0.5 * (1 + zc) ** 2, 1 - 0.5 * (1 - zc) ** 2)


def tau_eff(tau: Tensor) -> Tensor:
    """max(τ, 0) in the forward, identity in the backward (straight-through clamp)."""
    return tau + (tau.clamp(min=0) - tau).detach()


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


def finish_gate(dy, x, x_lora, u, ratio, weight, lora_a, lora_b, scale, tau, gate_width, full, dx_mode,
                g_all, da, db, dx, dxl):
    """The τ gradient and the ``"full"`` terms, shared by every backend (they touch only (M, R) tensors and
    the window rows). ``dx`` / ``dx_lora`` come from the selected-rows LoRA backward; in mode 1 ``dx_lora``
    may be None when ``dx`` already holds it (a fused kernel). Runs with autocast off: the window, the τ
    gradient and the ``"full"`` terms are fp32 (acc dtype) matmuls that autocast would recast to 16 bits."""
    with autocast_off(dy.device.type):
        return _finish_gate(dy, x, x_lora, u, ratio, weight, lora_a, lora_b, scale, tau, gate_width, full, dx_mode,
                            g_all, da, db, dx, dxl)


def _finish_gate(dy, x, x_lora, u, ratio, weight, lora_a, lora_b, scale, tau, gate_width, full, dx_mode,
                 g_all, da, db, dx, dxl):
    wd = acc_dtype(dy.dtype)
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
