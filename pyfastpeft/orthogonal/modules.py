"""``OFTLinear`` and ``PSOFTLinear``: drop-ins for PEFT 0.21's ``oft.Linear`` and ``psoft.Linear``.

Maths: ``docs/orthogonal.md``. Both keep their base layer (frozen) as ``base_layer`` and train only the
packed skew generator (and PSOFT's optional vectors), in fp32 (fp64 for an fp64 base), as PEFT does by
default. ``from_peft`` copies a PEFT layer's parameters (and, for PSOFT, its frozen SVD factors) so the
result gives PEFT's outputs and gradients.

PEFT options that are declined with a ``ValueError`` naming them (never silently ignored):
* OFT ``module_dropout > 0`` (multiplicative block dropout): not implemented in the fused op.
* PSOFT ``psoft_dropout > 0``: same; ``psoft_orth=False`` (a free, non-orthogonal ``r × r`` matrix): not an
  orthogonal adapter, out of this family's scope.
* ``fan_in_fan_out=True`` (GPT-2 ``Conv1D`` bases): only ``nn.Linear`` bases are supported.
* merged PEFT layers (unmerge first) and several adapters in one layer (pick one with ``adapter_name``).
OFT on ``nn.Conv2d`` converts to a plain, frozen ``nn.Conv2d`` with the adapter merged (PEFT's merge maths:
``W`` rotated along ``C_in·kh·kw``). PEFT's *unmerged* conv forward (unfold, rotate, fold) does not equal
its own merged conv for ``k > 1`` (``docs/orthogonal.md`` §3); our conversion equals PEFT's merged model.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from pyfastpeft.core.backend import _check_name
from pyfastpeft.core.checks import autocast_on, check_scalar
from pyfastpeft.core.amp import autocast_off
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.orthogonal.cayley import cayley_work, validate_cayley_args
from pyfastpeft.orthogonal.oft_linear import oft_linear
from pyfastpeft.orthogonal.psoft_linear import psoft_linear, psoft_rotation


def _freeze(layer: nn.Module) -> None:
    for p in layer.parameters():
        p.requires_grad_(False)


def _peft_adapter(peft_layer, adapter_name: Optional[str], table: str) -> str:
    if isinstance(peft_layer, (OFTLinear, PSOFTLinear)):
        raise ValueError(f"from_peft: the layer is already a pyfastpeft {type(peft_layer).__name__}, not a PEFT "
                         "layer; nothing to convert")
    if not callable(getattr(peft_layer, "get_base_layer", None)) or not hasattr(peft_layer, table):
        raise ValueError(f"from_peft: expected a PEFT layer with {table}, got "
                         f"{type(peft_layer).__module__}.{type(peft_layer).__name__}")
    if getattr(peft_layer, "merged", False):
        raise ValueError("from_peft: the PEFT layer is merged; unmerge it first")
    if getattr(peft_layer, "fan_in_fan_out", False):
        raise ValueError("from_peft: fan_in_fan_out=True (Conv1D bases) is not supported; only nn.Linear bases")
    names = list(getattr(peft_layer, table).keys())
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"from_peft: adapter_name {adapter_name!r} not in this layer's adapters {names}")
        return adapter_name
    active = [a for a in peft_layer.active_adapters if a in names]
    if len(active) != 1:
        raise ValueError(f"from_peft: the layer has {len(active)} active adapters {active}; pass adapter_name=")
    return active[0]


def _plain_linear(base: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device,
                    dtype=base.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if base.bias is not None:
            out.bias.copy_(base.bias)
    return out


# ====================================================================================================== OFT
class OFTLinear(nn.Module):
    """``y = base(x R_bd)`` with ``R_bd = blockdiag(cayley(Q_1) … cayley(Q_G))``; ``base`` frozen.

    Drop-in for PEFT ``OFTConfig(oft_block_size=b, r=0, use_cayley_neumann, num_cayley_neumann_terms, coft,
    eps, block_share, module_dropout=0.0, fan_in_fan_out=False, init_weights=True)`` on an ``nn.Linear``:
    ``oft_v`` is PEFT's ``oft_R.weight`` (``(G, b(b−1)/2)``, or ``(1, …)`` with ``block_share``), zero at init
    (``R = I``). PEFT's exact path is ``method="exact", convention="minus"``; its Neumann path is
    ``method="neumann"`` (the ``plus`` series). With ``coft=True`` each forward first projects every block's
    ``Q`` into the Frobenius ball of radius ``eps / sqrt(#stored blocks)``, in place and without gradient,
    exactly as PEFT.
    """

    def __init__(self, base_layer: nn.Linear, block_size: int, *, method: str = "neumann",
                 convention: str = "minus", terms: int = 5, coft: bool = False, eps: float = 6e-5,
                 block_share: bool = False, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        K = base_layer.in_features
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if K % block_size:
            raise ValueError(f"block_size must divide in_features={K}, got block_size={block_size}")
        if not check_scalar("eps", eps) > 0:  # a number or a 0-d tensor; NaN/inf/bool raise, naming eps
            raise ValueError(f"eps (the COFT radius) must be a positive number, got {eps!r}")
        n = block_size * (block_size - 1) // 2
        G = K // block_size
        wd = acc_dtype(base_layer.weight.dtype)
        v = torch.zeros(1 if block_share else G, n, device=base_layer.weight.device, dtype=wd)
        validate_cayley_args(v, block_size, method, convention, terms, None, name="oft_v")
        self.base_layer = base_layer
        _freeze(base_layer)
        self.oft_v = nn.Parameter(v)
        self.block_size, self.method, self.convention, self.terms = block_size, method, convention, int(terms)
        self.coft, self.eps, self.block_share = bool(coft), float(eps), bool(block_share)
        self.backend = _check_name(backend, "OFTLinear.backend")

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int, *, method: str = "neumann", convention: str = "minus",
                    terms: int = 5, coft: bool = False, eps: float = 6e-5, block_share: bool = False) -> "OFTLinear":
        """Wrap ``linear`` (kept, frozen) with a fresh OFT adapter (``R = I``)."""
        return cls(linear, block_size, method=method, convention=convention, terms=terms, coft=coft, eps=eps,
                   block_share=block_share)

    @classmethod
    def from_peft(cls, peft_layer, adapter_name: Optional[str] = None) -> Union["OFTLinear", nn.Conv2d]:
        """Ours from a PEFT 0.21 ``oft.Linear`` (same parameters, same outputs and gradients), or, for a PEFT
        ``oft.Conv2d``, a plain frozen ``nn.Conv2d`` with the adapter merged (PEFT's merged maths)."""
        name = _peft_adapter(peft_layer, adapter_name, "oft_R")
        mod = peft_layer.oft_R[name]
        drop = peft_layer.oft_dropout[name] if name in peft_layer.oft_dropout else None
        if drop is not None and getattr(drop, "p", 0.0) > 0:
            raise ValueError(f"from_peft: OFT module_dropout={drop.p} (multiplicative block dropout) is not "
                             "supported; convert a model trained with module_dropout=0 or in eval only after "
                             "merging")
        method = "neumann" if mod.use_cayley_neumann else "exact"
        base = peft_layer.get_base_layer()
        if isinstance(base, nn.Conv2d):
            return _merge_peft_oft_conv(peft_layer, mod, method)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"from_peft: OFT on {type(base).__name__} is not supported (nn.Linear, nn.Conv2d)")
        layer = cls(base, mod.block_size, method=method, convention="minus", terms=int(mod.num_cayley_neumann_terms),
                    coft=mod.coft, eps=float(mod.eps), block_share=mod.block_share)
        with torch.no_grad():
            layer.oft_v.data = mod.weight.detach().clone().to(layer.oft_v.device)
        return layer

    def adapter_config(self) -> dict:
        """JSON-serialisable kwargs of :meth:`from_linear` that rebuild this adapter on the same base layer."""
        return {"block_size": self.block_size, "method": self.method, "convention": self.convention,
                "terms": self.terms, "coft": self.coft, "eps": self.eps, "block_share": self.block_share}

    @torch.no_grad()
    def project_coft_(self) -> None:
        """PEFT's COFT projection, in place: ``Q_g ← ε' Q_g / ‖Q_g‖_F`` where ``‖Q_g‖_F > ε' = ε / √(#blocks)``."""
        v = self.oft_v
        eps = self.eps / math.sqrt(v.shape[0])
        # ‖Q‖_F over the full skew matrix counts each packed value twice
        norm = torch.sqrt(2.0 * (v.float() ** 2).sum(dim=1, keepdim=True))
        v.copy_(torch.where(norm <= eps, v, (eps * v / norm).to(v.dtype)))

    def rotation(self) -> torch.Tensor:
        """``R (G or 1, b, b)`` in the work dtype (differentiable)."""
        return cayley_work(self.oft_v, self.block_size, self.method, self.convention, self.terms, None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the base's dtype out of autocast (another dtype is cast to it and the result cast back);
        under ``torch.autocast`` the layer computes in the autocast dtype and returns it, as ``nn.Linear``."""
        if self.coft:
            self.project_coft_()
        base = self.base_layer
        w, b = base.weight, base.bias
        ac = autocast_on(x.device.type)
        y = oft_linear(x if ac else x.to(w.dtype), w, b, self.oft_v, self.block_size, method=self.method,
                       convention=self.convention, terms=self.terms, backend=self.backend)
        return y if ac else y.to(x.dtype)

    def _block_diag(self, R: torch.Tensor) -> torch.Tensor:
        G = self.base_layer.in_features // self.block_size
        return torch.block_diag(*R.expand(G, -1, -1).unbind(0))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new plain ``nn.Linear`` with ``W R_bdᵀ`` (the base layer is not modified)."""
        if self.coft:
            self.project_coft_()
        w = self.base_layer.weight
        with autocast_off(w.device.type):  # the merge is an fp32 product even when called under autocast
            Rbd = self._block_diag(self.rotation())
            return _plain_linear(self.base_layer, (w.to(Rbd.dtype) @ Rbd.t()).to(w.dtype))

    @torch.no_grad()
    def unmerged(self, merged_linear: nn.Linear) -> nn.Linear:
        """Undo :meth:`merged` on ``merged_linear``: ``W = W' R_bdᵀ⁻¹`` (``W' R_bd`` for exact Cayley, whose
        ``R`` is orthogonal; an fp32 solve for Neumann, whose ``R`` is only approximately orthogonal)."""
        w = merged_linear.weight
        with autocast_off(w.device.type):
            Rbd = self._block_diag(self.rotation())
            if self.method == "exact":
                out = w.to(Rbd.dtype) @ Rbd
            else:
                out = torch.linalg.solve(Rbd.t(), w.to(Rbd.dtype), left=False)
            return _plain_linear(merged_linear, out.to(w.dtype))

    def extra_repr(self) -> str:
        G = self.base_layer.in_features // self.block_size
        return (f"in_features={self.base_layer.in_features}, out_features={self.base_layer.out_features}, "
                f"block_size={self.block_size}, blocks={G}, method={self.method}"
                + (f", convention={self.convention}" if self.method == "exact" else f", terms={self.terms}")
                + f", coft={self.coft}" + (f", eps={self.eps:g}" if self.coft else "")
                + f", block_share={self.block_share}, backend={self.backend or 'auto'}")


@torch.no_grad()
def _merge_peft_oft_conv(peft_layer, mod, method: str) -> nn.Conv2d:
    base = peft_layer.get_base_layer()
    if base.groups != 1:
        raise ValueError(f"from_peft: OFT on a grouped Conv2d (groups={base.groups}) is not supported")
    if mod.coft:
        mod.weight.copy_(mod._project_batch(mod.weight, eps=mod.eps))  # what PEFT's merge does first
    R = cayley_work(mod.weight.detach(), mod.block_size, method, "minus", int(mod.num_cayley_neumann_terms), None,
                    None)
    w = base.weight
    flat = w.reshape(w.shape[0], -1)
    G = flat.shape[1] // mod.block_size
    Rbd = torch.block_diag(*R.expand(G, -1, -1).unbind(0))
    with autocast_off(w.device.type):  # the merge is an fp32 product even when called under autocast
        merged = (flat.to(Rbd.dtype) @ Rbd.t()).reshape(w.shape).to(w.dtype)
    out = nn.Conv2d(base.in_channels, base.out_channels, base.kernel_size, stride=base.stride, padding=base.padding,
                    dilation=base.dilation, groups=base.groups, bias=base.bias is not None,
                    padding_mode=base.padding_mode, device=w.device, dtype=w.dtype)
    out.weight.copy_(merged)
    if base.bias is not None:
        out.bias.copy_(base.bias)
    _freeze(out)
    return out


# ====================================================================================================== PSOFT
def _svd_factors(weight: torch.Tensor, r: int, svd: str, niter: int, seed: int):
    """``(U_r (N, r), S_r (r,), Vh_r (r, K))`` of ``weight`` in fp32, as PEFT computes them (same calls,
    same seeding for ``lowrank``), so a PEFT checkpoint's frozen factors are reproduced."""
    W = weight.detach().to(torch.float32)
    if svd == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r, :]
    fork = {"devices": []} if W.device.type == "cpu" else {"devices": [W.device], "device_type": W.device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
    return U[:, :r], S[:r], V[:, :r].t()


def _vector_flags(vectors) -> tuple[bool, bool]:
    if isinstance(vectors, bool):
        return vectors, vectors
    if isinstance(vectors, (list, tuple)) and len(vectors) == 2 and all(isinstance(f, bool) for f in vectors):
        return bool(vectors[0]), bool(vectors[1])
    raise ValueError(f"vectors must be a bool or a pair (vector_a, vector_b) of bools, got {vectors!r}")


class PSOFTLinear(nn.Module):
    """``y = base(x) + s · (u R'ᵀ − u) Bᵀ``, ``u = x Aᵀ``, ``R' = diag(vector_b) cayley_plus(Q) diag(vector_a)``.

    Drop-in for PEFT ``PsoftConfig(r, psoft_alpha, ab_svd_init, psoft_svd, psoft_svd_lowrank_niter, random_seed,
    psoft_mag_a, psoft_mag_b, use_cayley_neumann, num_cayley_neumann_terms, cayley_neumann_eps, psoft_orth=True,
    psoft_dropout=0.0, fan_in_fan_out=False, init_weights=True)`` on an ``nn.Linear``. ``A (r, K)`` and
    ``B (N, r)`` are frozen fp32 buffers from the SVD of ``W`` (persisted, unlike PEFT, so a saved adapter
    reloads bit for bit; PEFT checkpoints that lack them are rebuilt by the same deterministic SVD).
    ``psoft_v`` is PEFT's ``psoft_R.weight``; ``vector_a``/``vector_b`` its ``vector_a``/``vector_b``.
    ``vectors``: ``True``/``False`` or a pair ``(vector_a, vector_b)``. Every default is PEFT's
    (``r=32``, ``alpha=32``, exact Cayley, 5 Neumann terms, both vectors, full SVD, ``psoft_init``, seed 0).
    """

    def __init__(self, base_layer: nn.Linear, r: int = 32, alpha: float = 32.0, *, method: str = "exact",
                 terms: int = 5,
                 eps: Optional[float] = None, vectors=True, svd: str = "full", init: str = "psoft_init",
                 seed: int = 0, niter: int = 10, backend: Optional[str] = None, _factors=None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        K, N = base_layer.in_features, base_layer.out_features
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(K, N):
            raise ValueError(f"r must be an int in 1..min(in_features, out_features) = {min(K, N)}, got {r!r}")
        if svd not in ("full", "lowrank"):
            raise ValueError(f"svd must be 'full' or 'lowrank', got {svd!r}")
        if init not in ("psoft_init", "pissa_init"):
            raise ValueError(f"init must be 'psoft_init' or 'pissa_init', got {init!r}")
        if check_scalar("alpha", alpha) == 0:  # a number or a 0-d tensor; NaN/inf/bool raise, naming alpha
            raise ValueError(f"alpha must be a finite non-zero number, got {alpha!r}")
        mag_a, mag_b = _vector_flags(vectors)
        wd = acc_dtype(base_layer.weight.dtype)
        dev = base_layer.weight.device
        v = torch.zeros(r * (r - 1) // 2, device=dev, dtype=wd)
        validate_cayley_args(v.reshape(1, -1), r, method, "plus", terms, eps, name="psoft_v")
        self.base_layer = base_layer
        _freeze(base_layer)
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.method, self.terms, self.eps = method, int(terms), None if eps is None else float(eps)
        self.svd, self.init, self.seed, self.niter = svd, init, int(seed), int(niter)
        self.mag_a, self.mag_b = mag_a, mag_b
        if _factors is None:
            U, S, Vh = _svd_factors(base_layer.weight, r, svd, self.niter, self.seed)
            Ss = S / self.scaling
            if init == "psoft_init":
                A, B = Vh, U @ torch.diag(Ss)
            else:
                s = torch.sqrt(Ss)
                A, B = torch.diag(s) @ Vh, U @ torch.diag(s)
        else:
            A, B = _factors
        self.register_buffer("psoft_a", A.detach().to(device=dev, dtype=torch.float32).contiguous())
        self.register_buffer("psoft_b", B.detach().to(device=dev, dtype=torch.float32).contiguous())
        self.psoft_v = nn.Parameter(v)
        self.vector_a = nn.Parameter(torch.ones(r, device=dev, dtype=wd)) if mag_a else None
        self.vector_b = nn.Parameter(torch.ones(r, device=dev, dtype=wd)) if mag_b else None
        self.backend = _check_name(backend, "PSOFTLinear.backend")

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 32, alpha: float = 32.0, *, method: str = "exact",
                    terms: int = 5,
                    eps: Optional[float] = None, vectors=True, svd: str = "full", init: str = "psoft_init",
                    seed: int = 0, niter: int = 10) -> "PSOFTLinear":
        """Wrap ``linear`` (kept, frozen) with a fresh PSOFT adapter (``Q = 0``, vectors 1: equals the base)."""
        return cls(linear, r, alpha, method=method, terms=terms, eps=eps, vectors=vectors, svd=svd, init=init,
                   seed=seed, niter=niter)

    @classmethod
    def from_peft(cls, peft_layer, adapter_name: Optional[str] = None) -> "PSOFTLinear":
        """Ours from a PEFT 0.21 ``psoft.Linear``: same parameters and frozen factors, same outputs/gradients."""
        name = _peft_adapter(peft_layer, adapter_name, "psoft_R")
        R = peft_layer.psoft_R[name]
        if not R.orth:
            raise ValueError("from_peft: psoft_orth=False (a free r×r matrix) is not an orthogonal adapter; "
                             "PSOFTLinear supports psoft_orth=True only")
        drop = peft_layer.psoft_dropout[name]
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            raise ValueError(f"from_peft: psoft_dropout={drop.p} is not supported (dropout on the PSOFT path)")
        base = peft_layer.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"from_peft: PSOFT on {type(base).__name__} is not supported (nn.Linear only)")
        r = int(peft_layer.r[name])
        neumann = bool(R.use_cayley_neumann)
        A, B = peft_layer._get_psoft_ab_cache_buffers(name)
        layer = cls(base, r, float(peft_layer.psoft_alpha[name]), method="neumann" if neumann else "exact",
                    terms=int(R.num_cayley_neumann_terms),
                    eps=R.cayley_neumann_eps if neumann and R.cayley_neumann_eps is not None else None,
                    vectors=(R.vector_a is not None, R.vector_b is not None), svd=peft_layer.psoft_svd[name],
                    init=peft_layer.ab_svd_init[name], seed=int(peft_layer.random_seed[name]),
                    niter=int(peft_layer.psoft_svd_lowrank_niter[name]), _factors=(A, B))
        layer.scaling = float(peft_layer.scaling[name])
        with torch.no_grad():
            layer.psoft_v.data = R.weight.detach().clone().to(layer.psoft_v.device)
            if R.vector_a is not None:
                layer.vector_a.data = R.vector_a.detach().clone()
            if R.vector_b is not None:
                layer.vector_b.data = R.vector_b.detach().clone()
        return layer

    def adapter_config(self) -> dict:
        """JSON-serialisable kwargs of :meth:`from_linear` that rebuild this adapter on the same base layer."""
        vec = self.mag_a if self.mag_a == self.mag_b else [self.mag_a, self.mag_b]
        return {"r": self.r, "alpha": self.alpha, "method": self.method, "terms": self.terms, "eps": self.eps,
                "vectors": vec, "svd": self.svd, "init": self.init, "seed": self.seed, "niter": self.niter}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`OFTLinear.forward`: the base's dtype out of autocast, the autocast dtype under it."""
        base = self.base_layer
        w = base.weight
        ac = autocast_on(x.device.type)
        y = psoft_linear(x if ac else x.to(w.dtype), w, base.bias, self.psoft_a, self.psoft_b, self.psoft_v,
                         self.vector_a, self.vector_b, self.scaling, method=self.method, terms=self.terms,
                         eps=self.eps, backend=self.backend)
        return y if ac else y.to(x.dtype)

    def rotation(self) -> torch.Tensor:
        """``R' = diag(vector_b) R diag(vector_a)`` (r, r) in the work dtype (differentiable)."""
        return psoft_rotation(self.psoft_v, self.r, self.vector_a, self.vector_b, self.method, self.terms, self.eps,
                              None)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``s · B (R' − I) A`` (N, K) in the work dtype."""
        with autocast_off(self.psoft_a.device.type):  # fp32 products even when called under autocast
            Rp = self.rotation()
            D = Rp - torch.eye(self.r, dtype=Rp.dtype, device=Rp.device)
            return self.scaling * (self.psoft_b.to(Rp.dtype) @ D @ self.psoft_a.to(Rp.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new plain ``nn.Linear`` with ``W + s · B (R' − I) A`` (the base layer is not modified)."""
        w = self.base_layer.weight
        d = self.delta_weight()
        return _plain_linear(self.base_layer, (w.to(d.dtype) + d).to(w.dtype))

    @torch.no_grad()
    def unmerged(self, merged_linear: nn.Linear) -> nn.Linear:
        """Undo :meth:`merged` on ``merged_linear`` (subtract the same delta)."""
        w = merged_linear.weight
        d = self.delta_weight()
        return _plain_linear(merged_linear, (w.to(d.dtype) - d).to(w.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.base_layer.in_features}, out_features={self.base_layer.out_features}, "
                f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, method={self.method}"
                + (f", terms={self.terms}, eps={self.eps}" if self.method == "neumann" else "")
                + f", vector_a={self.mag_a}, vector_b={self.mag_b}, svd={self.svd}, init={self.init}"
                + f", backend={self.backend or 'auto'}")
