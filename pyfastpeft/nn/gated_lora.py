"""``GatedLoRALinear``: token-selective LoRA (TS-PEFT) on an ``nn.Linear`` base layer.

LoRA as :class:`~pyfastpeft.nn.LoRALinear` (same parameters, PEFT's init), plus a learnable scalar
threshold ``tau``: a token gets the LoRA update only when ``‖m_i‖ / ‖W x_i‖ ≥ max(tau, 0)``
(``specs/token_selective.md``). Add ``λ · pfp.gate_loss(model)`` to the loss to push ``tau`` up and
select fewer tokens; ``selected_fraction`` reports the last forward's fraction.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pyfastpeft.nn.lora import LoRALinear
from pyfastpeft.ops.gated_lora_linear import GATE_GRADS, gated_lora_linear
from pyfastpeft.reference.gated_lora_linear import smooth_step, tau_eff


class GatedLoRALinear(LoRALinear):
    """``y = base(x) + S(x) · scale · B A dropout(x)``, ``S`` the per-token gate with learnable ``tau``."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, *, tau_init: float = 0.0,
                 gate_width: float = 0.05, gate_grad: str = "threshold", dropout: float = 0.0,
                 use_rslora: bool = False, backend: Optional[str] = None):
        super().__init__(base_layer, r, alpha, dropout=dropout, use_rslora=use_rslora, backend=backend)
        if not gate_width > 0:
            raise ValueError(f"gate_width must be > 0, got {gate_width!r}")
        if gate_grad not in GATE_GRADS:
            raise ValueError(f"gate_grad must be one of {GATE_GRADS}, got {gate_grad!r}")
        self.tau = nn.Parameter(torch.tensor(float(tau_init), device=base_layer.weight.device))
        self.gate_width, self.gate_grad = float(gate_width), gate_grad
        self._ratio: Optional[torch.Tensor] = None
        self._selected: Optional[torch.Tensor] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, *, tau_init: float = 0.0, gate_width: float = 0.05,
                    gate_grad: str = "threshold", dropout: float = 0.0, use_rslora: bool = False) -> "GatedLoRALinear":
        """Wrap ``linear`` (kept, frozen) with a fresh gated LoRA adapter."""
        return cls(linear, r, alpha, tau_init=tau_init, gate_width=gate_width, gate_grad=gate_grad,
                   dropout=dropout, use_rslora=use_rslora)

    def adapter_config(self) -> dict:
        """JSON-serialisable kwargs of :meth:`from_linear` (``tau_init`` is the current ``tau``)."""
        return {**super().adapter_config(), "tau_init": float(self.tau.detach()), "gate_width": self.gate_width,
                "gate_grad": self.gate_grad}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, selected, ratio = gated_lora_linear(
            x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            self.tau, gate_width=self.gate_width, gate_grad=self.gate_grad,
            dropout_p=self.dropout if self.training else 0.0, return_gate=True, backend=self.backend)
        self._ratio, self._selected = ratio, selected  # kept as tensors: no device sync in the forward
        return y

    @property
    def selected_fraction(self) -> float:
        """Fraction of the last forward's tokens that got the LoRA update (nan before any forward)."""
        if self._selected is None or self._selected.numel() == 0:
            return float("nan")
        return float(self._selected.float().mean())

    def gate_loss(self) -> torch.Tensor:
        """Mean smoothed selection ``H((r_i − τ)/T)`` of the last forward; its gradient raises ``tau``."""
        if self._ratio is None or self._ratio.numel() == 0:
            return self.tau * 0.0
        return smooth_step((self._ratio.to(self.tau.dtype) - tau_eff(self.tau)) / self.gate_width).mean()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        if float(self.tau) > 0:
            raise ValueError(f"cannot merge a gated LoRA layer with tau={float(self.tau):.4g} > 0: the gate depends "
                             "on each token, so no single weight reproduces it (merging is exact only for tau <= 0, "
                             "where every token is selected)")
        return super().merged()

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", tau={float(self.tau.detach()):.4g}, gate_width={self.gate_width:g}, "
                f"gate_grad={self.gate_grad}")
