"""The LoRA family's drop-in layers.

``LoRALinear``: a drop-in for PEFT's ``lora.Linear`` on an ``nn.Linear`` base layer.

Drop-in for PEFT ``LoraConfig(r, lora_alpha, lora_dropout, use_rslora, bias="none",
fan_in_fan_out=False, use_dora=False, init_lora_weights=True)``: scaling ``alpha / r`` (``alpha / sqrt(r)``
with rsLoRA), dropout on the input of A only, the base layer's own bias, A Kaiming-uniform and B zero at
init. Parameter names ``base_layer``, ``lora_A.weight``, ``lora_B.weight`` mirror PEFT's per-adapter
layout so :meth:`from_peft` / :meth:`to_peft_state` map one to one.

``LoRAConv2d``: PEFT's ``lora.Conv2d`` on an ``nn.Conv2d`` base (any kernel, stride, dilation, groups).

``GatedLoRALinear``: token-selective LoRA (TS-PEFT) on an ``nn.Linear`` base layer.

LoRA as :class:`~pyfastpeft.nn.LoRALinear` (same parameters, PEFT's init), plus a learnable scalar
threshold ``tau`` (a 1-element tensor): a token gets the LoRA update only when ``‖m_i‖ / ‖W x_i‖ ≥ max(tau, 0)``
(``docs/token_selective.md``). Add ``λ · pfp.gate_loss(model)`` to the loss to push ``tau`` up and
select fewer tokens; ``selected_fraction`` reports the last forward's fraction.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn

from pyfastpeft.core.backend import _check_name
from pyfastpeft.core.dtensor import is_shard
from pyfastpeft.lora.lora_linear import lora_linear
from pyfastpeft.lora.gate import smooth_step, window_z
from pyfastpeft.lora.gated_lora_linear import GATE_GRADS, _gated_lora_linear, check_target_fraction


def _check_rank(r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")


def _setup_base(layer: nn.Module, base_layer: nn.Module, r: int, alpha: float, dropout: float,
                use_rslora: bool) -> None:
    """What every LoRA layer (linear or conv) does with its base layer and settings: check the dropout, keep
    the base frozen, set ``r``, ``alpha``, ``dropout``, ``use_rslora`` and ``scaling`` (PEFT's, or rsLoRA's)."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    layer.base_layer = base_layer
    for p in base_layer.parameters():
        p.requires_grad_(False)
    layer.r, layer.alpha, layer.use_rslora, layer.dropout = r, float(alpha), bool(use_rslora), float(dropout)
    layer.scaling = layer.alpha / (math.sqrt(r) if use_rslora else r)


def _init_adapter(lora_a: nn.Module, lora_b: nn.Module) -> None:
    """PEFT's ``init_lora_weights=True``: A Kaiming-uniform, B zero, and PEFT's ``lora_bias`` (a trained bias on
    ``lora_B``, scaled like ``B A x``) zero too."""
    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_b.weight)
    if lora_b.bias is not None:
        nn.init.zeros_(lora_b.bias)


class LoRALinear(nn.Module):
    """``y = base(x) + scale · lora_B(lora_A(dropout(x)))`` with ``base`` frozen, on fused kernels.

    Build with :meth:`from_linear` (or :meth:`from_peft`). ``backend`` pins the backend of this layer
    (``None``: auto). :meth:`merged` returns a plain ``nn.Linear`` with ``W + scale · B A``.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0,
                 use_rslora: bool = False, lora_bias: bool = False, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        _check_rank(r)
        if r > min(base_layer.in_features, base_layer.out_features):
            raise ValueError(f"r={r} must be <= min(in_features, out_features) = "
                             f"{min(base_layer.in_features, base_layer.out_features)}")
        _setup_base(self, base_layer, r, alpha, dropout, use_rslora)
        w = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=bool(lora_bias), device=w.device, dtype=w.dtype)
        _init_adapter(self.lora_A, self.lora_B)
        self.backend = _check_name(backend, "LoRALinear.backend")

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0,
                    use_rslora: bool = False, lora_bias: bool = False) -> "LoRALinear":
        """Wrap ``linear`` (kept, frozen) with a fresh LoRA adapter (``lora_bias``: PEFT's option of that name)."""
        return cls(linear, r, alpha, dropout=dropout, use_rslora=use_rslora, lora_bias=lora_bias)

    @property
    def lora_bias(self) -> bool:
        """PEFT's ``lora_bias``: ``lora_B`` has a trained bias (``y += scale · b_B``)."""
        return self.lora_B.bias is not None

    @classmethod
    def from_peft(cls, peft_layer, adapter_name: Optional[str] = None) -> "LoRALinear":
        """Same base layer and the same adapter weights as a PEFT ``lora.Linear`` (one active adapter)."""
        if isinstance(peft_layer, LoRALinear):
            raise ValueError(f"from_peft: the layer is already a pyfastpeft {type(peft_layer).__name__}, not a PEFT "
                             "layer; nothing to convert")
        if not callable(getattr(peft_layer, "get_base_layer", None)) or not hasattr(peft_layer, "lora_A"):
            raise ValueError(f"from_peft: expected a PEFT LoRA layer (peft.tuners.lora.Linear), got "
                             f"{type(peft_layer).__module__}.{type(peft_layer).__name__}")
        name = adapter_name or peft_layer.active_adapters[0]
        base = peft_layer.get_base_layer()
        variant = getattr(peft_layer, "lora_variant", {}).get(name)
        if variant is not None and not getattr(peft_layer, "use_dora", {}).get(name, False):
            raise ValueError(f"from_peft: the PEFT layer uses the LoRA variant {type(variant).__name__}, which "
                             f"{cls.__name__} cannot represent")
        if getattr(peft_layer, "fan_in_fan_out", False):
            raise ValueError("from_peft: fan_in_fan_out=True (Conv1D bases) is not supported by LoRALinear")
        if getattr(peft_layer, "use_dora", {}).get(name, False):
            raise ValueError("from_peft: DoRA adapters are not LoRA; LoRALinear cannot represent them")
        if getattr(peft_layer, "merged", False):
            raise ValueError("from_peft: the PEFT layer is merged; unmerge it first")
        if not isinstance(base, nn.Linear):
            raise ValueError(f"from_peft: LoRA on {type(base).__name__} is not supported by {cls.__name__} "
                             "(nn.Linear only)")
        r = peft_layer.r[name]
        drop = peft_layer.lora_dropout[name]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        has_bias = peft_layer.lora_B[name].bias is not None
        if has_bias and cls is not LoRALinear:
            raise ValueError(f"from_peft: lora_bias=True (a trained bias on lora_B) is not supported by {cls.__name__}")
        extra = {"lora_bias": True} if has_bias else {}
        layer = cls(base, r, peft_layer.lora_alpha[name], dropout=p, use_rslora=False, **extra)
        dtype = peft_layer.lora_A[name].weight.dtype  # PEFT keeps fp32 adapters on a bf16/fp16 base by default
        if dtype != layer.lora_A.weight.dtype:
            layer.lora_A.to(dtype)
            layer.lora_B.to(dtype)
        layer.scaling = float(peft_layer.scaling[name])  # carries rsLoRA / rank patterns exactly
        layer.use_rslora = not math.isclose(layer.scaling, layer.alpha / r)
        with torch.no_grad():
            layer.lora_A.weight.copy_(peft_layer.lora_A[name].weight)
            layer.lora_B.weight.copy_(peft_layer.lora_B[name].weight)
            if has_bias:
                layer.lora_B.bias.copy_(peft_layer.lora_B[name].bias)
        return layer

    def adapter_config(self) -> dict:
        """JSON-serialisable kwargs of :meth:`from_linear` that rebuild this adapter on the same base layer."""
        cfg = {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "use_rslora": self.use_rslora}
        return {**cfg, "lora_bias": True} if self.lora_B.bias is not None else cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight,
                        self.scaling, dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        bB = self.lora_B.bias
        return y if bB is None else y + (self.scaling * bB).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale · B A`` in fp32 then cast to the base weight's dtype."""
        w = self.base_layer.weight
        return (self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())).to(w.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new plain ``nn.Linear`` equal to this layer in eval mode (the base layer is not modified)."""
        base = self.base_layer
        bB = self.lora_B.bias  # PEFT's lora_bias: the merged layer has a bias even when the base has none
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None or bB is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(base.weight.float() + self.delta_weight().float())
        if out.bias is not None:
            b = base.bias.float() if base.bias is not None else torch.zeros(base.out_features, device=out.bias.device)
            out.bias.copy_(b if bB is None else b + self.scaling * bB.float())
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.base_layer.in_features}, out_features={self.base_layer.out_features}, "
                f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"rslora={self.use_rslora}, backend={self.backend or 'auto'}")


class LoRAConv2d(nn.Module):
    """LoRA on an ``nn.Conv2d``, PEFT's ``lora.Conv2d`` maths: ``y = base(x) + scale · lora_B(lora_A(dropout(x)))``.

    ``lora_A`` is a ``Conv2d(C_in, r)`` with the base's kernel size, stride, padding, dilation and padding mode;
    ``lora_B`` a ``1×1`` ``Conv2d(r, C_out, groups=base.groups)`` (``r`` divisible by ``groups``), with PEFT's
    optional ``lora_bias``. Init as PEFT (A Kaiming-uniform, B zero). Pure PyTorch (cuDNN/oneDNN convs):
    there is no fused kernel for convolutions, so ``backend`` may only be ``None`` or ``"torch"``.
    :meth:`merged` folds the update into one ``nn.Conv2d`` (``groups == 1``; with groups the product of a full
    ``lora_A`` and a grouped ``lora_B`` is not a grouped kernel, and merging raises).
    """

    def __init__(self, base_layer: nn.Conv2d, r: int, alpha: float, *, dropout: float = 0.0,
                 use_rslora: bool = False, lora_bias: bool = False, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"base_layer must be an nn.Conv2d, got {type(base_layer).__name__}")
        _check_rank(r)
        g = base_layer.groups
        if r % g:
            raise ValueError(f"r={r} must be divisible by the conv's groups={g} (lora_B is a grouped 1x1 conv)")
        _setup_base(self, base_layer, r, alpha, dropout, use_rslora)
        w = base_layer.weight
        b = base_layer
        self.lora_A = nn.Conv2d(b.in_channels, r, b.kernel_size, b.stride, b.padding, b.dilation, bias=False,
                                padding_mode=b.padding_mode, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Conv2d(r, b.out_channels, 1, 1, groups=g, bias=bool(lora_bias), device=w.device,
                                dtype=w.dtype)
        _init_adapter(self.lora_A, self.lora_B)
        self.backend = backend

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        if value not in (None, "torch"):
            raise ValueError(f"LoRAConv2d.backend must be None or 'torch' (no fused conv kernel), got {value!r}")
        self._backend = value

    @property
    def lora_bias(self) -> bool:
        return self.lora_B.bias is not None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                  lora_bias: bool = False) -> "LoRAConv2d":
        """Wrap ``conv`` (kept, frozen) with a fresh LoRA adapter."""
        return cls(conv, r, alpha, dropout=dropout, use_rslora=use_rslora, lora_bias=lora_bias)

    @classmethod
    def from_peft(cls, peft_layer, adapter_name: Optional[str] = None) -> "LoRAConv2d":
        """Same base conv and adapter weights (in PEFT's dtype) as a PEFT ``lora.Conv2d`` (one adapter)."""
        if isinstance(peft_layer, (LoRAConv2d, LoRALinear)):
            raise ValueError(f"from_peft: the layer is already a pyfastpeft {type(peft_layer).__name__}, not a PEFT "
                             "layer; nothing to convert")
        if not callable(getattr(peft_layer, "get_base_layer", None)) or not hasattr(peft_layer, "lora_A"):
            raise ValueError(f"from_peft: expected a PEFT LoRA Conv2d layer, got {type(peft_layer).__name__}")
        name = adapter_name or peft_layer.active_adapters[0]
        base = peft_layer.get_base_layer()
        if not isinstance(base, nn.Conv2d):
            raise ValueError(f"from_peft: {cls.__name__} needs an nn.Conv2d base, got {type(base).__name__}")
        if getattr(peft_layer, "use_dora", {}).get(name, False):
            raise ValueError("from_peft: DoRA adapters are not LoRA; LoRAConv2d cannot represent them")
        if getattr(peft_layer, "lora_variant", {}).get(name) is not None:
            raise ValueError("from_peft: the PEFT layer uses a LoRA variant LoRAConv2d cannot represent")
        if getattr(peft_layer, "merged", False):
            raise ValueError("from_peft: the PEFT layer is merged; unmerge it first")
        A, B = peft_layer.lora_A[name], peft_layer.lora_B[name]
        if tuple(A.dilation) != tuple(base.dilation) or A.padding_mode != base.padding_mode:
            raise ValueError(f"from_peft: PEFT's lora_A has dilation {A.dilation} / padding_mode {A.padding_mode!r} "
                             f"but the base conv {base.dilation} / {base.padding_mode!r}; LoRAConv2d follows the base")
        drop = peft_layer.lora_dropout[name]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        layer = cls(base, int(peft_layer.r[name]), peft_layer.lora_alpha[name], dropout=p,
                    lora_bias=B.bias is not None)
        layer.scaling = float(peft_layer.scaling[name])
        layer.use_rslora = not math.isclose(layer.scaling, layer.alpha / layer.r)
        if A.weight.dtype != layer.lora_A.weight.dtype:
            layer.lora_A.to(A.weight.dtype)
            layer.lora_B.to(A.weight.dtype)
        with torch.no_grad():
            layer.lora_A.weight.copy_(A.weight)
            layer.lora_B.weight.copy_(B.weight)
            if B.bias is not None:
                layer.lora_B.bias.copy_(B.bias)
        return layer

    def adapter_config(self) -> dict:
        """JSON-serialisable kwargs of :meth:`from_conv` that rebuild this adapter on the same base conv."""
        cfg = {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "use_rslora": self.use_rslora}
        return {**cfg, "lora_bias": True} if self.lora_bias else cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = nn.functional.dropout(x, self.dropout, self.training) if self.dropout else x
        a = self.lora_A.weight.dtype
        return y + (self.lora_B(self.lora_A(h.to(a))) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale · B ∘ A`` as a kernel ``(C_out, C_in, kh, kw)`` in fp32 (``groups == 1``)."""
        if self.base_layer.groups != 1:
            raise ValueError(f"cannot merge LoRA into a grouped conv (groups={self.base_layer.groups}): the full "
                             "lora_A times the grouped lora_B is not a grouped kernel")
        B = self.lora_B.weight.float()[:, :, 0, 0]
        return self.scaling * torch.einsum("or,rikl->oikl", B, self.lora_A.weight.float())

    @torch.no_grad()
    def merged(self) -> nn.Conv2d:
        """A new plain ``nn.Conv2d`` equal to this layer in eval mode (PEFT's merge; the base is not modified)."""
        b = self.base_layer
        d = self.delta_weight()
        bB = self.lora_B.bias
        out = nn.Conv2d(b.in_channels, b.out_channels, b.kernel_size, b.stride, b.padding, b.dilation, b.groups,
                        bias=b.bias is not None or bB is not None, padding_mode=b.padding_mode,
                        device=b.weight.device, dtype=b.weight.dtype)
        out.weight.copy_(b.weight.float() + d)
        if out.bias is not None:
            bias = b.bias.float() if b.bias is not None else torch.zeros(b.out_channels, device=out.bias.device)
            out.bias.copy_(bias if bB is None else bias + self.scaling * bB.float())
        return out

    def extra_repr(self) -> str:
        b = self.base_layer
        return (f"{b.in_channels}, {b.out_channels}, kernel_size={b.kernel_size}, groups={b.groups}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, rslora={self.use_rslora}")


class GatedLoRALinear(LoRALinear):
    """``y = base(x) + S(x) · scale · B A dropout(x)``, ``S`` the per-token gate with learnable ``tau``.

    ``target_fraction=p`` adds a compute budget: in training the threshold is ``max(tau, 0, t_p)``, ``t_p`` the
    ``(1 − p)`` quantile of the batch's ratios (``round(p · M)`` tokens selected, computed on the device); a
    running average of that threshold (the buffer ``tau_budget``, saved with the adapter) replaces ``t_p`` in
    eval, where a token's selection depends only on the token.
    """

    BUDGET_MOMENTUM = 0.1  # running threshold: t_run ← (1 − μ) t_run + μ t (the first batch sets it)

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, *, tau_init: float = 0.0,
                 gate_width: float = 1.0, gate_grad: str = "threshold", dropout: float = 0.0,
                 use_rslora: bool = False, backend: Optional[str] = None, target_fraction: Optional[float] = None):
        super().__init__(base_layer, r, alpha, dropout=dropout, use_rslora=use_rslora, backend=backend)
        if isinstance(gate_width, bool) or not isinstance(gate_width, numbers.Real) or not gate_width > 0:
            raise ValueError(f"gate_width must be a number > 0, got {gate_width!r}")
        if gate_grad not in GATE_GRADS:
            raise ValueError(f"gate_grad must be one of {GATE_GRADS}, got {gate_grad!r}")
        if isinstance(tau_init, bool) or not isinstance(tau_init, numbers.Real) or not math.isfinite(tau_init):
            raise ValueError(f"tau_init must be a finite number, got {tau_init!r}")
        # shape (1,), not 0-d: FSDP2 shards only parameters with a dimension (0-d files still load)
        self.tau = nn.Parameter(torch.full((1,), float(tau_init), device=base_layer.weight.device))
        self._register_load_state_dict_pre_hook(_tau_from_0d)
        self.set_target_fraction(target_fraction)  # tau_budget nan: no training batch yet (eval uses tau alone)
        self.gate_width, self.gate_grad = float(gate_width), gate_grad
        self._ratio: Optional[torch.Tensor] = None
        self._selected: Optional[torch.Tensor] = None
        self._thr: Optional[torch.Tensor] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, *, tau_init: float = 0.0, gate_width: float = 1.0,
                    gate_grad: str = "threshold", dropout: float = 0.0, use_rslora: bool = False,
                    target_fraction: Optional[float] = None) -> "GatedLoRALinear":
        """Wrap ``linear`` (kept, frozen) with a fresh gated LoRA adapter."""
        return cls(linear, r, alpha, tau_init=tau_init, gate_width=gate_width, gate_grad=gate_grad,
                   dropout=dropout, use_rslora=use_rslora, target_fraction=target_fraction)

    def set_target_fraction(self, target_fraction: Optional[float]) -> "GatedLoRALinear":
        """Switch the budget on (a number in (0, 1]), change it, or switch it off (``None``) on an existing layer,
        e.g. after ``pfp.from_peft(..., gated=True)``. A new budget starts a fresh running threshold."""
        p = check_target_fraction(target_fraction)
        if "tau_budget" in self._buffers:
            del self._buffers["tau_budget"]
        if p is not None:
            self.register_buffer("tau_budget", torch.tensor(math.nan, device=self.tau.device))
        self.target_fraction = p
        return self

    def adapter_config(self) -> dict:
        """JSON-serialisable kwargs of :meth:`from_linear` (``tau_init`` is the current ``tau``)."""
        return {**super().adapter_config(), "tau_init": float(self.tau.detach().reshape(())),
                "gate_width": self.gate_width, "gate_grad": self.gate_grad, "target_fraction": self.target_fraction}

    def _eval_tau(self, tau: torch.Tensor) -> torch.Tensor:
        """``max(tau, t_run)`` in the forward (``tau`` while no running estimate exists), ``tau`` in the backward."""
        run = self.tau_budget.to(tau.dtype)
        return tau + (torch.where(torch.isnan(run), tau, torch.maximum(tau, run)) - tau).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tau = self.tau.reshape(())  # 0-dim or (1,): the op takes a 0-dim view
        budget = self.target_fraction is not None
        if budget and not self.training:
            tau = self._eval_tau(tau)
        y, selected, ratio, thr = _gated_lora_linear(
            x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            tau, gate_width=self.gate_width, gate_grad=self.gate_grad,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
            target_fraction=self.target_fraction if (budget and self.training) else None)
        if budget and self.training and ratio.numel():
            with torch.no_grad():  # on the device: no sync
                run, t = self.tau_budget, thr.to(self.tau_budget.dtype)
                run.copy_(torch.where(torch.isnan(run), t, torch.lerp(run, t, self.BUDGET_MOMENTUM)))
        self._ratio, self._selected, self._thr = ratio, selected, thr  # tensors: no device sync in the forward
        return y

    @property
    def selected_fraction(self) -> float:
        """Fraction of the last forward's tokens that got the LoRA update (nan before any forward)."""
        if self._selected is None or self._selected.numel() == 0:
            return float("nan")
        return float(self._selected.float().mean())

    def gate_loss(self) -> torch.Tensor:
        """Mean smoothed selection ``H((r_i − t)/(T σ))`` of the last forward (``t`` its threshold, ``σ`` the
        ratios' scale); its gradient raises ``tau``."""
        if is_shard(self.tau):
            raise ValueError("gate_loss reads tau outside the layer's forward, where FSDP2 / ZeRO-3 hold only a "
                             "shard of it: gate_loss is not supported on a sharded model yet (train gated LoRA "
                             "with DDP, or use target_fraction without the gate loss; docs/distributed.md)")
        tau = self.tau.reshape(())
        if self._ratio is None or self._ratio.numel() == 0 or self._thr is None:
            return tau * 0.0
        t = tau + (self._thr.to(tau.dtype) - tau).detach()  # the forward's threshold, straight through to tau
        return smooth_step(window_z(self._ratio.to(tau.dtype), t, self.gate_width)).mean()

    def eval_threshold(self) -> float:
        """The threshold an eval forward uses: ``max(tau, 0)``, with a budget ``max(tau, 0, t_run)``."""
        t = max(float(self.tau.detach().reshape(())), 0.0)
        if self.target_fraction is not None and not math.isnan(float(self.tau_budget)):
            t = max(t, float(self.tau_budget))
        return t

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        if self.eval_threshold() > 0:
            raise ValueError(f"cannot merge a gated LoRA layer with tau={float(self.tau.detach().reshape(())):.4g}"
                             + (f" and budget threshold {float(self.tau_budget):.4g}" if self.target_fraction else "")
                             + " > 0: the gate depends on each token, so no single weight reproduces it (merging is "
                             "exact only for a threshold <= 0, where every token is selected)")
        return super().merged()

    def extra_repr(self) -> str:
        tau = "sharded" if is_shard(self.tau) else f"{float(self.tau.detach().reshape(())):.4g}"  # never gathers
        return (super().extra_repr() + f", tau={tau}, gate_width={self.gate_width:g}, gate_grad={self.gate_grad}"
                + (f", target_fraction={self.target_fraction:g}" if self.target_fraction is not None else ""))


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
