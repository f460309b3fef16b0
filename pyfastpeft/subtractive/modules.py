"""``FilterBlock``: the compact linear block that subtractive fine-tuning (SFP) puts in place of a module.

Built by :func:`pyfastpeft.subtractive.fit` (``docs/subtractive.md``): ``y = x W^T + b`` fitted by least
squares to what the replaced module computed, then trained. Three storage forms:

* full: ``weight (N, K)`` (an ``nn.Linear``'s parameters);
* low rank ``k``: ``weight_down (k, K)`` and ``weight_up (N, k)``, ``y = (x W_downᵀ) W_upᵀ + b``;
* diagonal (``K == N``): ``scale (K,)``, ``y = x * scale + b``.

Layouts: ``feature_dim=-1`` maps ``(..., K)`` to ``(..., N)`` (tokens ``(B, T, d)``, any leading dims);
``feature_dim=1`` maps feature maps ``(B, C, H, W)`` (or ``(B, C, L)``) channel-wise, as a 1x1 convolution,
so the surrounding code (residual adds, channels_last or not) is unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FilterBlock(nn.Module):
    """A linear filter block, ``nn.Linear``-like, optionally low rank or diagonal.

    Args:
        in_features: ``K``; out_features: ``N``.
        rank: ``None`` for a full ``(N, K)`` weight, else ``k >= 1`` for the ``W_up W_down`` factorisation.
        diagonal: per-feature scale (needs ``K == N``; excludes ``rank``).
        bias: learnable bias ``(N,)``.
        feature_dim: ``-1`` (features last) or ``1`` (channels of ``(B, C, ...)`` maps).
        source: optional description of what was replaced (the module's class name), for ``extra_repr``.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: Optional[int] = None, diagonal: bool = False,
                 bias: bool = True, feature_dim: int = -1, source: str = "", device=None, dtype=None):
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"out_features must be a positive int, got {out_features!r}")
        if feature_dim not in (-1, 1):
            raise ValueError(f"feature_dim must be -1 (features last) or 1 (channels), got {feature_dim!r}")
        if diagonal and rank is not None:
            raise ValueError("diagonal=True and rank are exclusive: a diagonal block has no rank to choose")
        if diagonal and in_features != out_features:
            raise ValueError(f"diagonal=True needs in_features == out_features, got {in_features} -> {out_features}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be None or a positive int, got {rank!r}")
        fk = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.diagonal, self.feature_dim, self.source = rank, bool(diagonal), feature_dim, source
        if diagonal:
            self.scale = nn.Parameter(torch.ones(in_features, **fk))
        elif rank is not None:
            self.weight_down = nn.Parameter(torch.empty(rank, in_features, **fk))
            self.weight_up = nn.Parameter(torch.empty(out_features, rank, **fk))
            nn.init.kaiming_uniform_(self.weight_down, a=5 ** 0.5)
            nn.init.zeros_(self.weight_up)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
            nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None

    @property
    def kind(self) -> str:
        return "diagonal" if self.diagonal else ("lowrank" if self.rank is not None else "full")

    # ---------------------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load_solution(self, weight: Tensor, bias: Optional[Tensor] = None, *, down: Optional[Tensor] = None,
                      up: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> "FilterBlock":
        """Copy a fitted solution in (cast to the block's dtype/device); ``weight (N, K)`` for full blocks."""
        if self.diagonal:
            self.scale.copy_(scale)
        elif self.rank is not None:
            self.weight_down.copy_(down)
            self.weight_up.copy_(up)
        else:
            self.weight.copy_(weight)
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))
        return self

    def dense_weight(self) -> Tensor:
        """The ``(N, K)`` matrix this block applies (the product for low rank, ``diag(scale)`` for diagonal)."""
        if self.diagonal:
            return torch.diag(self.scale)
        if self.rank is not None:
            return self.weight_up @ self.weight_down
        return self.weight

    # ---------------------------------------------------------------------------------------- forward
    def _linear(self, x: Tensor) -> Tensor:
        if self.diagonal:
            y = x * self.scale
            return y if self.bias is None else y + self.bias
        if self.rank is not None:
            return F.linear(F.linear(x, self.weight_down), self.weight_up, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.feature_dim == -1:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"FilterBlock: x.shape[-1] must be in_features={self.in_features}, "
                                 f"got shape {tuple(x.shape)}")
            return self._linear(x)
        if x.dim() < 2 or x.shape[1] != self.in_features:
            raise ValueError(f"FilterBlock(feature_dim=1): x.shape[1] must be in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        return self._linear(x.movedim(1, -1)).movedim(-1, 1)

    # ---------------------------------------------------------------------------------------- export
    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A plain layer computing the same map: ``nn.Linear`` (features last) or a 1x1 ``nn.Conv2d``
        (channels of 4-D maps; ``feature_dim=1``)."""
        w = self.dense_weight().detach()
        b = None if self.bias is None else self.bias.detach()
        if self.feature_dim == -1:
            lin = nn.Linear(self.in_features, self.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
            lin.weight.copy_(w)
        else:
            lin = nn.Conv2d(self.in_features, self.out_features, 1, bias=b is not None, device=w.device, dtype=w.dtype)
            lin.weight.copy_(w[:, :, None, None])
        if b is not None:
            lin.bias.copy_(b)
        return lin

    def adapter_config(self) -> dict:
        """JSON-serialisable settings that rebuild this block's shape (``FilterBlock(**cfg_without_type)``)."""
        return {"type": "filter_block", "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "diagonal": self.diagonal, "bias": self.bias is not None,
                "feature_dim": self.feature_dim, "source": self.source}

    @classmethod
    def from_config(cls, cfg: dict, *, device=None, dtype=None) -> "FilterBlock":
        kw = {k: v for k, v in cfg.items() if k != "type"}
        return cls(device=device, dtype=dtype, **kw)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"
        if self.rank is not None:
            s += f", rank={self.rank}"
        s += f", bias={self.bias is not None}"
        if self.feature_dim != -1:
            s += f", feature_dim={self.feature_dim}"
        if self.source:
            s += f", replaces={self.source}"
        return s
