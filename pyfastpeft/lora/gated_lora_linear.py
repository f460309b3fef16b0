"""Token-selective LoRA (TS-PEFT) with a learnable threshold: ``docs/token_selective.md``.

    y_i = W x_i + b + S_i · scale · B A dropout(x)_i,   S_i = [‖m_i‖ / max(‖W x_i‖, ε) ≥ max(τ, 0[, t_p])]

Shapes as ``lora_linear``; ``tau`` is a floating tensor holding one value, 0-dim or shape ``(1,)``
(learnable; the layer's is ``(1,)`` so that FSDP2 can shard it), passed on to the backends as 0-dim.
``tau=None`` is dense LoRA on ``lora_linear``'s kernels. Saved for backward: ``x_lora`` (x itself without dropout), ``u (M, R)``,
``ratio (M,)`` and ``selected (M,)``, plus ``x`` for ``gate_grad="full"`` with dropout: nothing of size
``M × N``. The τ gradient is a scale-free triangle-window surrogate (half-width ``gate_width · σ``, ``σ`` the
larger of the mean ratio and the threshold); the clamp ``max(τ, 0)`` and a budget's floor (``target_fraction``:
the batch's ``(1 − p)`` ratio quantile) are straight-through (see ``pyfastpeft.lora.reference``).

Backends: ``triton`` (``pyfastpeft.triton_kernels.lora.gated_lora_linear``: the row norms of the frozen output in
the base GEMM's epilogue, the expand on selected rows only, the selected-rows backward in the LoRA dx kernel)
``cuda`` (cuBLAS plus ``pyfastpeft._C``'s shrink, gate with stable compaction and gathered expand; see
``csrc/lora/gated.cu``; its backward is the torch one) and ``torch`` (``pyfastpeft.lora.torch_gated``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfastpeft.core.cost import launch
from pyfastpeft.core.backend import Backend, OpRegistry
from pyfastpeft.core.checks import check_scalar, check_finite_tensor, compute_dtype
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.lora import torch_gated as _fallback
from pyfastpeft.core.amp import autocast_as, autocast_off, autocast_state
from pyfastpeft.lora.gate import effective_threshold, gram as _gram
from pyfastpeft.core import ext as _ext
from pyfastpeft.lora.lora_linear import (_ORDER, VENDOR_ORDER, _cuda_available, _cuda_supports, _triton_available,
                                       _triton_devices, _triton_why, launch, lora_linear, validate_lora_args)

FWD = OpRegistry("gated_lora_linear_fwd", public="gated_lora_linear", order=_ORDER, vendor_order=VENDOR_ORDER)
BWD = OpRegistry("gated_lora_linear_bwd", public="gated_lora_linear", order=_ORDER, vendor_order=VENDOR_ORDER)
FWD.register(Backend("torch", _fallback.fwd, devices=lambda: ("cpu", "cuda")))
BWD.register(Backend("torch", _fallback.bwd, devices=lambda: ("cpu", "cuda")))


def _gk():
    from pyfastpeft.triton_kernels.lora import gated_lora_linear as gk  # lazy: decorating kernels imports triton

    return gk


def _triton_fwd(x, x_lora, weight, bias, lora_a, lora_b, scale, tau, target_fraction=None):
    if x.shape[0] == 0 or weight.shape[0] == 0:  # nothing to launch: the torch contract handles empty shapes
        return _fallback.fwd(x, x_lora, weight, bias, lora_a, lora_b, scale, tau, target_fraction)
    return _gk().gated_fwd(x, x_lora, weight, bias, lora_a, lora_b, scale, tau, target_fraction)


FWD.register(Backend("triton", _triton_fwd, devices=_triton_devices, available=_triton_available,
                     supports=lambda x, xl, w, b, a, *_: _gk().supports(x.dtype, a.shape[0]),
                     why_unavailable=_triton_why))
BWD.register(Backend("triton", lambda *a: _gk().gated_bwd(*a), devices=_triton_devices, available=_triton_available,
                     supports=lambda dy, x, xl, u, r, s, w, a, *_: _gk().supports(dy.dtype, a.shape[0]),
                     why_unavailable=_triton_why))

# cuda: cuBLAS (through ATen) for the base GEMM, pyfastpeft._C for the shrink, the gate with the stable
# compaction and the gathered expand. The row norms of h are one ATen reduction over h (cuBLAS has no
# epilogue for them) and the bias a second pass: the Triton path folds both into its GEMM. The backward is
# the torch one (cuBLAS GEMMs; the rank-r pieces are small GEMMs there too).
_CUDA_OPS = ("lora_shrink", "gated_gate", "gated_expand_add_")


def _cuda_fwd(x, x_lora, weight, bias, lora_a, lora_b, scale, tau, target_fraction=None):
    C = torch.ops.pyfastpeft_C
    h = torch.mm(x, weight.t())
    u = C.lora_shrink(x if x_lora is None else x_lora, lora_a)
    hsq = torch.linalg.vector_norm(h, dim=1, dtype=torch.float32).square_()[None]  # (1, M)
    gram = _gram(lora_b)  # fp32 even under autocast (gated_gate takes an fp32 Gram)
    thr = tau.detach().float().reshape(()).clamp(min=0)
    ratio, selected, index, count = C.gated_gate(u, gram, hsq, thr, scale)
    if target_fraction is not None and x.shape[0] > 0:
        # the budget's threshold max(τ, 0, t_p) needs the batch's ratios: a second gate launch (M·R² work, the
        # same ratios) selects and compacts against it; t_p stays on the device (torch.kthvalue)
        thr = effective_threshold(ratio, tau, target_fraction, torch.float32)
        ratio, selected, index, count = C.gated_gate(u, gram, hsq, thr, scale)
    if bias is not None:
        h += bias
    C.gated_expand_add_(h, u, lora_b, index, count, scale)
    return h, u, ratio, selected, thr


FWD.register(Backend("cuda", _cuda_fwd, devices=lambda: ("cuda",), available=lambda: _cuda_available(_CUDA_OPS),
                     supports=lambda x, *a: _cuda_supports(x, _CUDA_OPS), why_unavailable=_ext.why_unavailable))
BWD.register(Backend("cuda", _fallback.bwd, devices=lambda: ("cuda",), available=lambda: _cuda_available(_CUDA_OPS),
                     supports=lambda dy, *a: _cuda_supports(dy, _CUDA_OPS), why_unavailable=_ext.why_unavailable))

GATE_GRADS = ("threshold", "full")


@torch.library.custom_op("pyfastpeft::gated_lora_linear_fwd", mutates_args=())
def gated_lora_linear_fwd(x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                          lora_a: Tensor, lora_b: Tensor, scale: float, tau: Tensor,
                          backend: Optional[str] = None, target_fraction: Optional[float] = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Primitive forward on 2-D x: ``(y (M, N), u (M, R), ratio (M,) fp32 (fp64 for fp64 x), selected (M,) bool,
    thr ())``, ``thr`` the threshold used (``max(τ, 0)``; with a budget ``max(τ, 0, t_p)``, ``t_p`` the batch's
    ``(1 − p)`` ratio quantile), in the inputs' dtype with autocast off (``pyfastpeft.core.amp``)."""
    with autocast_off(x.device.type):
        impl = FWD.select(x.device, x, x_lora, weight, bias, lora_a, lora_b, scale, tau, backend=backend)
        return impl.fn(x, x_lora, weight, bias, lora_a, lora_b, scale, tau, target_fraction)


@gated_lora_linear_fwd.register_fake
def _(x, x_lora, weight, bias, lora_a, lora_b, scale, tau, backend=None, target_fraction=None):
    M = x.shape[0]
    return (x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_a.shape[0])),
            x.new_empty((M,), dtype=acc_dtype(x.dtype)),
            x.new_empty((M,), dtype=torch.bool), x.new_empty((), dtype=acc_dtype(x.dtype)))


@torch.library.custom_op("pyfastpeft::gated_lora_linear_bwd", mutates_args=())
def gated_lora_linear_bwd(dy: Tensor, x: Tensor, x_lora: Tensor, u: Tensor, ratio: Tensor, selected: Tensor,
                          weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, tau: Tensor,
                          gate_width: float, full: bool, dx_mode: int, backend: Optional[str] = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Primitive backward: ``(dx, dx_lora, dA, dB, dtau)``; see ``pyfastpeft.lora.torch_gated``. ``tau`` is the
    forward's threshold ``thr`` (the window's centre); ``dtau`` is the gradient with respect to it. Autocast off."""
    args = (dy, x, x_lora, u, ratio, selected, weight, lora_a, lora_b, scale, tau, gate_width, full, dx_mode)
    with autocast_off(dy.device.type):
        impl = BWD.select(dy.device, *args, backend=backend)
        return impl.fn(*args)


@gated_lora_linear_bwd.register_fake
def _(dy, x, x_lora, u, ratio, selected, weight, lora_a, lora_b, scale, tau, gate_width, full, dx_mode,
      backend=None):
    M, K = dy.shape[0], weight.shape[1]
    return (dy.new_empty((M, K) if dx_mode else (0,)), dy.new_empty((M, K) if dx_mode == 2 else (0,)),
            dy.new_empty(lora_a.shape), dy.new_empty(lora_b.shape), tau.new_empty(()))


class GatedLoRALinearFn(torch.autograd.Function):
    """Autograd glue on 2-D inputs; returns ``(y, selected, ratio, thr)`` (the last three not differentiable).
    ``thr``, the threshold the forward used, is the surrogate's centre; its gradient reaches ``tau`` straight
    through (the clamp at 0 and the budget's floor are identities in the backward). The backward runs under
    the autocast state of the forward (as ``torch.amp.custom_fwd`` / ``custom_bwd``)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, tau, scale, gate_width, full, backend,
                target_fraction=None):
        ctx.autocast = autocast_state(x.device.type)
        y, u, ratio, selected, thr = torch.ops.pyfastpeft.gated_lora_linear_fwd(
            x, x_lora, weight, bias, lora_a, lora_b, scale, tau, backend, target_fraction)
        ctx.tau_meta = (tau.dtype, tau.shape)
        ctx.has_xl, ctx.scale, ctx.gate_width, ctx.full, ctx.backend = x_lora is not None, scale, gate_width, full, backend
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]
        xl = x if x_lora is None else x_lora
        # x itself is needed only to recompute ‖h_i‖ on window rows in "full" mode with dropout
        ctx.save_for_backward(x if (full and x_lora is not None) else xl, xl, u, ratio, selected, weight, lora_a,
                              lora_b, thr)
        ctx.mark_non_differentiable(ratio, selected, thr)
        ctx.set_materialize_grads(False)  # no zero gradients for the non-differentiable outputs
        return y, selected, ratio, thr

    @staticmethod
    def backward(ctx, dy, _dsel, _dratio, _dthr):
        with autocast_as(ctx.autocast):
            return GatedLoRALinearFn._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, xl, u, ratio, selected, weight, lora_a, lora_b, thr = ctx.saved_tensors
        if dy is None:  # y did not reach the loss
            return (None,) * 12
        need_x, need_xl = ctx.needs_input_grad[0], ctx.has_xl and ctx.needs_input_grad[1]
        dx_mode = (2 if (need_x or need_xl) else 0) if ctx.has_xl else (1 if need_x else 0)
        dx, dxl, da, db, dtau = torch.ops.pyfastpeft.gated_lora_linear_bwd(
            dy.contiguous(), x, xl, u, ratio, selected, weight, lora_a, lora_b, ctx.scale, thr, ctx.gate_width,
            ctx.full, dx_mode, ctx.backend)
        dbias = dy.sum(0) if ctx.bias_grad else None
        return (dx if need_x else None, dxl if need_xl else None, None, dbias,
                da if ctx.needs_input_grad[4] else None, db if ctx.needs_input_grad[5] else None,
                dtau.to(ctx.tau_meta[0]).reshape(ctx.tau_meta[1]) if ctx.needs_input_grad[6] else None,
                None, None, None, None, None)


def check_target_fraction(target_fraction) -> Optional[float]:
    """``None`` or a number in (0, 1]; anything else raises ``ValueError`` naming ``target_fraction``."""
    if target_fraction is None:
        return None
    msg = f"target_fraction must be None or a number in (0, 1] (the fraction of tokens to select), got {target_fraction!r}"
    try:
        p = check_scalar("target_fraction", target_fraction)  # a number or a 0-d tensor, finite
    except ValueError:
        raise ValueError(msg) from None
    if isinstance(p, (torch.SymFloat, Tensor)):
        return p
    if not 0.0 < p <= 1.0:
        raise ValueError(msg)
    return p


def _validate_gate(tau, gate_width, gate_grad, x) -> None:
    if not isinstance(tau, Tensor) or tau.dim() > 1 or tau.numel() != 1 or not tau.is_floating_point():
        raise ValueError(f"tau must be a floating tensor of shape () or (1,) (or None for dense LoRA), got "
                         f"{type(tau).__name__ if not isinstance(tau, Tensor) else f'shape {tuple(tau.shape)} {tau.dtype}'}")
    if tau.device != x.device:
        raise ValueError(f"tau is on {tau.device} but x is on {x.device}: all tensors must share a device")
    check_finite_tensor("tau", tau)  # NaN / inf: one answer on every backend (eager only: it reads tau back)
    width = check_scalar("gate_width", gate_width)  # a number or a 0-d tensor, finite
    if not isinstance(width, (torch.SymFloat, Tensor)) and not width > 0:
        raise ValueError(f"gate_width must be a number > 0, got {gate_width!r}")
    if gate_grad not in GATE_GRADS:
        raise ValueError(f"gate_grad must be one of {GATE_GRADS}, got {gate_grad!r}")


def gated_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                      scale: float, tau: Optional[Tensor], *, gate_width: float = 1.0, gate_grad: str = "threshold",
                      dropout_p: float = 0.0, return_gate: bool = False, backend: Optional[str] = None,
                      target_fraction: Optional[float] = None):
    """Token-selective LoRA linear (TS-PEFT): LoRA only on tokens whose update is large enough.

    Args:
        x, weight, bias, lora_a, lora_b, scale, dropout_p, backend: as :func:`pyfastpeft.lora_linear`.
        tau: floating tensor of shape ``()`` or ``(1,)``, the learnable threshold (clamped at 0 in the forward); ``None`` = dense LoRA.
        gate_width: relative half-width ``T`` of the triangle surrogate window (> 0): the window is
            ``|r_i − t| < T · σ``, ``σ = max(mean ratio, t)`` (scale-free; ``docs/token_selective.md`` §2).
        target_fraction: ``None``, or a budget ``p`` in (0, 1]: the threshold becomes ``max(τ, 0, t_p)``, ``t_p``
            the ``(1 − p)`` quantile of this call's token ratios (on the device, no host sync), so that
            ``round(p · M)`` tokens are selected (more only on exact ties). The selection then depends on the
            whole batch: this is the training-time mode of ``GatedLoRALinear(target_fraction=p)``.
        gate_grad: ``"threshold"`` (only τ gets the surrogate) or ``"full"`` (also through ``r_i``).
        return_gate: also return ``selected (M,) bool`` and ``ratio (M,) fp32`` over flattened tokens.

    Returns:
        ``y (..., N)``, or ``(y, selected, ratio)`` with ``return_gate=True``.

    ``tau`` must be finite (NaN or inf raises ``ValueError``, as a non-finite ``scale``); it may have any
    floating dtype (the comparison runs in fp32, fp64 for fp64 x). Under ``torch.autocast`` the op computes as
    :func:`pyfastpeft.lora_linear` does (GEMMs in the autocast dtype, ``y`` in it) while the norms, the ratios,
    the Gram matrix ``BᵀB``, the comparison and the τ gradient stay fp32; ``tau`` is not cast.

    Non-finite x (every backend alike): a NaN in token row ``i`` of ``x`` makes row ``i`` of ``y`` NaN and
    leaves the other rows as they would be without it. A token whose ratio ``r_i`` is NaN (a NaN or inf in its
    row) is never selected (``NaN ≥ τ`` is false) and its ``ratio`` is reported NaN; the output of an unselected
    token is exactly ``W x_i + b`` (the update is not added, not even as ``0 · m_i``), so an inf in ``x_i``
    gives the same inf / NaN pattern in ``y_i`` on every backend. The backward is not row-local: such a row
    makes ``dτ`` NaN (its window weight is NaN) and can reach ``dA`` / ``dB``.
    """
    y, selected, ratio, _ = _gated_lora_linear(x, weight, bias, lora_a, lora_b, scale, tau, gate_width=gate_width,
                                               gate_grad=gate_grad, dropout_p=dropout_p, backend=backend,
                                               target_fraction=target_fraction)
    return (y, selected, ratio) if return_gate else y


def _gated_lora_linear(x, weight, bias, lora_a, lora_b, scale, tau, *, gate_width, gate_grad, dropout_p, backend,
                       target_fraction):
    """``(y, selected, ratio, thr)``; ``thr`` (0-dim, detached) the threshold the forward used (``None`` without
    a gate)."""
    scale = validate_lora_args(x, weight, bias, lora_a, lora_b, scale, dropout_p)
    target_fraction = check_target_fraction(target_fraction)
    if tau is None:
        if gate_grad not in GATE_GRADS:
            raise ValueError(f"gate_grad must be one of {GATE_GRADS}, got {gate_grad!r}")
        if target_fraction is not None:
            raise ValueError("target_fraction needs a gate: pass a tau tensor (tau=None is dense LoRA)")
        y = lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=dropout_p, backend=backend)
        M = math.prod(x.shape[:-1])  # every token is selected; ratio is not computed for dense LoRA
        return (y, torch.ones(M, dtype=torch.bool, device=x.device),
                torch.zeros(M, dtype=torch.float32, device=x.device), None)
    _validate_gate(tau, gate_width, gate_grad, x)
    dt = compute_dtype(x)
    N, K = weight.shape
    lead = x.shape[:-1]
    x2 = x.to(dt).reshape(-1, K)
    x_lora = F.dropout(x2, float(dropout_p), training=True) if dropout_p > 0 else None
    y, selected, ratio, thr = GatedLoRALinearFn.apply(
        x2, x_lora, weight.to(dt), None if bias is None else bias.to(dt), lora_a.to(dt), lora_b.to(dt),
        tau.reshape(()),
        float(scale), float(gate_width), gate_grad == "full", backend, target_fraction)
    return y.reshape(*lead, N), selected, ratio, thr


def explain_args(x, weight, bias, lora_a, lora_b, scale, tau, *, backend=None, **_):
    x2 = x.reshape(-1, x.shape[-1])
    return FWD, x.device, (x2, None, weight, bias, lora_a, lora_b, float(scale), tau), backend


# --------------------------------------------------------------------------------------------- cost model
# On the meta device the selection is unknown: the modeled selected fraction is a setting (default 1.0).
_MODEL = {"selected_fraction": 1.0}


@contextlib.contextmanager
def modeled_selection(fraction: float):
    """``pfp.perf.count`` models gated layers with this fraction of tokens selected (meta tensors carry no
    values, so the gate cannot be evaluated)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    old, _MODEL["selected_fraction"] = _MODEL["selected_fraction"], float(fraction)
    try:
        yield
    finally:
        _MODEL["selected_fraction"] = old


def _fwd_cost(args, kwargs, outputs):
    """The Triton forward: base GEMM + shrink + row norms, the Gram of B, the one-program gate with the
    compaction, the selected-rows expand."""
    from pyfastpeft.triton_kernels.lora._gated_lora_linear_cost import (base_groups, gate_cost, gated_base_cost,
                                                                    gated_expand_cost)

    x, x_lora, weight, bias, lora_a = args[:5]
    (M, K), N, R, s = x.shape, weight.shape[0], lora_a.shape[0], x.element_size()
    sel = round(_MODEL["selected_fraction"] * M)
    groups = base_groups(M, N) if M and N else 0
    gram = dict(flops=2 * N * R * R, read=N * R * s, write=R * R * 4)
    return [launch("triton:gated_base", gated_base_cost(M, N, K, R, s, has_bias=bias is not None,
                                                        has_xl=x_lora is not None), x.dtype),
            launch("torch:Gram BᵀB", gram, torch.float32),
            launch("triton:gate + compaction", gate_cost(M, R, groups, sel, s), torch.float32),
            launch("triton:gated_expand", gated_expand_cost(M, sel, N, R, s), x.dtype)] + _budget_cost(args, kwargs, M)


def _budget_cost(args, kwargs, M):
    """With ``target_fraction``: the batch quantile (``torch.kthvalue`` over the M fp32 ratios, about a sort's
    passes, modeled as 2 reads) and the re-flagging of the rows (read M ratios, write M flags)."""
    p = kwargs.get("target_fraction", args[9] if len(args) > 9 else None)
    if p is None or not M:
        return []
    return [launch("torch:budget quantile (kthvalue)", dict(flops=M * max(1, M.bit_length()), read=8 * M, write=4),
                   torch.float32),
            launch("torch:budget flags (ratio >= t)", dict(flops=M, read=4 * M, write=M), torch.float32)]


def _bwd_cost(args, kwargs, outputs):
    """The Triton backward: the LoRA dx kernel with the selection, dA and dB reductions, the τ gradient."""
    from pyfastpeft.lora.lora_linear import _dx_grid, _tn_launch  # the same kernels, grids and re-reads
    from pyfastpeft.triton_kernels.lora._lora_linear_cost import bwd_dx_cost

    dy, x, x_lora, u = args[:4]
    weight, lora_a = args[6], args[7]
    dx_mode = args[13]
    (M, N), K, R, s = dy.shape, weight.shape[1], lora_a.shape[0], dy.element_size()
    sel = round(_MODEL["selected_fraction"] * M)
    tau_grad = dict(flops=4 * M * R, read=2 * M * R * s, write=4 * M * 2)
    ctas, reread = _dx_grid(M, N, K, s, dx_mode)
    return [launch("triton:lora_bwd_dx(sel)", bwd_dx_cost(M, N, K, R, s, dx_mode=dx_mode, has_sel=True), dy.dtype,
                   ctas=ctas, reread=reread),
            _tn_launch("triton:matmul_tn(dA)", M, R, K, dy.dtype, s, selected=sel),
            _tn_launch("triton:matmul_tn(dB)", M, N, R, dy.dtype, s, selected=sel),
            launch("torch:tau grad (M, R)", tau_grad, torch.float32)]




# declared costs, registered by the performance model (pfp.perf) when it is imported
COSTS = {
    "pyfastpeft::gated_lora_linear_fwd": _fwd_cost,
    "pyfastpeft::gated_lora_linear_bwd": _bwd_cost,
}
