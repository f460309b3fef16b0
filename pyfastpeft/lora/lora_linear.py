"""LoRA linear: ``y = x Wᵀ + b + scale · dropout(x) Aᵀ Bᵀ`` (PEFT's ``lora.Linear``), base weight frozen.

Shapes: ``x (..., K)``, ``weight (N, K)``, ``bias (N,)`` or None, ``lora_a (R, K)``, ``lora_b (N, R)``.
Saved for backward: ``x_lora`` (x itself, or its dropped-out copy) and ``u = x_lora Aᵀ (M, R)``;
W, A, B are parameters and are re-read, not saved. Without dropout that is exactly what PEFT saves.

Layering (flash-attention's): two ``torch.library.custom_op`` primitives, ``pyfastpeft::lora_linear_fwd``
and ``pyfastpeft::lora_linear_bwd`` (each with a fake, so ``torch.compile`` sees one opaque node and never
traces the registry), glued by :class:`LoRALinearFn`; the backend registry runs inside the primitives.

Backends:
* ``cuda``: cuBLAS (through ATen) for the two big GEMMs, ``pyfastpeft._C`` kernels for the rank-r
  shrink and expand (each checked once per GPU against torch before first use).
* ``triton``: two implementations (*variants*), chosen per call (:func:`triton_variant`):

  - ``vendor`` (the static default): memory-bound rank-r Triton kernels
    (``pyfastpeft.triton_kernels.lora.lora_rank``) write ``scale · (x_lora Aᵀ) Bᵀ + b`` into y, then cuBLAS
    adds ``x Wᵀ`` onto it as its C operand (``y.addmm_(x, Wᵀ)``, beta = 1); backward: one pass over dy for
    ``g = scale · dy B`` and ``dB``, one pass over x_lora for ``dA`` and ``g A`` written into dx, then
    ``dx.addmm_(dy, W)`` on cuBLAS. Nothing of size tokens × features is read or written twice and the big
    GEMMs run at the vendor's rate.
  - ``fused``: fused Triton GEMMs (``pyfastpeft.triton_kernels.lora.lora_linear``): the shrink shares the
    base GEMM's reads of x, the expand is its epilogue; backward computes ``dy W + (s·dy B) A`` in one GEMM.
    Faster only if our GEMM reaches cuBLAS's rate (docs/performance.md).

  ``PYFASTPEFT_TRITON_GEMM=vendor|fused`` pins one; ``auto`` (default) measures both once per (GPU, op,
  dtype, shape bucket) on a GPU, as the backends are measured (``core/tune.py``), and otherwise uses
  ``vendor``.
* ``torch``: ``pyfastpeft.lora.torch_impl``, the contract the others implement.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfastpeft.core import ext as _ext
from pyfastpeft.core.cost import cdiv, l2_reread, launch
from pyfastpeft.core.checks import (FLOAT_DTYPES, autocast_on, check_bias, check_same_device, check_scalar,
                                     check_tensor, compute_dtype)
from pyfastpeft.core.backend import (Backend, OpRegistry, note_variant as _note_variant,
                                  triton_available as _triton_available,
                                  triton_devices as _triton_devices,
                                  triton_why as _triton_why)
from pyfastpeft.lora import torch_impl as _fallback
from pyfastpeft.core.amp import autocast_as, autocast_off, autocast_state

# Preference order where nothing was measured and the static default does not apply (CPU under the
# interpreter): Triton first. Its default variant there and on a GPU is ``vendor``: rank-r kernels writing
# into the output, then the cuBLAS GEMM adding onto it as its C operand, modeled ~1.15x the frozen layer's
# fwd+bwd (r=16, K=N=4096, M=8192, bf16, H100) with no assumption about our own GEMMs' efficiency. The cuda
# path is cuBLAS plus separate rank-r kernels whose expand re-reads y (and dx) after the GEMM: ~1.28x. The
# torch path writes the rank-r term with small cuBLAS GEMMs, then the base GEMM adds onto it (C operand).
_ORDER = ("triton", "cuda", "torch")
# Without a measurement on a GPU (PYFASTPEFT_TUNE=0, or torch.compile / CUDA-graph capture before the first
# eager call): for an op whose triton backend is a fused Triton GEMM (gated LoRA imports this), the cuBLAS-backed
# paths come first, since a fused GEMM must win a measurement on the user's GPU to be used.
VENDOR_ORDER = ("cuda", "torch", "triton")
# LoRA's own static order on CUDA: its triton backend's default variant (vendor) keeps both big GEMMs on cuBLAS
# and is modeled fastest of the three with no assumption about our GEMMs (1.185x frozen at Llama 4096^2 vs
# cuda's expand-after-GEMM and torch's 1.22x; 2.14x vs 2.39x at ViT 768^2), so it comes first. With measuring
# on (the default) all three are timed on first use and the fastest is remembered.
LORA_VENDOR_ORDER = ("triton", "cuda", "torch")
FWD = OpRegistry("lora_linear_fwd", public="lora_linear", order=_ORDER, vendor_order=LORA_VENDOR_ORDER)
BWD = OpRegistry("lora_linear_bwd", public="lora_linear", order=_ORDER, vendor_order=LORA_VENDOR_ORDER)



# --------------------------------------------------------------------------------------------- backends
def _tk():
    from pyfastpeft.triton_kernels.lora import lora_linear as tk  # lazy: decorating kernels imports triton

    return tk


def _triton_supports_fwd(x, x_lora, weight, bias, lora_a, lora_b, scale):
    return _tk().supports(x.dtype, lora_a.shape[0])


def _triton_supports_bwd(dy, x_lora, u, weight, lora_a, lora_b, scale, dx_mode):
    return _tk().supports(dy.dtype, lora_a.shape[0])


def _rk():
    from pyfastpeft.triton_kernels.lora import lora_rank as rk  # lazy: decorating kernels imports triton

    return rk


TRITON_GEMM_ENV = "PYFASTPEFT_TRITON_GEMM"
TRITON_VARIANTS = ("vendor", "fused")  # in preference order: a tie in a measurement keeps vendor
STATIC_VARIANT = "vendor"
_TRITON_IMPLS = {
    "lora_linear_fwd": {"vendor": lambda *a: _rk().lora_fwd(*a), "fused": lambda *a: _tk().lora_fwd(*a)},
    "lora_linear_bwd": {"vendor": lambda *a: _rk().lora_bwd(*a), "fused": lambda *a: _tk().lora_bwd(*a)},
}


def triton_gemm_setting() -> str:
    """``PYFASTPEFT_TRITON_GEMM``: ``"vendor"``, ``"fused"`` or ``"auto"`` (unset); read on every call."""
    raw = os.environ.get(TRITON_GEMM_ENV, "").strip().lower() or "auto"
    if raw not in ("auto",) + TRITON_VARIANTS:
        raise ValueError(f"{TRITON_GEMM_ENV} must be one of vendor, fused, auto (or unset), "
                         f"got {os.environ.get(TRITON_GEMM_ENV)!r}")
    return raw


def triton_variant(op: str, device: torch.device, args: tuple, *, measure: bool) -> tuple[str, str]:
    """Which implementation the ``triton`` backend runs for this call of ``op``, and how that was decided.

    Pinned by ``PYFASTPEFT_TRITON_GEMM``; else on a GPU measured once per (GPU, op, dtype, shape bucket) and
    remembered (``core/tune.py``, op key ``<op>:triton``; ``measure=False`` only looks the decision up);
    else the static default, ``vendor``."""
    setting = triton_gemm_setting()
    if setting != "auto":
        return setting, f"pinned by {TRITON_GEMM_ENV}={setting}"
    from pyfastpeft.core import tune

    if not tune.hooks.measurable_device(device):
        return STATIC_VARIANT, "static default; variants are measured on a GPU only"
    if not tune.enabled():
        return STATIC_VARIANT, "PYFASTPEFT_TUNE=0: static default, nothing measured"
    key, impls = f"{op}:triton", _TRITON_IMPLS[op]
    if measure and tune.allowed(device):
        m = tune.choose(key, device, args, TRITON_VARIANTS, lambda n: (lambda: impls[n](*args)))
    else:
        m = tune.lookup(key, device, args, TRITON_VARIANTS)
    if m is not None:
        return m.chosen, m.describe()
    if measure:
        return STATIC_VARIANT, "not measured here (torch.compile tracing or CUDA graph capture): static default"
    return STATIC_VARIANT, f"not measured yet: the first call on this GPU times {', '.join(TRITON_VARIANTS)}"


def _triton_run(op: str, args: tuple):
    variant, how = triton_variant(op, args[0].device, args, measure=True)
    _note_variant(op, variant, how)
    return _TRITON_IMPLS[op][variant](*args)


def _triton_fwd(*args):
    return _triton_run("lora_linear_fwd", args)


def _triton_bwd(*args):
    return _triton_run("lora_linear_bwd", args)


def _variant_of(op: str):
    return lambda device, *args, measure=False: triton_variant(op, device, args, measure=measure)


_CUDA_OPS = ("lora_shrink", "lora_expand_add_")


def _cuda_available(ops: tuple[str, ...] = _CUDA_OPS) -> bool:
    return all(_ext.has_op(op) for op in ops)


def _cuda_supports(t: Tensor, ops: tuple[str, ...] = _CUDA_OPS) -> Optional[str]:
    """None if the ``pyfastpeft._C`` kernels ``ops`` take ``t``'s dtype and passed their twin check on its GPU."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {t.dtype} (pyfastpeft._C LoRA kernels take fp32, fp16, bf16)"
    from pyfastpeft.core.twin import cuda_ops_ok
    from pyfastpeft.lora.twin import TWIN_CHECKS

    return cuda_ops_ok(ops, t.device, TWIN_CHECKS)


def _cuda_fwd(x, x_lora, weight, bias, lora_a, lora_b, scale):
    C = torch.ops.pyfastpeft_C
    y = F.linear(x, weight, bias)  # cuBLAS
    u = C.lora_shrink(x if x_lora is None else x_lora, lora_a)
    C.lora_expand_add_(y, u, lora_b, scale)  # y += scale · u Bᵀ, in place on the fresh y
    return y, u


def _cuda_bwd(dy, x_lora, u, weight, lora_a, lora_b, scale, dx_mode):
    C = torch.ops.pyfastpeft_C
    db = torch.mm(dy.t(), u).mul_(scale)
    if x_lora.dim() == 1 and dx_mode == 0:  # A frozen and no dx: dB only
        return dy.new_empty((0,)), dy.new_empty((0,)), dy.new_empty((0,)), db
    g = C.lora_shrink(dy, lora_b.t().contiguous())  # dy B  (M, R); Bᵀ is a tiny (R, N) copy
    da = dy.new_empty((0,)) if x_lora.dim() == 1 else torch.mm(g.t(), x_lora).mul_(scale)
    if dx_mode == 0:
        return dy.new_empty((0,)), dy.new_empty((0,)), da, db
    at = lora_a.t().contiguous()  # (K, R)
    dx = torch.mm(dy, weight)
    if dx_mode == 1:
        C.lora_expand_add_(dx, g, at, scale)
        return dx, dy.new_empty((0,)), da, db
    dxl = torch.zeros_like(dx)
    C.lora_expand_add_(dxl, g, at, scale)
    return dx, dxl, da, db


FWD.register(Backend("torch", _fallback.fwd, devices=lambda: ("cpu", "cuda")))
BWD.register(Backend("torch", _fallback.bwd, devices=lambda: ("cpu", "cuda")))
FWD.register(Backend("triton", _triton_fwd, devices=_triton_devices, available=_triton_available,
                     supports=_triton_supports_fwd, why_unavailable=_triton_why,
                     variant=_variant_of("lora_linear_fwd")))
BWD.register(Backend("triton", _triton_bwd, devices=_triton_devices, available=_triton_available,
                     supports=_triton_supports_bwd, why_unavailable=_triton_why,
                     variant=_variant_of("lora_linear_bwd")))
FWD.register(Backend("cuda", _cuda_fwd, devices=lambda: ("cuda",), available=_cuda_available,
                     supports=lambda x, *a: _cuda_supports(x), why_unavailable=_ext.why_unavailable))
BWD.register(Backend("cuda", _cuda_bwd, devices=lambda: ("cuda",), available=_cuda_available,
                     supports=lambda dy, *a: _cuda_supports(dy), why_unavailable=_ext.why_unavailable))


# --------------------------------------------------------------------------------------------- primitives
@torch.library.custom_op("pyfastpeft::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                    lora_b: Tensor, scale: float, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Primitive forward on 2-D ``x (M, K)``: returns ``(y (M, N), u (M, R))``, computed in the inputs' dtype
    with autocast off (the public function has cast them to the autocast dtype: ``pyfastpeft.core.amp``)."""
    with autocast_off(x.device.type):
        impl = FWD.select(x.device, x, x_lora, weight, bias, lora_a, lora_b, scale, backend=backend)
        return impl.fn(x, x_lora, weight, bias, lora_a, lora_b, scale)


@lora_linear_fwd.register_fake
def _(x, x_lora, weight, bias, lora_a, lora_b, scale, backend=None):
    M = x.shape[0]
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_a.shape[0]))


@torch.library.custom_op("pyfastpeft::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x_lora: Tensor, u: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                    scale: float, dx_mode: int, backend: Optional[str] = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Primitive backward: ``(dx, dx_lora, dA, dB)``; see ``pyfastpeft.lora.torch_impl``. An ``x_lora`` of
    shape ``(0,)`` skips ``dA`` (returned as ``(0,)``: A frozen, as PSOFT's). Autocast off, as the forward."""
    with autocast_off(dy.device.type):
        impl = BWD.select(dy.device, dy, x_lora, u, weight, lora_a, lora_b, scale, dx_mode, backend=backend)
        return impl.fn(dy, x_lora, u, weight, lora_a, lora_b, scale, dx_mode)


@lora_linear_bwd.register_fake
def _(dy, x_lora, u, weight, lora_a, lora_b, scale, dx_mode, backend=None):
    M, K = dy.shape[0], weight.shape[1]
    dx = dy.new_empty((M, K) if dx_mode else (0,))
    dxl = dy.new_empty((M, K) if dx_mode == 2 else (0,))
    return dx, dxl, dy.new_empty((0,) if x_lora.dim() == 1 else lora_a.shape), dy.new_empty(lora_b.shape)


class LoRALinearFn(torch.autograd.Function):
    """Autograd glue on 2-D inputs. ``x_lora`` is None (no dropout) or ``dropout(x)``. The backward runs
    under the autocast state of the forward (as ``torch.amp.custom_fwd`` / ``custom_bwd``)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scale, backend):
        ctx.autocast = autocast_state(x.device.type)
        y, u = torch.ops.pyfastpeft.lora_linear_fwd(x, x_lora, weight, bias, lora_a, lora_b, scale, backend)
        ctx.has_xl = x_lora is not None
        ctx.scale, ctx.backend = scale, backend
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]
        # save only what backward reads: x_lora (or x) for dA and u for dB; W, A, B are parameters
        ctx.save_for_backward(x if x_lora is None else x_lora, u, weight, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, dy):
        with autocast_as(ctx.autocast):
            return LoRALinearFn._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x_lora, u, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xl = ctx.needs_input_grad[0], ctx.has_xl and ctx.needs_input_grad[1]
        if ctx.has_xl:
            dx_mode = 2 if need_xl else (3 if need_x else 0)
        else:
            dx_mode = 1 if need_x else 0
        # mode 3 (dropout, only the base path needs dx) is mode 2 with the lora part dropped
        dx, dxl, da, db = torch.ops.pyfastpeft.lora_linear_bwd(
            dy.contiguous(), x_lora, u, weight, lora_a, lora_b, ctx.scale, min(dx_mode, 2), ctx.backend)
        dbias = dy.sum(0) if ctx.bias_grad else None
        return (dx if need_x else None, dxl if need_xl else None, None, dbias,
                da if ctx.needs_input_grad[4] else None, db if ctx.needs_input_grad[5] else None, None, None)


# --------------------------------------------------------------------------------------------- public API






def validate_lora_args(x, weight, bias, lora_a, lora_b, scale, dropout_p) -> float:
    """Clear errors naming the argument and what was expected (shared with the gated variant); returns
    ``scale`` as a float (a Python number or a 0-d tensor; symbolic under ``torch.compile``).

    Dtypes: outside autocast ``weight`` must have x's dtype (a frozen base weight in another dtype would be a
    silent copy of the whole matrix at every call); ``bias``, ``lora_a`` and ``lora_b`` may be any floating
    dtype and are cast to the compute dtype (gradients flow back in theirs), as PEFT's
    ``autocast_adapter_dtype`` keeps fp32 adapters on a 16-bit model."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have a last dimension of size in_features, got a 0-D tensor")
    check_tensor("weight", weight, 2)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x.shape[-1] must equal weight.shape[1] (in_features={K}), got x of shape {tuple(x.shape)}")
    check_tensor("lora_a", lora_a, 2)
    check_tensor("lora_b", lora_b, 2)
    R = lora_a.shape[0]
    if R < 1:
        raise ValueError(f"lora_a must have rank >= 1 rows, got shape {tuple(lora_a.shape)}")
    if lora_a.shape[1] != K:
        raise ValueError(f"lora_a must have shape (r, {K}) (in_features={K}), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (N, R):
        raise ValueError(f"lora_b must have shape ({N}, {R}) = (out_features, r), got {tuple(lora_b.shape)}")
    check_bias(bias, N)
    check_same_device(x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    if weight.dtype != x.dtype and not autocast_on(x.device.type):
        raise ValueError(f"weight dtype {weight.dtype} must match x dtype {x.dtype} (or run under autocast)")
    if weight.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): LoRA trains only lora_a and lora_b")
    # a number or a 0-d tensor, finite; a traced (symbolic) scale is checked in eager mode only
    scale = check_scalar("scale", scale)
    p = check_scalar("dropout_p", dropout_p)  # a number or a 0-d tensor
    if not isinstance(p, (torch.SymFloat, Tensor)) and not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return scale






def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
                *, dropout_p: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """LoRA linear layer: ``y = x Wᵀ + b + scale · dropout(x) Aᵀ Bᵀ`` with the base weight frozen.

    Args:
        x: ``(..., K)`` input, any leading dims, any strides.
        weight: ``(N, K)`` frozen base weight (``requires_grad=False``), same dtype as x.
        bias: ``(N,)`` or None; it may require grad (its gradient is ``dy.sum(0)``).
        lora_a: ``(R, K)``; lora_b: ``(N, R)``. Cast to the compute dtype (gradients flow back in theirs).
        scale: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA): a finite Python number or a 0-d tensor (read
            as a number: no gradient flows to it). NaN or inf raises ``ValueError``.
        dropout_p: dropout probability on the input of A only, as PEFT; applied whenever ``> 0`` (a module
            passes 0 in eval mode).
        backend: ``"cuda" | "triton" | "torch" | None`` (auto). A forced backend that cannot run raises
            :class:`pyfastpeft.BackendUnavailable`.

    Returns:
        ``(..., N)`` in the compute dtype (x's, or the autocast dtype). Kernels accumulate in fp32.

    Autocast: inside ``torch.autocast(device, dtype)`` the op computes as PEFT's layer there: x, the weight,
    the bias and the adapters are cast to ``dtype`` (fp64 x stays fp64, as ``nn.Linear``), every GEMM runs
    in it with fp32 accumulation, the output is ``dtype``, and the backward runs under the forward's
    autocast state whatever the state at ``backward()``; gradients reach the leaves in their own dtypes.

    Non-finite x: the forward is row-local on every backend. A NaN in token row ``i`` of ``x`` makes row
    ``i`` of ``y`` NaN and leaves every other row as it would be without it; an inf makes row ``i``
    non-finite with the same pattern of inf and NaN on every backend (the signs of the products decide it).
    The backward is not row-local: the row reaches ``dA`` and ``dB`` through their sums over tokens.

    Example:
        >>> import torch, pyfastpeft as pfp
        >>> x, w = torch.randn(4, 8), torch.randn(6, 8)
        >>> a, b = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
        >>> pfp.lora_linear(x, w, None, a, b, 0.5).shape
        torch.Size([4, 6])
    """
    scale = validate_lora_args(x, weight, bias, lora_a, lora_b, scale, dropout_p)
    dt = compute_dtype(x)
    K, N = weight.shape[1], weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.to(dt).reshape(-1, K)
    x_lora = F.dropout(x2, float(dropout_p), training=True) if dropout_p > 0 else None
    y = LoRALinearFn.apply(x2, x_lora, weight.to(dt), None if bias is None else bias.to(dt), lora_a.to(dt),
                           lora_b.to(dt), float(scale), backend)
    return y.reshape(*lead, N)


def explain_args(x, weight, bias, lora_a, lora_b, scale, *, dropout_p=0.0, backend=None):
    """Map public arguments to the forward primitive's (for ``pfp.explain``)."""
    x2 = x.reshape(-1, x.shape[-1])
    return FWD, x.device, (x2, None, weight, bias, lora_a, lora_b, float(scale)), backend


# --------------------------------------------------------------------------------------------- cost model


def _fused_fwd_launches(x, x_lora, weight, bias, lora_a):
    """The fused Triton forward: its grid (128 x 128 tiles, ``tiles_per_prog`` N tiles per program) and the
    x / W panels it re-reads once they leave L2."""
    from pyfastpeft.triton_kernels.lora._lora_linear_cost import fwd_cost, tiles_per_prog

    (M, K), N, R, s = x.shape, weight.shape[0], lora_a.shape[0], x.element_size()
    c = fwd_cost(M, N, K, R, s, has_bias=bias is not None, has_xl=x_lora is not None)
    rows, groups = cdiv(M, 128), cdiv(cdiv(N, 128), tiles_per_prog(M, N, 128, 128))
    reread = l2_reread(rows, groups, 128 * K * s, tiles_per_prog(M, N, 128, 128) * 128 * K * s, group_m=8)
    return [launch("triton:lora_fwd", c, x.dtype, ctas=rows * groups, reread=reread)]


def _fwd_cost(args, kwargs, outputs):
    """Launches of the Triton forward (the GPU fast path), for ``pfp.perf.count``: the variant that runs when
    nothing was measured (``vendor``), or the one ``PYFASTPEFT_TRITON_GEMM`` pins."""
    x, x_lora, weight, bias, lora_a = args[:5]
    if triton_gemm_setting() == "fused":
        return _fused_fwd_launches(x, x_lora, weight, bias, lora_a)
    from pyfastpeft.triton_kernels.lora import _lora_rank_cost as rc

    (M, K), N, R, s = x.shape, weight.shape[0], lora_a.shape[0], x.element_size()
    bm = rc.config("fp32" if x.dtype == torch.float32 else "16", R)["fwd"][0]
    # the rank-r kernel writes y; cuBLAS reads it back as its C operand (counted in its bytes), adds x Wᵀ
    return [launch("triton:lora_rank_fwd", rc.rank_fwd_cost(M, N, K, R, s, has_bias=bias is not None), x.dtype,
                   ctas=cdiv(M, bm)),
            launch("cublas:addmm(C=y)", rc.cublas_addmm_cost(M, N, K, s), x.dtype)]


# matmul_tn's tile shapes (BLOCK_P, BLOCK_Q) per dtype class (its shipped configs): the model takes the one
# with the most CTAs, the autotuner's best case for a reduction this small in P or Q
_TN_TILES = {"16": ((128, 64), (64, 128), (64, 64), (128, 128)), "fp32": ((128, 128), (64, 128), (32, 64))}


def _tn_launch(name, M, P, Q, dtype, s, selected=None):
    """``matmul_tn`` reducing over M (or the ``selected`` rows), with its grid and L2 re-reads (gated LoRA too).
    The grid is the output tiles times the slices of M the launcher splits the reduction into
    (``tn_split``, so that it fills every SM); the partials' traffic is in ``tn_cost``."""
    from pyfastpeft.triton_kernels.lora._lora_linear_cost import tn_cost, tn_split

    bp, bq = max(_TN_TILES["16" if dtype in (torch.float16, torch.bfloat16) else "fp32"],
                 key=lambda t: cdiv(P, t[0]) * cdiv(Q, t[1]))
    rows = M if selected is None else selected
    split = tn_split(M, P, Q, bp, bq)
    reread = l2_reread(cdiv(P, bp), cdiv(Q, bq), rows * bp * s, rows * bq * s)
    return launch(name, tn_cost(M, P, Q, s, selected=selected, split=split), dtype,
                  ctas=cdiv(P, bp) * cdiv(Q, bq) * split, reread=reread)


def _dx_grid(M, N, K, s, dx_mode):
    """CTAs and L2 re-reads of ``_lora_bwd_dx_kernel`` (128 x 64 tiles, ``tiles_per_prog`` K tiles a program)."""
    from pyfastpeft.triton_kernels.lora._lora_linear_cost import tiles_per_prog

    tiles = tiles_per_prog(M, K, 128, 64)
    rows, groups = cdiv(M, 128), (cdiv(cdiv(K, 64), tiles) if dx_mode else 1)
    reread = l2_reread(rows, groups, 128 * N * s, tiles * 64 * N * s, group_m=8) if dx_mode else 0
    return rows * groups, reread


def _fused_bwd_launches(dy, x_lora, weight, lora_a, dx_mode):
    """The fused dx kernel and the weight-gradient GEMMs (``matmul_tn``, no ``dA`` when ``A`` is frozen)."""
    from pyfastpeft.triton_kernels.lora._lora_linear_cost import bwd_dx_cost

    (M, N), K, R, s = dy.shape, weight.shape[1], lora_a.shape[0], dy.element_size()
    out = []
    if dx_mode or x_lora.dim() != 1:  # the dx kernel also computes g, which dA needs
        ctas, reread = _dx_grid(M, N, K, s, dx_mode)
        out.append(launch("triton:lora_bwd_dx", bwd_dx_cost(M, N, K, R, s, dx_mode=dx_mode), dy.dtype,
                          ctas=ctas, reread=reread))
    if x_lora.dim() != 1:
        out.append(_tn_launch("triton:matmul_tn(dA)", M, R, K, dy.dtype, s))
    return out + [_tn_launch("triton:matmul_tn(dB)", M, N, R, dy.dtype, s)]


def _bwd_cost(args, kwargs, outputs):
    """Launches of the Triton backward, as :func:`_fwd_cost` picks the variant. ``vendor``: one pass over dy
    (g and dB partials), one pass over x_lora (g summed from its partials; dA partials, g A into dx), one
    reduction of the dB and dA partials, then cuBLAS adds dy W onto dx (C operand) or writes it apart
    (dropout). ``fused``: the fused dx kernel and the two weight-gradient GEMMs. An ``x_lora`` of shape
    ``(0,)`` (A frozen, PSOFT) has no dA."""
    dy, x_lora, u, weight, lora_a = args[:5]
    dx_mode = args[7]
    if triton_gemm_setting() == "fused":
        return _fused_bwd_launches(dy, x_lora, weight, lora_a, dx_mode)
    from pyfastpeft.triton_kernels.lora import _lora_rank_cost as rc

    (M, N), K, R, s = dy.shape, weight.shape[1], lora_a.shape[0], dy.element_size()
    cfg = rc.config("fp32" if dy.dtype == torch.float32 else "16", R)
    bm, bn = cfg["dy"][:2]
    sp_dy = rc.split_counts(M, N, bm, bn, rc.H100_SMS, rc.DY_WEIGHTS)
    bm, bk = cfg["x"][:2]
    sp_x = rc.split_counts(M, K, bm, bk, rc.H100_SMS, rc.X_WEIGHTS)
    out = [launch("triton:lora_rank_bwd_dy", rc.rank_bwd_dy_cost(M, N, R, s, split=sp_dy, block_n=bn), dy.dtype,
                  ctas=sp_dy[0] * sp_dy[1])]
    frozen_a = x_lora.dim() == 1  # A frozen (PSOFT): no dA; the x pass only writes g A, without reading x
    if dx_mode or not frozen_a:
        out.append(launch("triton:lora_rank_bwd_x", rc.rank_bwd_x_cost(M, K, R, s, split=sp_x, g_parts=sp_dy[1],
                                                                      dx=dx_mode != 0, da=not frozen_a),
                          dy.dtype, ctas=sp_x[0] * sp_x[1]))
    parts = ((sp_dy[0], N, R),) if frozen_a else ((sp_dy[0], N, R), (sp_x[0], R, K))
    out.append(launch("triton:lora_rank_reduce(dB,dA)", rc.reduce_cost(s, *parts), dy.dtype, tensor_core=False))
    if dx_mode == 1:
        out.append(launch("cublas:addmm(C=dx)", rc.cublas_addmm_cost(M, K, N, s), dy.dtype))
    elif dx_mode == 2:
        out.append(launch("cublas:mm(dx)", rc.cublas_addmm_cost(M, K, N, s, beta=False), dy.dtype))
    return out


# declared costs, registered by the performance model (pfp.perf) when it is imported
COSTS = {
    "pyfastpeft::lora_linear_fwd": _fwd_cost,
    "pyfastpeft::lora_linear_bwd": _bwd_cost,
}
