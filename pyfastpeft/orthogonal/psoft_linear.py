"""PSOFT linear (principal-subspace orthogonal fine-tuning; PEFT's ``psoft.Linear``): ``docs/orthogonal.md`` §4.

    R  = cayley_plus(Q)  (exact, or PEFT's Neumann series with its optional Frobenius rescale ``eps``)
    R' = diag(vector_b) · R · diag(vector_a)
    u  = x Aᵀ                                   (M, r)
    y  = x Wᵀ + bias + s · (u R'ᵀ − u) Bᵀ       (computed as s · (u (R' − I)ᵀ) Bᵀ)

Shapes: ``x (..., K)``, ``weight (N, K)`` frozen, ``psoft_a (r, K)`` and ``psoft_b (N, r)`` frozen,
``psoft_v (r(r−1)/2,)`` (PEFT's ``psoft_R.weight``) or ``(1, r(r−1)/2)``, ``vector_a``/``vector_b``
``(r,)`` or None, ``s = psoft_alpha / r``.
Runs on the LoRA primitives (``pyfastpeft::lora_linear_fwd/bwd``): PSOFT is LoRA with ``A`` frozen and
``B' = s · B (R' − I)`` (an ``N × r`` product in the work dtype, then cast to the compute dtype):

    y, u         = lora_linear_fwd(x, None, W, bias, A, B', 1)
    dx, dL/dB'   = lora_linear_bwd(dy, <no x>, u, W, A, B', 1)     (dx = dy W + (dy B') A, dL/dB' = dyᵀ u)
    dR'          = s · Bᵀ (dL/dB')                                  (r × N · N × r, work dtype)

The backward passes an empty ``x_lora`` so the LoRA backward skips its ``dA`` reduction (``A`` is frozen).
Saved for backward: ``u (M, r)`` (what LoRA saves but ``x``), and the parameter-sized ``B'``; ``W``, ``A``,
``B`` are frozen and re-read. ``R'``'s gradient flows to the vectors and through the Cayley op to
``psoft_v``. Whatever backend LoRA's dispatch picks runs PSOFT too (``backend`` is passed through;
``pfp.explain("psoft_linear", ...)`` shows LoRA's decision), so the two GEMMs of size tokens × features stay
on the vendor library or the fused LoRA kernels exactly as for LoRA.
Dtypes: the GEMMs run in the compute dtype (x's, or the autocast dtype: the public function casts ``x``,
``weight``, ``bias``, ``A`` and ``B`` to it), ``R'``, ``B'`` (before its cast) and ``dR'`` in the work dtype
(fp32; fp64 for fp64 ``x``), with autocast off inside the Function (``docs/orthogonal.md`` §7).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyfastpeft.core.backend import REGISTRIES, _env_choice
from pyfastpeft.lora import lora_linear as _lora
from pyfastpeft.orthogonal.cayley import cayley_work, validate_cayley_args
from pyfastpeft.core.checks import (autocast_on, check_bias, check_same_device, check_scalar, check_tensor,
                                     compute_dtype)
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.core.amp import autocast_off

# PSOFT has no registry of its own: its backends are LoRA's (``pfp.available_backends("psoft_linear")``)
REGISTRIES.setdefault("psoft_linear_fwd", _lora.FWD)
REGISTRIES.setdefault("psoft_linear_bwd", _lora.BWD)


def psoft_delta_b(psoft_b: Tensor, Rp: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``B' = s · B (R' − I)`` ``(N, r)``: computed in ``Rp``'s (work) dtype, returned in ``dtype``."""
    r = Rp.shape[0]
    D = Rp - torch.eye(r, dtype=Rp.dtype, device=Rp.device)
    return torch.mm(psoft_b.to(Rp.dtype), D).mul_(scale).to(dtype)


class PSOFTLinearFn(torch.autograd.Function):
    """Autograd glue on 2-D ``x``; ``Rp`` is ``diag(vector_b) R diag(vector_a)`` in the work dtype. Every
    other tensor arrives in the compute dtype; the LoRA primitives run with autocast off, and so do the two
    rank-r products here (fp32 on purpose), forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, psoft_a, psoft_b, Rp, scale, backend):
        with autocast_off(x.device.type):
            Bp = psoft_delta_b(psoft_b, Rp, scale, x.dtype)
            y, u = torch.ops.pyfastpeft.lora_linear_fwd(x, None, weight, bias, psoft_a, Bp, 1.0, backend)
        ctx.scale, ctx.backend = scale, backend
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(u, weight, psoft_a, psoft_b, Bp)  # u only of size M: x is not saved
        ctx.work_dtype = Rp.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        u, weight, psoft_a, psoft_b, Bp = ctx.saved_tensors
        need_dx = bool(ctx.needs_input_grad[0])
        with autocast_off(dy.device.type):
            no_x = dy.new_empty((0,))  # x_lora of shape (0,): A frozen, the LoRA backward skips dA
            dx, _, _, dBp = torch.ops.pyfastpeft.lora_linear_bwd(dy.contiguous(), no_x, u, weight, psoft_a, Bp,
                                                                 1.0, 1 if need_dx else 0, ctx.backend)
            dRp = None
            if ctx.needs_input_grad[5]:
                wd = ctx.work_dtype
                dRp = torch.mm(psoft_b.to(wd).t(), dBp.to(wd)).mul_(ctx.scale)  # s · Bᵀ (dyᵀ u)
            dbias = dy.sum(0, dtype=acc_dtype(dy.dtype)).to(dy.dtype) if ctx.bias_grad else None
        return dx if need_dx else None, None, dbias, None, None, dRp, None, None


def validate_psoft_args(x, weight, bias, psoft_a, psoft_b, psoft_v, vector_a, vector_b, scale, method, terms,
                        eps) -> None:
    """Clear errors naming the argument and what was expected."""
    check_tensor("x", x)
    check_tensor("weight", weight, 2)
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x.shape[-1] must equal weight.shape[1] (in_features={K}), got x of shape {tuple(x.shape)}")
    check_tensor("psoft_a", psoft_a, 2)
    r = psoft_a.shape[0]
    if r < 1 or r > min(K, N):
        raise ValueError(f"r = psoft_a.shape[0] must be in 1..min(in_features, out_features) = {min(K, N)}, got {r}")
    if psoft_a.shape[1] != K:
        raise ValueError(f"psoft_a must have shape (r, {K}) (in_features={K}), got {tuple(psoft_a.shape)}")
    check_tensor("psoft_b", psoft_b, 2)
    if tuple(psoft_b.shape) != (N, r):
        raise ValueError(f"psoft_b must have shape ({N}, {r}) = (out_features, r), got {tuple(psoft_b.shape)}")
    if not isinstance(psoft_v, Tensor):
        raise TypeError(f"psoft_v must be a torch.Tensor, got {type(psoft_v).__name__}")
    n = r * (r - 1) // 2
    if psoft_v.shape not in ((n,), (1, n)):
        raise ValueError(f"psoft_v must have shape (r*(r-1)/2,) = ({n},) for r={r}, got {tuple(psoft_v.shape)}")
    validate_cayley_args(psoft_v.reshape(1, -1), r, method, "plus", terms, eps, name="psoft_v")
    for name, vec in (("vector_a", vector_a), ("vector_b", vector_b)):
        if vec is not None:
            check_tensor(name, vec, 1)
            if vec.shape[0] != r:
                raise ValueError(f"{name} must have shape ({r},) (r) or be None, got {tuple(vec.shape)}")
    check_bias(bias, N)
    check_same_device(x, weight=weight, bias=bias, psoft_a=psoft_a, psoft_b=psoft_b, psoft_v=psoft_v,
                      vector_a=vector_a, vector_b=vector_b)
    if weight.dtype != x.dtype and not autocast_on(x.device.type):
        raise ValueError(f"weight dtype {weight.dtype} must match x dtype {x.dtype} (or run under autocast)")
    if weight.requires_grad or psoft_a.requires_grad or psoft_b.requires_grad:
        raise ValueError("weight, psoft_a and psoft_b must be frozen (requires_grad=False): PSOFT trains psoft_v "
                         "and the vectors only")
    check_scalar("scale", scale)  # a number or a 0-d tensor; NaN/inf/bool raise a ValueError naming scale


def psoft_rotation(psoft_v: Tensor, r: int, vector_a: Optional[Tensor], vector_b: Optional[Tensor], method: str,
                   terms: int, eps: Optional[float], backend: Optional[str]) -> Tensor:
    """``R' = diag(vector_b) R diag(vector_a)`` (r, r) in the work dtype, differentiable."""
    R = cayley_work(psoft_v.reshape(1, -1), r, method, "plus", terms, eps, backend)[0]
    if vector_b is not None:
        R = vector_b.to(R.dtype)[:, None] * R
    if vector_a is not None:
        R = R * vector_a.to(R.dtype)[None, :]
    return R


def psoft_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], psoft_a: Tensor, psoft_b: Tensor,
                 psoft_v: Tensor, vector_a: Optional[Tensor], vector_b: Optional[Tensor], scale: float, *,
                 method: str = "exact", terms: int = 5, eps: Optional[float] = None,
                 backend: Optional[str] = None) -> Tensor:
    """PSOFT linear: ``y = x Wᵀ + bias + s · (u R'ᵀ − u) Bᵀ``, ``u = x Aᵀ``.

    Args:
        x: ``(..., K)``. weight: ``(N, K)`` frozen, x's dtype (any floating dtype under autocast: cast to the
            autocast dtype). bias: ``(N,)`` or None, any floating dtype (cast to the compute dtype).
        psoft_a: ``(r, K)``, psoft_b: ``(N, r)``: the frozen SVD factors (PEFT's ``_psoft_A_cache`` /
            ``_psoft_B_cache``), any floating dtype; cast to the compute dtype.
        psoft_v: ``(r(r−1)/2,)`` packed skew generator (PEFT's ``psoft_R.weight``).
        vector_a, vector_b: ``(r,)`` or None (PEFT's ``psoft_mag_a`` / ``psoft_mag_b``), any floating dtype:
            they scale ``R`` in the work dtype (fp32; fp64 for fp64 inputs).
        scale: ``psoft_alpha / r``: a finite number or a 0-d tensor (NaN, inf or a bool raise ``ValueError``
            naming ``scale``).
        method: ``"exact"`` (``(I + Q)(I − Q)⁻¹``, fp32 solve) or ``"neumann"`` (PEFT's series, ``terms``
            terms, optional rescale ``eps`` = PEFT's ``cayley_neumann_eps``).
        backend: ``"cuda" | "triton" | "torch" | None`` (auto): the LoRA primitives' backend (PSOFT runs on
            them; ``PYFASTPEFT_BACKEND=psoft_linear=...`` also works). The Cayley transform picks its own
            fastest, except that ``"torch"`` forces it too. A forced backend that cannot run raises
            :class:`pyfastpeft.BackendUnavailable` (e.g. ``"triton"`` for fp64, or for ``r`` above the LoRA
            kernels' rank limit).

    Returns:
        ``(..., N)`` in the compute dtype: x's, or under ``torch.autocast`` the autocast dtype (what
        ``nn.Linear`` and PEFT's ``psoft.Linear`` return there; fp64 ``x`` stays fp64). The GEMMs with ``W``,
        ``A`` and ``B`` run in the compute dtype; the Cayley transform, ``R'`` and the gradient ``dR'`` (a sum
        over the rows) in fp32. Under autocast the backward runs under the forward's autocast state.

    Non-finite inputs: rows are independent on the forward. A NaN anywhere in row ``i`` of ``x`` makes row
    ``i`` of ``y`` NaN (both ``x Wᵀ`` and the rank-``r`` projection ``u_i = x_i Aᵀ`` mix every feature of the
    row) and leaves every other row untouched; a ±inf makes row ``i`` non-finite (±inf or NaN). On the
    backward ``dx`` does not depend on ``x`` (it stays finite), while ``dR' = s gᵀ u`` sums over the rows: the
    gradients of ``psoft_v`` and of the vectors are NaN.
    """
    validate_psoft_args(x, weight, bias, psoft_a, psoft_b, psoft_v, vector_a, vector_b, scale, method, terms, eps)
    if backend is None:  # a per-op environment choice for psoft_linear (LoRA's own is read by its registry)
        backend = _env_choice("psoft_linear_fwd", "psoft_linear")
    dt = compute_dtype(x)
    r = psoft_a.shape[0]
    Rp = psoft_rotation(psoft_v, r, vector_a, vector_b, method, terms, eps, backend if backend == "torch" else None)
    if dt == torch.float64:
        Rp = Rp.double()
    K, N = weight.shape[1], weight.shape[0]
    lead = x.shape[:-1]
    y = PSOFTLinearFn.apply(x.to(dt).reshape(-1, K), weight.to(dt), None if bias is None else bias.to(dt),
                            psoft_a.to(dt), psoft_b.to(dt), Rp, float(check_scalar("scale", scale)), backend)
    return y.reshape(*lead, N)


def explain_args(x, weight, bias, psoft_a, psoft_b, psoft_v, vector_a, vector_b, scale, *, method="exact",
                 terms=5, eps=None, backend=None):
    """Map public arguments to the LoRA forward primitive's (for ``pfp.explain``): PSOFT runs on it."""
    if backend is None:
        backend = _env_choice("psoft_linear_fwd", "psoft_linear")
    dt = compute_dtype(x)
    Bp = torch.empty(psoft_b.shape, device=x.device, dtype=dt)
    b = None if bias is None else bias.to(dt)
    return (_lora.FWD, x.device, (x.to(dt).reshape(-1, x.shape[-1]), None, weight.to(dt), b, psoft_a.to(dt), Bp,
                                  1.0), backend)


# PSOFT declares no costs of its own: ``pfp.perf`` counts the LoRA primitives' declared launches and the two
# small rank-r products above op by op
COSTS: dict = {}
