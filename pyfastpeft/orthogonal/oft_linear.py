"""OFT linear, block-diagonal and input-centric (OFTv2, PEFT's ``oft.Linear``): ``docs/orthogonal.md`` §3.

    R_g = cayley(Q_g)  (per block; exact ``minus``/``plus`` or PEFT's Neumann series)
    y   = x R_bd Wᵀ + bias,   R_bd = blockdiag(R_1 … R_G),  K = G · b

Shapes: ``x (..., K)``, ``weight (N, K)`` frozen, ``bias (N,)`` or None, ``oft_v (G, b(b−1)/2)`` or
``(1, b(b−1)/2)`` (``block_share``: one block repeated G times). No ``K × K`` matrix is built.
Saved for backward: ``x`` and the work-dtype ``R (G, b, b)`` (not the rotated copy of ``x``: backward
gets ``dR_g = x_gᵀ (dy W)_g`` from ``x`` itself). PEFT rotates in the adapter's dtype (fp32) and casts
back; so do we. Under ``torch.autocast`` the public function casts ``x``, ``weight`` and ``bias`` to the
autocast dtype, the primitives run with autocast off and the backward replays the forward's autocast state
(:mod:`pyfastpeft.core.amp`, ``docs/orthogonal.md`` §7).

Layering: the Cayley transform is its own op (:mod:`pyfastpeft.orthogonal.cayley`, batched, one launch); the
rotate + frozen GEMM is ``pyfastpeft::oft_linear_fwd/bwd``. Backends of the latter: ``torch``
(``pyfastpeft.orthogonal.torch_impl``, cuBLAS/MKL GEMMs and one batched product for the rotation; it
rotates W instead of x when that is cheaper, ``N < M``) and ``triton`` (``pyfastpeft.triton_kernels.orthogonal.oft_linear``:
the rotation of each ``x`` tile runs in the base GEMM's prologue, no rotated copy of ``x`` in memory; the
backward computes ``dy W`` per block and rotates it back in the epilogue while accumulating ``dR``). The
kernels run b in 16/32/64, but the backend takes b = 16 only: every N tile recomputes its rotation, which
costs more than the torch path's one batched rotation from b = 32 on (roofline model; see
``triton_kernels/orthogonal/_cayley_cost.py``). There is no ``cuda`` backend for this op (forcing it raises).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from pyfastpeft.core.cost import launch, torch_path_cost
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.core.backend import (Backend, OpRegistry,
                                  triton_available as _triton_available,
                                  triton_devices as _triton_devices)
from pyfastpeft.orthogonal import torch_impl as _fallback
from pyfastpeft.orthogonal.cayley import cayley_work, validate_cayley_args
from pyfastpeft.core.checks import autocast_on, check_bias, check_same_device, check_tensor, compute_dtype
from pyfastpeft.core.amp import amp_bwd, amp_fwd, autocast_off

# the fused Triton OFT GEMM must win a measurement on the GPU; the static default on CUDA is the cuBLAS path
FWD = OpRegistry("oft_linear_fwd", public="oft_linear", vendor_order=("cuda", "torch", "triton"))
BWD = OpRegistry("oft_linear_bwd", public="oft_linear", vendor_order=("cuda", "torch", "triton"))



def _tk():
    from pyfastpeft.triton_kernels.orthogonal import oft_linear as tk  # lazy: decorating kernels imports triton

    return tk


def _triton_supports(t: Tensor, R: Tensor) -> Optional[str]:
    from pyfastpeft.triton_kernels.orthogonal._cayley_cost import oft_triton_supports

    return oft_triton_supports(t.dtype, R.shape[-1])


FWD.register(Backend("torch", _fallback.oft_fwd, devices=lambda: ("cpu", "cuda")))
BWD.register(Backend("torch", _fallback.oft_bwd, devices=lambda: ("cpu", "cuda")))
FWD.register(Backend("triton", lambda *a: _tk().oft_fwd(*a), devices=_triton_devices, available=_triton_available,
                     supports=lambda x, w, b, R: _triton_supports(x, R),
                     why_unavailable=lambda: "triton is not installed (pip install triton)"))
BWD.register(Backend("triton", lambda *a: _tk().oft_bwd(*a), devices=_triton_devices, available=_triton_available,
                     supports=lambda dy, x, w, R, need_dx: _triton_supports(x, R),
                     why_unavailable=lambda: "triton is not installed (pip install triton)"))


@torch.library.custom_op("pyfastpeft::oft_linear_fwd", mutates_args=())
def oft_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], R: Tensor,
                   backend: Optional[str] = None) -> Tensor:
    """Primitive forward on 2-D ``x (M, K)`` with ``R (G or 1, b, b)``: returns ``y (M, N)`` in x's dtype.
    ``x``, ``weight`` and ``bias`` arrive in the compute dtype; the backend runs with autocast off."""
    with autocast_off(x.device.type):
        impl = FWD.select(x.device, x, weight, bias, R, backend=backend)
        return impl.fn(x, weight, bias, R)


@oft_linear_fwd.register_fake
def _(x, weight, bias, R, backend=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("pyfastpeft::oft_linear_bwd", mutates_args=())
def oft_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, R: Tensor, need_dx: bool,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Primitive backward: ``(dx (M, K) or (0,), dR like R)`` (autocast off, as the forward)."""
    with autocast_off(dy.device.type):
        impl = BWD.select(dy.device, dy, x, weight, R, need_dx, backend=backend)
        return impl.fn(dy, x, weight, R, need_dx)


@oft_linear_bwd.register_fake
def _(dy, x, weight, R, need_dx, backend=None):
    return dy.new_empty(x.shape if need_dx else (0,)), R.new_empty(R.shape)


class OFTLinearFn(torch.autograd.Function):
    """Autograd glue on 2-D ``x``; ``R`` is the work-dtype rotation from :class:`~pyfastpeft.orthogonal.cayley.CayleyFn`."""

    @staticmethod
    @amp_fwd
    def forward(ctx, x, weight, bias, R, backend):
        y = torch.ops.pyfastpeft.oft_linear_fwd(x, weight, bias, R, backend)
        ctx.backend = backend
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(x, weight, R)
        return y

    @staticmethod
    @amp_bwd
    def backward(ctx, dy):
        x, weight, R = ctx.saved_tensors
        need_dx = bool(ctx.needs_input_grad[0])
        dx, dR = torch.ops.pyfastpeft.oft_linear_bwd(dy.contiguous(), x, weight, R, need_dx, ctx.backend)
        dbias = dy.sum(0, dtype=acc_dtype(dy.dtype)).to(dy.dtype) if ctx.bias_grad else None
        return (dx if need_dx else None, None, dbias, dR if ctx.needs_input_grad[3] else None, None)


def validate_oft_args(x, weight, bias, oft_v, block_size, method, convention, terms) -> None:
    """Clear errors naming the argument and what was expected."""
    check_tensor("x", x)
    check_tensor("weight", weight, 2)
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x.shape[-1] must equal weight.shape[1] (in_features={K}), got x of shape {tuple(x.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if K % block_size:
        raise ValueError(f"block_size must divide in_features={K}, got block_size={block_size}")
    validate_cayley_args(oft_v, block_size, method, convention, terms, None, name="oft_v")
    G = K // block_size
    if oft_v.shape[0] not in (G, 1):
        raise ValueError(f"oft_v must have G = in_features / block_size = {G} rows (or 1 with block_share), "
                         f"got {tuple(oft_v.shape)}")
    check_bias(bias, N)
    check_same_device(x, weight=weight, bias=bias, oft_v=oft_v)
    if weight.dtype != x.dtype and not autocast_on(x.device.type):
        raise ValueError(f"weight dtype {weight.dtype} must match x dtype {x.dtype} (or run under autocast)")
    if weight.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): OFT trains only oft_v")


def _inner_backend(backend: Optional[str]) -> Optional[str]:
    # the Cayley op has its own backends (cuda / triton / torch); a layer forced to "torch" runs all-torch
    return backend if backend == "torch" else None


def oft_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], oft_v: Tensor, block_size: int, *,
               method: str = "neumann", convention: str = "minus", terms: int = 5,
               backend: Optional[str] = None) -> Tensor:
    """Block-diagonal input-centric OFT: ``y = x R_bd Wᵀ + bias`` with ``R_g = cayley(Q_g)``.

    Args:
        x: ``(..., K)`` input.
        weight: ``(N, K)`` frozen base weight (``requires_grad=False``), x's dtype (any floating dtype under
            autocast: it is cast to the autocast dtype, as ``nn.Linear``'s).
        bias: ``(N,)`` or None, any floating dtype: cast to the compute dtype (its gradient comes back in its
            own dtype).
        oft_v: ``(G, b(b−1)/2)`` packed skew generators (PEFT's ``oft_R.weight``), or ``(1, …)`` shared by
            all ``G = K / b`` blocks (``block_share``).
        block_size: ``b``, must divide K.
        method, convention, terms: as :func:`pyfastpeft.cayley`. PEFT OFT: ``neumann`` (its default) or
            ``exact`` with ``convention="minus"``.
        backend: ``"torch" | None`` (auto) for the layer op (the Cayley transform picks its own fastest).

    Returns:
        ``(..., N)`` in the compute dtype: x's, or under ``torch.autocast`` the autocast dtype (what
        ``nn.Linear`` returns there; fp64 ``x`` stays fp64). The Cayley transform and the rotation of ``x``
        run in fp32 (fp64 for fp64 inputs) whatever the compute dtype, as PEFT's adapter does; the rotated
        input is rounded to the compute dtype for the frozen GEMM; the backward's ``dR`` accumulates in fp32.
        Under autocast the backward runs under the forward's autocast state (``docs/orthogonal.md`` §7).

    Non-finite inputs: rows are independent on the forward. A NaN anywhere in row ``i`` of ``x`` makes row
    ``i`` of ``y`` NaN (the block rotation and the frozen GEMM mix every feature of the row) and leaves every
    other row untouched; a ±inf makes row ``i`` non-finite (±inf or NaN, by backend). On the backward ``dx``
    does not depend on ``x`` (it stays finite), while ``dR_g = x_gᵀ (dy W)_g`` sums over the rows: the
    gradient of each block of ``oft_v`` that the non-finite value falls in (the shared block with
    ``block_share``) is NaN — the whole block for the exact transform and Neumann ``terms >= 3``, the entries
    that involve the bad feature for ``terms <= 2``. Every backend and the reference agree on these masks.
    """
    validate_oft_args(x, weight, bias, oft_v, block_size, method, convention, terms)
    dt = compute_dtype(x)
    R = cayley_work(oft_v, block_size, method, convention, terms, None, _inner_backend(backend))
    if dt == torch.float64:
        R = R.double()
    K, N = weight.shape[1], weight.shape[0]
    lead = x.shape[:-1]
    y = OFTLinearFn.apply(x.to(dt).reshape(-1, K), weight.to(dt), None if bias is None else bias.to(dt), R,
                          backend)
    return y.reshape(*lead, N)


def explain_args(x, weight, bias, oft_v, block_size, *, method="neumann", convention="minus", terms=5,
                 backend=None):
    """Map public arguments to the forward primitive's (for ``pfp.explain``)."""
    R = torch.empty((oft_v.shape[0], block_size, block_size), device=x.device, dtype=torch.float32)
    return FWD, x.device, (x.reshape(-1, x.shape[-1]), weight, bias, R), backend


# --------------------------------------------------------------------------------------------- cost model
def _fwd_cost(args, kwargs, outputs):
    """The fused Triton forward where it runs (b in 16/32/64), else the torch path op by op."""
    from pyfastpeft.triton_kernels.orthogonal._cayley_cost import oft_fwd_cost, oft_triton_supports

    x, weight, bias, R = args[:4]
    if oft_triton_supports(x.dtype, R.shape[-1]) is not None:
        return torch_path_cost(_fallback.oft_fwd)(args, kwargs, outputs)
    (M, K), N, b = x.shape, weight.shape[0], R.shape[-1]
    c = oft_fwd_cost(M, N, K, b, R.shape[0], x.element_size(), has_bias=bias is not None)
    return [launch("triton:oft_fwd", c, x.dtype)]


def _bwd_cost(args, kwargs, outputs):
    from pyfastpeft.triton_kernels.orthogonal._cayley_cost import oft_bwd_cost, oft_triton_supports

    dy, x, weight, R, need_dx = args[:5]
    if oft_triton_supports(x.dtype, R.shape[-1]) is not None:
        return torch_path_cost(_fallback.oft_bwd)(args, kwargs, outputs)
    (M, K), N, b = x.shape, weight.shape[0], R.shape[-1]
    c = oft_bwd_cost(M, N, K, b, R.shape[0], x.element_size(), need_dx=bool(need_dx))
    return [launch("triton:oft_bwd", c, x.dtype)]




# declared costs, registered by the performance model (pfp.perf) when it is imported
COSTS = {
    "pyfastpeft::oft_linear_fwd": _fwd_cost,
    "pyfastpeft::oft_linear_bwd": _bwd_cost,
}
