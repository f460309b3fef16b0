"""References of the LoRA family (the test oracles, never a backend; they import nothing of ours).

LoRA: Reference LoRA linear, exactly PEFT's ``lora.Linear`` forward.

    y = x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ

x (..., K), W (N, K), b (N,) or None, A (r, K), B (N, r). ``dropout_mask`` (same shape as x, already
divided by 1 - p) stands in for PEFT's ``nn.Dropout`` on A's input so that a kernel's random mask can be
replayed here; ``None`` means no dropout.

Token-selective LoRA: Reference token-selective LoRA (TS-PEFT), ``docs/token_selective.md``, naive and differentiable.

    h_i = W x_i,  u_i = A x_lora_i,  m_i = s · B u_i
    r_i = ‖m_i‖ / max(‖h_i‖, ε)                   (fp32 or wider; ε = 1e-6)
    S_i = 1 if r_i ≥ max(τ, 0) else 0             (hard gate, forward)
    y_i = h_i + b + S_i · m_i

Gradients come from autograd through a straight-through surrogate ``S_i + (S̃_i − stop(S̃_i))`` with
``S̃_i = H((r_i − τ_eff) / T)``, ``H`` the integral of the triangle kernel, so ``∂S_i/∂τ =
−max(0, 1 − |r_i − τ_eff| / T) / T`` exactly as the spec; with ``gate_grad="threshold"`` ``r_i`` is a
constant inside ``S̃``, with ``"full"`` it is differentiated too.

Choice written down here (the spec clamps τ at 0 in the forward and leaves the parameter free): the clamp
is straight-through, ``τ_eff = max(τ, 0)`` in both the comparison and the window and ``∂τ_eff/∂τ = 1``.
Otherwise τ, which starts at 0, could never receive a gradient from ``gate_loss``.
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


EPS = 1e-6


def smooth_step(z: torch.Tensor) -> torch.Tensor:
    """H(z): 0 for z ≤ −1, (1+z)²/2 on (−1, 0], 1 − (1−z)²/2 on (0, 1), 1 for z ≥ 1."""
    zc = z.clamp(-1.0, 1.0)
    return torch.where(zc <= 0, 0.5 * (1 + zc) ** 2, 1 - 0.5 * (1 - zc) ** 2)


def tau_eff(tau: torch.Tensor) -> torch.Tensor:
    """max(τ, 0) in the forward, identity in the backward (straight-through clamp)."""
    return tau + (tau.clamp(min=0) - tau).detach()


def gated_lora_linear_ref(x, weight, bias, lora_a, lora_b, scale: float, tau: Optional[torch.Tensor], *,
                          gate_width: float = 0.05, gate_grad: str = "threshold",
                          dropout_mask: Optional[torch.Tensor] = None, return_gate: bool = False):
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
    t = tau_eff(tau.to(wide).reshape(()))  # shape () or (1,)
    hard = (ratio >= t.detach()).to(wide)
    r_in = ratio if gate_grad == "full" else ratio.detach()
    soft = smooth_step((r_in - t) / gate_width)
    gate = hard + (soft - soft.detach())
    y = base + gate.unsqueeze(-1).to(m.dtype) * m
    return (y, hard.bool(), ratio.detach()) if return_gate else y


def gate_loss_ref(ratio: torch.Tensor, tau: torch.Tensor, gate_width: float) -> torch.Tensor:
    """Mean over tokens of the smoothed selection H((r_i − τ_eff)/T) (differentiable in τ)."""
    return smooth_step((ratio - tau_eff(tau)) / gate_width).mean()
