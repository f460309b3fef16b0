"""The LoRA family's drop-in layers.

``LoRALinear``: a drop-in for PEFT's ``lora.Linear`` on an ``nn.Linear`` base layer.

Drop-in for PEFT ``LoraConfig(r, lora_alpha, lora_dropout, use_rslora, bias="none",
fan_in_fan_out=False, use_dora=False, init_lora_weights=True)``: scaling ``alpha / r`` (``alpha / sqrt(r)``
with rsLoRA), dropout on the input of A only, the base layer's own bias, A Kaiming-uniform and B zero at
init. Parameter names ``base_layer``, ``lora_A.weight``, ``lora_B.weight`` mirror PEFT's per-adapter
layout so :meth:`from_peft` / :meth:`to_peft_state` map one to one.

``GatedLoRALinear``: token-selective LoRA (TS-PEFT) on an ``nn.Linear`` base layer.

LoRA as :class:`~pyfastpeft.nn.LoRALinear` (same parameters, PEFT's init), plus a learnable scalar
threshold ``tau`` (a 1-element tensor): a token gets the LoRA update only when ``‖m_i‖ / ‖W x_i‖ ≥ max(tau, 0)``
(``docs/token_selective.md``). Add ``λ · pfp.gate_loss(model)`` to the loss to push ``tau`` up and
select fewer tokens; ``selected_fraction`` reports the last forward's fraction.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from pyfastpeft.core.backend import _check_name
from pyfastpeft.core.dtensor import is_shard
from pyfastpeft.lora.lora_linear import lora_linear
from pyfastpeft.lora.gate import smooth_step, tau_eff
from pyfastpeft.lora.gated_lora_linear import GATE_GRADS, gated_lora_linear


class LoRALinear(nn.Module):
    """``y = base(x) + scale · lora_B(lora_A(dropout(x)))`` with ``base`` frozen, on fused kernels.

    Build with :meth:`from_linear` (or :meth:`from_peft`). ``backend`` pins the backend of this layer
    (``None``: auto). :meth:`merged` returns a plain ``nn.Linear`` with ``W + scale · B A``.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0,
                 use_rslora: bool = False, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if r > min(base_layer.in_features, base_layer.out_features):
            raise ValueError(f"r={r} must be <= min(in_features, out_features) = "
                             f"{min(base_layer.in_features, base_layer.out_features)}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.use_rslora, self.dropout = r, float(alpha), bool(use_rslora), float(dropout)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        w = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.backend = _check_name(backend, "LoRALinear.backend")

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wrap ``linear`` (kept, frozen) with a fresh LoRA adapter."""
        return cls(linear, r, alpha, dropout=dropout, use_rslora=use_rslora)

    @classmethod
    def from_peft(cls, peft_layer, adapter_name: Optional[str] = None) -> "LoRALinear":
        """Same base layer and the same adapter weights as a PEFT ``lora.Linear`` (one active adapter)."""
        name = adapter_name or peft_layer.active_adapters[0]
        base = peft_layer.get_base_layer()
        if getattr(peft_layer, "fan_in_fan_out", False):
            raise ValueError("from_peft: fan_in_fan_out=True (Conv1D bases) is not supported by LoRALinear")
        if getattr(peft_layer, "use_dora", {}).get(name, False):
            raise ValueError("from_peft: DoRA adapters are not LoRA; LoRALinear cannot represent them")
        if getattr(peft_layer, "merged", False):
            raise ValueError("from_peft: the PEFT layer is merged; unmerge it first")
        r = peft_layer.r[name]
        drop = peft_layer.lora_dropout[name]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        layer = cls(base, r, peft_layer.lora_alpha[name], dropout=p, use_rslora=False)
        layer.scaling = float(peft_layer.scaling[name])  # carries rsLoRA / rank patterns exactly
        layer.use_rslora = not math.isclose(layer.scaling, layer.alpha / r)
        with torch.no_grad():
            layer.lora_A.weight.copy_(peft_layer.lora_A[name].weight)
            layer.lora_B.weight.copy_(peft_layer.lora_B[name].weight)
        return layer

    def adapter_config(self) -> dict:
        """JSON-serialisable kwargs of :meth:`from_linear` that rebuild this adapter on the same base layer."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "use_rslora": self.use_rslora}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight,
                           self.scaling, dropout_p=self.dropout if self.training else 0.0, backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        """``scale · B A`` in fp32 then cast to the base weight's dtype."""
        w = self.base_layer.weight
        return (self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())).to(w.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new plain ``nn.Linear`` equal to this layer in eval mode (the base layer is not modified)."""
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(base.weight.float() + self.delta_weight().float())
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.base_layer.in_features}, out_features={self.base_layer.out_features}, "
                f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"rslora={self.use_rslora}, backend={self.backend or 'auto'}")


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
        # shape (1,), not 0-d: FSDP2 shards only parameters with a dimension (0-d files still load)
        self.tau = nn.Parameter(torch.full((1,), float(tau_init), device=base_layer.weight.device))
        self._register_load_state_dict_pre_hook(_tau_from_0d)
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
        if is_shard(self.tau):
            raise ValueError("gate_loss reads tau outside the layer's forward, where FSDP2 / ZeRO-3 hold only a "
                             "shard of it: gate_loss is not supported on a sharded model yet (train gated LoRA "
                             "with DDP, or without the gate loss; docs/distributed.md)")
        if self._ratio is None or self._ratio.numel() == 0:
            return self.tau.sum() * 0.0
        return smooth_step((self._ratio.to(self.tau.dtype) - tau_eff(self.tau)) / self.gate_width).mean()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        if float(self.tau) > 0:
            raise ValueError(f"cannot merge a gated LoRA layer with tau={float(self.tau):.4g} > 0: the gate depends "
                             "on each token, so no single weight reproduces it (merging is exact only for tau <= 0, "
                             "where every token is selected)")
        return super().merged()

    def extra_repr(self) -> str:
        tau = "sharded" if is_shard(self.tau) else f"{float(self.tau.detach()):.4g}"  # printing never gathers
        return (super().extra_repr() + f", tau={tau}, gate_width={self.gate_width:g}, "
                f"gate_grad={self.gate_grad}")


def _tau_from_0d(state_dict, prefix, *_):
    """``load_state_dict`` of a state saved when ``tau`` was 0-dim: read it as shape ``(1,)``."""
    t = state_dict.get(prefix + "tau")
    if isinstance(t, torch.Tensor) and t.dim() == 0:
        state_dict[prefix + "tau"] = t.reshape(1)


def gate_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``gate_loss()`` over every gated layer of ``model`` (add ``λ ·`` this to the training loss)."""
    losses = [m.gate_loss() for m in model.modules() if isinstance(m, GatedLoRALinear)]
    if not losses:
        raise ValueError("gate_loss: the model has no GatedLoRALinear layer")
    return torch.stack(losses).sum()
