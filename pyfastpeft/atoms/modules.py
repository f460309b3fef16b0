"""``AtomConv2d`` / ``AtomLinear``: filter-atom tuning (Chen, Miao, Qiu, ICLR 2025; ``docs/atoms.md``).

The frozen base weight is decomposed once, in float64 on the weight's device, into frozen *atom coefficients*
``coeff`` and atoms ``D₀`` (``W ≈ Σ_j coeff[..., j] · D₀[j]``); only the atom *deltas* train, initialised to
zero, so a fresh layer equals its base layer exactly. Decompositions:

* ``"svd"`` (default): truncated SVD of ``W`` reshaped to ``(C_out·C_in/g, kh·kw)`` (conv) or of its
  ``block × block`` channel blocks (linear); ``num_atoms <= kh·kw`` (``<= block²``); exact at equality.
  Atom signs are fixed (largest entry positive), so the result is deterministic.
* ``"lasso"``: the paper's sparse dictionary learning: alternate ISTA LASSO coding of the rows and a
  least-squares dictionary update (unit-norm atoms), a fixed number of iterations, initialised from the SVD
  plus seeded random atoms; overcomplete ``num_atoms > kh·kw`` is allowed.

Recursive atoms (``sub_atoms = m₁ > 0``, the seed code's ``bases_l2``): each of the ``m`` atoms becomes,
per input channel, a combination of ``m₁`` sub-atoms: trainable ``atoms_beta (m₁, m, C_in/g)``
(Kaiming-normal, a = √5, seeded) and ``atoms_sub (m₁, m, kh, kw)`` (zero), so ``ΔW = 0`` at construction.

1×1 convs: ``kh·kw = 1``, so one-level atoms are a single trainable scalar per layer; use recursive atoms
(``sub_atoms``) for them, or ``AtomLinear`` channel blocks on the equivalent linear map.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyfastpeft.core.backend import _check_name
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.atoms.ops import atom_conv2d, atom_linear, compose_atoms

_DECOMPOSITIONS = ("svd", "lasso")
LASSO_ITERS = 20  # outer iterations: coding + dictionary update (the paper uses a few tens)
ISTA_STEPS = 25  # ISTA steps per coding pass
LASSO_LAMBDA = 0.05  # L1 weight, relative to the rows' RMS
LASSO_RIDGE = 1e-8  # keeps the dictionary's normal equations solvable when an atom goes unused


# ----------------------------------------------------------------------------------------------- decomposition
def _fix_signs(coeff: torch.Tensor, atoms: torch.Tensor):
    """Flip each (coeff column, atom) pair so the atom's largest-magnitude entry is positive (deterministic)."""
    idx = atoms.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(atoms, 1, idx)).squeeze(1)
    sign[sign == 0] = 1
    return coeff * sign, atoms * sign[:, None]


def _svd(rows: torch.Tensor, m: int):
    u, s, vh = torch.linalg.svd(rows, full_matrices=False)
    k = min(m, s.numel())
    coeff = rows.new_zeros(rows.shape[0], m)
    atoms = rows.new_zeros(m, rows.shape[1])
    coeff[:, :k] = u[:, :k] * s[:k]
    atoms[:k] = vh[:k]
    c, a = _fix_signs(coeff[:, :k], atoms[:k])
    coeff[:, :k], atoms[:k] = c, a
    return coeff, atoms


def _lasso(rows: torch.Tensor, m: int, seed: int):
    """Sparse coding ``rows ≈ coeff @ atoms`` with unit-norm atoms; float64, deterministic for a seed."""
    R, P = rows.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    atoms = torch.randn(m, P, generator=gen, dtype=torch.float64).to(rows.device)
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    k = min(m, vh.shape[0])
    atoms[:k] = vh[:k]
    atoms = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-30)
    lam = LASSO_LAMBDA * rows.pow(2).mean().sqrt().item()
    coeff = rows @ torch.linalg.pinv(atoms)
    eye = torch.eye(m, dtype=rows.dtype, device=rows.device)
    for _ in range(LASSO_ITERS):
        L = torch.linalg.matrix_norm(atoms, 2).pow(2).item() + 1e-12  # Lipschitz constant of the data term
        for _ in range(ISTA_STEPS):
            z = coeff - (coeff @ atoms - rows) @ atoms.T / L
            coeff = torch.sign(z) * (z.abs() - lam / L).clamp_min(0)
        new = torch.linalg.solve(coeff.T @ coeff + LASSO_RIDGE * eye, coeff.T @ rows)
        norms = new.norm(dim=1, keepdim=True)
        used = norms.squeeze(1) > 1e-12
        atoms = torch.where(used[:, None], new / norms.clamp_min(1e-30), atoms)
        coeff = coeff * torch.where(used, norms.squeeze(1), torch.ones_like(norms.squeeze(1)))
    return coeff, atoms


def decompose(rows: torch.Tensor, num_atoms: int, method: str, seed: int):
    """``(coeff (R, m), atoms (m, P))`` of ``rows (R, P)`` in float64 on its device."""
    rows = rows.detach().to(torch.float64)
    if method == "svd":
        return _svd(rows, num_atoms)
    return _lasso(rows, num_atoms, seed)


def _check_int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _param_dtype(w: torch.Tensor) -> torch.dtype:
    """Atoms and coefficients of fp16/bf16 layers are fp32 (the update is tiny next to W's rounding)."""
    return torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype


# ----------------------------------------------------------------------------------------------- conv
class AtomConv2d(nn.Module):
    """``conv2d(x, W + ΔW)`` with ``W`` frozen and only filter atoms trained; build with :meth:`from_conv`.

    Buffers: ``atom_coeff (C_out, C_in/g, m)`` (frozen, in the state dict), ``base_atoms (m, kh, kw)`` (``D₀``,
    for reference). Parameters: ``atoms (m, kh, kw)`` (one level), or ``atoms_beta (m₁, m, C_in/g)`` and
    ``atoms_sub (m₁, m, kh, kw)`` (recursive). Every ``nn.Conv2d`` option is supported: stride, padding
    (ints, ``"same"``, ``"valid"``, any ``padding_mode``), dilation, groups (depthwise too), bias, and any
    memory format of ``x``.
    """

    def __init__(self, base_layer: nn.Conv2d, num_atoms: int, *, sub_atoms: int = 0, decomposition: str = "svd",
                 seed: int = 0, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(base_layer).__name__}")
        if decomposition not in _DECOMPOSITIONS:
            raise ValueError(f"decomposition must be one of {_DECOMPOSITIONS}, got {decomposition!r}")
        kh, kw = base_layer.kernel_size
        _check_int("num_atoms", num_atoms, 1)
        if decomposition == "svd" and num_atoms > kh * kw:
            raise ValueError(f"num_atoms={num_atoms} must be <= kh*kw = {kh * kw} with decomposition='svd' "
                             f"(use decomposition='lasso' for an overcomplete set)")
        _check_int("sub_atoms", sub_atoms, 0)
        _check_int("seed", seed, 0)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.num_atoms, self.sub_atoms, self.decomposition, self.seed = num_atoms, sub_atoms, decomposition, seed
        w = base_layer.weight
        co, ci = w.shape[:2]
        pdt = _param_dtype(w)
        with torch.no_grad():
            coeff, d0 = decompose(w.reshape(co * ci, kh * kw), num_atoms, decomposition, seed)
        self.register_buffer("atom_coeff", coeff.reshape(co, ci, num_atoms).to(pdt))
        self.register_buffer("base_atoms", d0.reshape(num_atoms, kh, kw).to(pdt))
        if sub_atoms == 0:
            self.atoms = nn.Parameter(torch.zeros(num_atoms, kh, kw, dtype=pdt, device=w.device))
        else:
            beta = torch.empty(sub_atoms, num_atoms, ci, dtype=torch.float64)
            nn.init.kaiming_normal_(beta, a=math.sqrt(5), generator=torch.Generator().manual_seed(int(seed)))
            self.atoms_beta = nn.Parameter(beta.to(device=w.device, dtype=pdt))
            self.atoms_sub = nn.Parameter(torch.zeros(sub_atoms, num_atoms, kh, kw, dtype=pdt, device=w.device))
        self.backend = _check_name(backend, "AtomConv2d.backend")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_atoms: int, *, sub_atoms: int = 0, decomposition: str = "svd",
                  seed: int = 0) -> "AtomConv2d":
        """Wrap ``conv`` (kept, frozen) with zero-initialised filter atoms."""
        return cls(conv, num_atoms, sub_atoms=sub_atoms, decomposition=decomposition, seed=seed)

    def adapter_config(self) -> dict:
        """JSON-serialisable keyword arguments of :meth:`from_conv` that rebuild this adapter on the same base."""
        return {"num_atoms": self.num_atoms, "sub_atoms": self.sub_atoms, "decomposition": self.decomposition,
                "seed": self.seed}

    def current_atoms(self) -> torch.Tensor:
        """``ΔD``: ``(m, kh, kw)``, or per input channel ``(C_in/g, m, kh, kw)`` for recursive atoms."""
        if self.sub_atoms == 0:
            return self.atoms
        return compose_atoms(self.atoms_beta, self.atoms_sub)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.base_layer
        padding = conv.padding
        if conv.padding_mode != "zeros":  # as nn.Conv2d: pad explicitly, then convolve without padding
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        return atom_conv2d(x, conv.weight, conv.bias, self.atom_coeff, self.current_atoms(), stride=conv.stride,
                           padding=padding, dilation=conv.dilation, groups=conv.groups, backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW (C_out, C_in/g, kh, kw)`` in fp32 (fp64 for fp64 layers)."""
        acc = acc_dtype(self.base_layer.weight.dtype)
        d = self.current_atoms().to(acc)
        c = self.atom_coeff.to(acc)
        return torch.einsum("oij,jpq->oipq", c, d) if d.dim() == 3 else torch.einsum("oij,ijpq->oipq", c, d)

    @torch.no_grad()
    def merged(self) -> nn.Conv2d:
        """A new plain ``nn.Conv2d`` equal to this layer (``W + ΔW`` rounded once); the base is not modified."""
        b = self.base_layer
        out = nn.Conv2d(b.in_channels, b.out_channels, b.kernel_size, b.stride, b.padding, b.dilation, b.groups,
                        bias=b.bias is not None, padding_mode=b.padding_mode, device=b.weight.device,
                        dtype=b.weight.dtype)
        acc = self.delta_weight().dtype
        out.weight.copy_((b.weight.to(acc) + self.delta_weight()).to(b.weight.dtype))
        if b.bias is not None:
            out.bias.copy_(b.bias)
        return out

    def extra_repr(self) -> str:
        b = self.base_layer
        return (f"{b.in_channels}, {b.out_channels}, kernel_size={b.kernel_size}, stride={b.stride}, "
                f"padding={b.padding}, dilation={b.dilation}, groups={b.groups}, num_atoms={self.num_atoms}, "
                f"sub_atoms={self.sub_atoms}, decomposition={self.decomposition}, backend={self.backend or 'auto'}")


# ----------------------------------------------------------------------------------------------- linear
class AtomLinear(nn.Module):
    """``y = x (W + ΔW)ᵀ + b`` with ``block × block`` channel-block atoms; build with :meth:`from_linear`.

    Buffers: ``atom_coeff (N/block, K/block, m)``, ``base_atoms (m, block, block)``; parameter ``atoms
    (m, block, block)`` (zero). For transformer projections (timm ViT ``qkv``/``proj``/``fc1``/``fc2``,
    transformers ``q_proj``...).
    """

    def __init__(self, base_layer: nn.Linear, num_atoms: int, *, block: int, decomposition: str = "svd",
                 seed: int = 0, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(base_layer).__name__}")
        if decomposition not in _DECOMPOSITIONS:
            raise ValueError(f"decomposition must be one of {_DECOMPOSITIONS}, got {decomposition!r}")
        _check_int("block", block, 1)
        N, K = base_layer.out_features, base_layer.in_features
        if N % block or K % block:
            raise ValueError(f"block={block} must divide both out_features={N} and in_features={K}")
        _check_int("num_atoms", num_atoms, 1)
        if decomposition == "svd" and num_atoms > block * block:
            raise ValueError(f"num_atoms={num_atoms} must be <= block*block = {block * block} with "
                             f"decomposition='svd'")
        _check_int("seed", seed, 0)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.num_atoms, self.block, self.decomposition, self.seed = num_atoms, block, decomposition, seed
        w = base_layer.weight
        nb, kb = N // block, K // block
        pdt = _param_dtype(w)
        with torch.no_grad():
            rows = w.reshape(nb, block, kb, block).permute(0, 2, 1, 3).reshape(nb * kb, block * block)
            coeff, d0 = decompose(rows, num_atoms, decomposition, seed)
        self.register_buffer("atom_coeff", coeff.reshape(nb, kb, num_atoms).to(pdt))
        self.register_buffer("base_atoms", d0.reshape(num_atoms, block, block).to(pdt))
        self.atoms = nn.Parameter(torch.zeros(num_atoms, block, block, dtype=pdt, device=w.device))
        self.backend = _check_name(backend, "AtomLinear.backend")

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_atoms: int, *, block: int, decomposition: str = "svd",
                    seed: int = 0) -> "AtomLinear":
        """Wrap ``linear`` (kept, frozen) with zero-initialised channel-block atoms."""
        return cls(linear, num_atoms, block=block, decomposition=decomposition, seed=seed)

    def adapter_config(self) -> dict:
        """JSON-serialisable keyword arguments of :meth:`from_linear` that rebuild this adapter."""
        return {"num_atoms": self.num_atoms, "block": self.block, "decomposition": self.decomposition,
                "seed": self.seed}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        return atom_linear(x, b.weight, b.bias, self.atom_coeff, self.atoms, block=self.block, backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        acc = acc_dtype(self.base_layer.weight.dtype)
        c, d = self.atom_coeff.to(acc), self.atoms.to(acc)
        nb, kb, _ = c.shape
        return torch.einsum("abj,jpq->apbq", c, d).reshape(nb * self.block, kb * self.block)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        b = self.base_layer
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                        dtype=b.weight.dtype)
        d = self.delta_weight()
        out.weight.copy_((b.weight.to(d.dtype) + d).to(b.weight.dtype))
        if b.bias is not None:
            out.bias.copy_(b.bias)
        return out

    def extra_repr(self) -> str:
        b = self.base_layer
        return (f"in_features={b.in_features}, out_features={b.out_features}, num_atoms={self.num_atoms}, "
                f"block={self.block}, decomposition={self.decomposition}, backend={self.backend or 'auto'}")


# ----------------------------------------------------------------------------------------------- injection
def spatial_conv(name: str, module: nn.Module) -> bool:
    """Default target: every ``nn.Conv2d`` with a spatial kernel (3×3, depthwise 7×7, ...), no 1×1 convs."""
    return isinstance(module, nn.Conv2d) and module.kernel_size[0] * module.kernel_size[1] > 1


def inject_conv_atoms(model: nn.Module, num_atoms: int, *, sub_atoms: int = 0, decomposition: str = "svd",
                      seed: int = 0, predicate: Callable[[str, nn.Module], bool] = spatial_conv) -> list[str]:
    """Replace (in place) every conv for which ``predicate(name, module)`` holds by an :class:`AtomConv2d`, and
    freeze every other parameter of ``model``. Returns the replaced names. ``num_atoms`` is capped at
    ``kh·kw`` per layer for ``svd``. (``pfp.inject(model, "atoms", ...)`` is the general model-level entry.)"""
    targets = [(n, m) for n, m in model.named_modules() if predicate(n, m) and not isinstance(m, AtomConv2d)]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, conv in targets:
        k = conv.kernel_size[0] * conv.kernel_size[1]
        m = min(num_atoms, k) if decomposition == "svd" else num_atoms
        new = AtomConv2d.from_conv(conv, m, sub_atoms=sub_atoms, decomposition=decomposition, seed=seed)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return [n for n, _ in targets]
