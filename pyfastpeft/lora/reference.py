"""References of the LoRA family (the test oracles, never a backend; they import nothing of ours).

LoRA: Reference LoRA linear, exactly PEFT's ``lora.Linear`` forward.

    y = x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ

x (..., K), W (N, K), b (N,) or None, A (r, K), B (N, r). ``dropout_mask`` (same shape as x, already
divided by 1 - p) stands in for PEFT's ``nn.Dropout`` on A's input so that a kernel's random mask can be
replayed here; ``None`` means no dropout.

Token-selective LoRA: Reference token-selective LoRA (TS-PEFT), ``docs/token_selective.md``, naive and differentiable.

    h_i = W x_i,  u_i = A x_lora_i,  m_i = s · B u_i
    r_i = ‖m_i‖ / max(‖h_i‖, ε)                   (fp32 or wider; ε = 1e-6)
    t   = max(τ, 0)   (with target_fraction p: max(τ, 0, t_p), t_p the round(p·M)-th largest r_i)
    S_i = 1 if r_i ≥ t else 0                     (hard gate, forward)
    y_i = h_i + b + S_i · m_i

Gradients come from autograd through a straight-through surrogate ``S_i + (S̃_i − stop(S̃_i))`` with the
scale-free ``S̃_i = H((r_i − t) / (T σ))``, ``σ = max(mean of the finite r, t)`` held constant, ``H`` the
integral of the triangle kernel, so ``∂S_i/∂t = −max(0, 1 − |r_i − t| / (T σ)) / (T σ)``; ``S̃_i = 1``
(no gradient) when ``σ = 0``. With ``gate_grad="threshold"`` ``r_i`` is a constant inside ``S̃``, with
``"full"`` it is differentiated too.

Choice written down here: ``t`` is straight-through, ``∂t/∂τ = 1`` (through the clamp at 0 and the budget's
floor alike). Otherwise τ, which starts at 0, could never receive a gradient from ``gate_loss``.
"""
from __future__ import annotations

import math
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


EPS = 1e-6


def smooth_step(z: torch.Tensor) -> torch.Tensor:
    """H(z): 0 for z ≤ −1, (1+z)²/2 on (−1, 0], 1 − (1−z)²/2 on (0, 1), 1 for z ≥ 1."""
    zc = z.clamp(-1.0, 1.0)
    return torch.where(zc <= 0, 0.5 * (1 + zc) ** 2, 1 - 0.5 * (1 - zc) ** 2)


def tau_eff(tau: torch.Tensor) -> torch.Tensor:
    """max(τ, 0) in the forward, identity in the backward (straight-through clamp)."""
    return tau + (tau.clamp(min=0) - tau).detach()


def _scale(ratio: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """σ = max(mean of the finite ratios, t), a constant of the surrogate."""
    r = ratio.detach().flatten()
    fin = r[torch.isfinite(r)]
    mean = fin.mean() if fin.numel() else torch.zeros((), dtype=r.dtype)
    return torch.maximum(mean, t.detach())


def _soft(ratio: torch.Tensor, t: torch.Tensor, gate_width: float) -> torch.Tensor:
    """S̃_i = H((r_i − t) / (T σ)); S̃_i = 1 (constant) when σ = 0."""
    sigma = _scale(ratio, t)
    if float(sigma) == 0.0:
        return torch.ones_like(ratio) + 0 * t  # every ratio 0 and t = 0: all selected, no gradient
    return smooth_step((ratio - t) / (gate_width * sigma))


def _budget_threshold(ratio: torch.Tensor, target_fraction: float) -> torch.Tensor:
    """The round(p·M)-th largest ratio (at least the largest; NaN ranks lowest), by a full sort."""
    r = ratio.detach().flatten()
    M = r.numel()
    k = min(M, max(1, int(math.floor(target_fraction * M + 0.5))))
    r = torch.where(torch.isnan(r), torch.full_like(r, -math.inf), r)
    return r.sort(descending=True).values[k - 1]


def gated_lora_linear_ref(x, weight, bias, lora_a, lora_b, scale: float, tau: Optional[torch.Tensor], *,
                          gate_width: float = 1.0, gate_grad: str = "threshold",
                          dropout_mask: Optional[torch.Tensor] = None, return_gate: bool = False,
                          target_fraction: Optional[float] = None):
    """Reference forward (see module docstring); returns y, or (y, selected, ratio) with return_gate."""
    h = torch.matmul(x, weight.t())
    xl = x if dropout_mask is None else x * dropout_mask
    m = scale * torch.matmul(torch.matmul(xl, lora_a.t()), lora_b.t())
    base = h if bias is None else h + bias
    if tau is None:
        y = base + m
        sel = torch.ones(y.shape[:-1], dtype=torch.bool, device=y.device)
        ratio = torch.zeros(y.shape[:-1], dtype=torch.float32, device=y.device)
        return (y, sel, ratio) if return_gate else y
    wide = torch.promote_types(x.dtype, torch.float32)  # norms, ratio and comparison in fp32 or wider
    ratio = m.to(wide).norm(dim=-1) / h.to(wide).norm(dim=-1).clamp(min=EPS)
    tw = tau.to(wide).reshape(())
    floor = torch.zeros((), dtype=wide)
    if target_fraction is not None and ratio.numel():
        floor = torch.maximum(floor, _budget_threshold(ratio, target_fraction))
    t = tw + (torch.maximum(tw, floor) - tw).detach()  # max(τ, 0[, t_p]) forward, straight-through backward
    hard = (ratio >= t.detach()).to(wide)
    r_in = ratio if gate_grad == "full" else ratio.detach()
    soft = _soft(r_in, t, gate_width)
    gate = hard + (soft - soft.detach())
    y = base + gate.unsqueeze(-1).to(m.dtype) * m
    return (y, hard.bool(), ratio.detach()) if return_gate else y


def gate_loss_ref(ratio: torch.Tensor, tau: torch.Tensor, gate_width: float) -> torch.Tensor:
    """Mean over tokens of the smoothed selection H((r_i − τ_eff)/(T σ)) (differentiable in τ)."""
    return _soft(ratio, tau_eff(tau.reshape(())), gate_width).mean()
