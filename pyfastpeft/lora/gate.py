"""The gate maths of token-selective LoRA shared by the torch backend, the Triton backend and the modules.

The fp64 reference (:mod:`pyfastpeft.lora.reference`) keeps its own copy on purpose: a bug here cannot
hide in the oracle. The maths is in ``docs/token_selective.md``.
"""
from __future__ import annotations

import math
from typing import Optional

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


def ratio_scale(ratio: Tensor, thr: Tensor) -> Tensor:
    """σ = max(mean of the finite ratios, t): the scale of the surrogate window (a constant, no gradient).
    0 only when every finite ratio is 0 and t = 0 (``B = 0``)."""
    r = ratio.detach()
    fin = torch.isfinite(r)
    mean = torch.where(fin, r, torch.zeros_like(r)).sum() / fin.sum().clamp(min=1).to(r.dtype)
    return torch.maximum(mean, thr.detach().to(r.dtype).reshape(()))


def window_z(ratio: Tensor, thr: Tensor, gate_width: float) -> Tensor:
    """``z_i = (r_i − t) / (T σ)`` (``σ`` from :func:`ratio_scale`); ``z_i = 1`` (outside the window, fully
    selected) when ``σ = 0``. ``thr`` may carry a gradient (straight-through threshold)."""
    sigma = ratio_scale(ratio, thr)
    t = thr.to(ratio.dtype).reshape(())
    return torch.where(sigma > 0, (ratio - t) / (gate_width * sigma.clamp(min=torch.finfo(sigma.dtype).tiny)),
                       torch.ones_like(ratio))


def tau_window(ratio: Tensor, thr: Tensor, gate_width: float, dtype: torch.dtype) -> Tensor:
    """Triangle window ``w_i = max(0, 1 − |z_i|) / (T σ)`` (= −∂S̃_i/∂t of the surrogate) around the effective
    threshold ``thr`` (``max(τ, 0)``, or the budget's threshold); 0 everywhere when ``σ = 0``."""
    r, t = ratio.to(dtype), thr.to(dtype).reshape(()).clamp(min=0)
    sigma = ratio_scale(r, t)
    z = window_z(r, t, gate_width)
    return torch.where(sigma > 0, (1 - z.abs()).clamp(min=0) / (gate_width * sigma.clamp(min=torch.finfo(dtype).tiny)),
                       torch.zeros_like(r))


def budget_count(M: int, target_fraction: float) -> int:
    """How many of ``M`` tokens a budget ``p`` selects: ``round(p · M)``, at least 1 (for ``M > 0``)."""
    return min(M, max(1, int(math.floor(target_fraction * M + 0.5))))


def budget_threshold(ratio: Tensor, target_fraction: float) -> Tensor:
    """The ``(1 − p)`` quantile of the batch's ratios as a threshold: the ``round(p · M)``-th largest ratio (NaN
    ratios rank lowest), a 0-dim tensor on the device (``torch.kthvalue``: no host sync). ``M > 0``."""
    M = ratio.shape[0]
    r = torch.nan_to_num(ratio.detach(), nan=-math.inf)
    return torch.kthvalue(r, M - budget_count(M, target_fraction) + 1).values


def effective_threshold(ratio: Tensor, tau: Tensor, target_fraction: Optional[float], dtype: torch.dtype) -> Tensor:
    """The forward's threshold ``t`` (0-dim, ``dtype``): ``max(τ, 0)``, and with a budget ``max(τ, 0, t_p)``,
    ``t_p`` the batch quantile of :func:`budget_threshold`. Computed on the device, no host sync."""
    t = tau.detach().to(dtype).reshape(()).clamp(min=0)
    if target_fraction is not None and ratio.shape[0] > 0:
        t = torch.maximum(t, budget_threshold(ratio.to(dtype), target_fraction))
    return t


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
