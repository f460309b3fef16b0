"""Reference filter-atom layers (``docs/atoms.md``): naive, differentiable, fp64-capable test oracles.

Conv2d, one level (§1)::

    ΔW[o,i,p,q] = Σ_j coeff[o,i,j] · atoms[j,p,q]                       atoms (m, kh, kw)
    ΔW[o,i,p,q] = Σ_j coeff[o,i,j] · atoms[i,j,p,q]                     per-channel atoms (C_in/g, m, kh, kw)
    y = conv2d(x, W + ΔW, b, stride, padding, dilation, groups)

Recursive atoms (§2): ``atoms[i,j,p,q] = Σ_l beta[l,j,i] · sub_atoms[l,j,p,q]`` (:func:`compose_atoms_ref`).
Channel-block linear atoms (§3): ``ΔW[bo·kc+p, bi·kc+q] = Σ_j coeff[bo,bi,j] · atoms[j,p,q]``.

Everything is computed in the inputs' dtype with plain ``einsum`` and ``F.conv2d`` (padding strings such as
``"same"`` are passed to PyTorch as they are). Imports nothing from the kernels or the fallbacks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def delta_weight_conv_ref(coeff: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """``ΔW (C_out, C_in/g, kh, kw)`` from ``coeff (C_out, C_in/g, m)`` and shared or per-channel atoms."""
    if atoms.dim() == 3:
        return torch.einsum("oij,jpq->oipq", coeff, atoms)
    return torch.einsum("oij,ijpq->oipq", coeff, atoms)


def compose_atoms_ref(beta: torch.Tensor, sub_atoms: torch.Tensor) -> torch.Tensor:
    """Per-channel atoms ``(C_in/g, m, kh, kw)`` from ``beta (m1, m, C_in/g)`` and ``sub_atoms (m1, m, kh, kw)``."""
    return torch.einsum("lji,ljpq->ijpq", beta, sub_atoms)


def atom_conv2d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], coeff: torch.Tensor,
                    atoms: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``conv2d(x, W + ΔW, b, ...)``; ``padding`` may be an int, a pair, ``"same"`` or ``"valid"``."""
    w = weight + delta_weight_conv_ref(coeff, atoms)
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


def atom_conv2d_two_conv_ref(x, weight, bias, coeff, atoms, stride=1, padding=0, dilation=1, groups=1):
    """The same layer as base conv + a second conv with ``ΔW`` (the seed code's formulation), for cross-checks."""
    dw = delta_weight_conv_ref(coeff, atoms)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups) + F.conv2d(x, dw, None, stride, padding,
                                                                                  dilation, groups)


def delta_weight_linear_ref(coeff: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """``ΔW (N, K)`` from ``coeff (N/kc, K/kc, m)`` and ``atoms (m, kc, kc)``."""
    nb, kb, _ = coeff.shape
    kc = atoms.shape[-1]
    blocks = torch.einsum("abj,jpq->apbq", coeff, atoms)  # (N/kc, kc, K/kc, kc)
    return blocks.reshape(nb * kc, kb * kc)


def atom_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], coeff: torch.Tensor,
                    atoms: torch.Tensor) -> torch.Tensor:
    """``y = x (W + ΔW)ᵀ + b`` with channel-block atoms."""
    return F.linear(x, weight + delta_weight_linear_ref(coeff, atoms), bias)
