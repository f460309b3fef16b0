"""OFT linear, block-diagonal and input-centric (OFTv2, PEFT's ``oft.Linear``): ``docs/orthogonal.md`` §3.

    R_g = cayley(Q_g)  (per block; exact ``minus``/``plus`` or PEFT's Neumann series)
    y   = x R_bd Wᵀ + bias,   R_bd = blockdiag(R_1 … R_G),  K = G · b

Shapes: ``x (..., K)``, ``weight (N, K)`` frozen, ``bias (N,)`` or None, ``oft_v (G, b(b−1)/2)`` or
``(1, b(b−1)/2)`` (``block_share``: one block repeated G times), any ``b`` dividing ``K``. No ``K × K``
matrix is built. The same ``y`` is ``x W'ᵀ + bias`` with ``W' = W R_bdᵀ``: with more tokens than output
features (``M > N``) the weight is rotated (``N·K·b`` FLOPs, one pass over ``W``), else the input. Backward on
the weight side: ``dx = dy W'`` and ``dR_g = (x_gᵀ dx_g) R_g⁻ᵀ`` from one pass over ``(x, dx)`` — the weight
gradient GEMM is never formed (``docs/orthogonal.md`` §3). Saved for backward: ``x`` and the work-dtype
``R (G, b, b)``; ``W'`` is rebuilt (``N·K`` values per layer not kept). The rotation runs in fp32 (the
adapter's dtype, as PEFT) and is rounded once to the compute dtype. Under ``torch.autocast`` the public function casts ``x``, ``weight`` and ``bias`` to the
autocast dtype, the primitives run with autocast off and the backward replays the forward's autocast state
(:mod:`pyfastpeft.core.amp`, ``docs/orthogonal.md`` §7).

Layering: the Cayley transform is its own op (:mod:`pyfastpeft.orthogonal.cayley`, batched, one launch); the
rotate + frozen GEMM is ``pyfastpeft::oft_linear_fwd/bwd``. Both backends run the big GEMMs on the vendor
library (cuBLAS / MKL via torch) and differ in the memory-bound work: ``torch``
(``pyfastpeft.orthogonal.torch_impl``: batched products, with fp32 copies of 16-bit operands) and ``triton``
(``pyfastpeft.triton_kernels.orthogonal.oft_linear``: a block-rotation kernel and a diagonal-block kernel
that read 16-bit operands once and compute in fp32). Both take every block size and pick the side by shape.
On CUDA the static default is ``triton`` (fewer bytes in the roofline model); the measured dispatch decides
where it runs. There is no ``cuda`` backend for this op (forcing it raises).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from pyfastpeft.core.cost import count_torch, launch, torch_path_cost
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.core.backend import (Backend, OpRegistry,
                                  triton_available as _triton_available,
                                  triton_devices as _triton_devices)
from pyfastpeft.orthogonal import torch_impl as _fallback
from pyfastpeft.orthogonal.cayley import cayley_work, validate_cayley_args
from pyfastpeft.core.checks import autocast_on, check_bias, check_same_device, check_tensor, compute_dtype
from pyfastpeft.core.amp import amp_bwd, amp_fwd, autocast_off

# both backends keep the GEMMs on cuBLAS; the Triton one moves fewer bytes for the rest (roofline model), so it is
# the static default on CUDA, and the measured dispatch has the last word
FWD = OpRegistry("oft_linear_fwd", public="oft_linear", vendor_order=("cuda", "triton", "torch"))
BWD = OpRegistry("oft_linear_bwd", public="oft_linear", vendor_order=("cuda", "triton", "torch"))



def _tk():
    from pyfastpeft.triton_kernels.orthogonal import oft_linear as tk  # lazy: decorating kernels imports triton

    return tk


def _triton_supports(t: Tensor, R: Tensor) -> Optional[str]:
    from pyfastpeft.triton_kernels.orthogonal._oft_cost import oft_triton_supports

    return oft_triton_supports(t.dtype, R.shape[-1])


FWD.register(Backend("torch", _fallback.oft_fwd, devices=lambda: ("cpu", "cuda")))
BWD.register(Backend("torch", _fallback.oft_bwd, devices=lambda: ("cpu", "cuda")))
FWD.register(Backend("triton", lambda *a: _tk().oft_fwd(*a), devices=_triton_devices, available=_triton_available,
                     supports=lambda x, w, b, R: _triton_supports(x, R),
                     why_unavailable=lambda: "triton is not installed (pip install triton)"))
BWD.register(Backend("triton", lambda *a: _tk().oft_bwd(*a), devices=_triton_devices, available=_triton_available,
                     supports=lambda dy, x, w, R, need_dx, orthogonal: _triton_supports(x, R),
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
def oft_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, R: Tensor, need_dx: bool, orthogonal: bool,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Primitive backward: ``(dx (M, K) or (0,), dR like R)`` (autocast off, as the forward).
    ``orthogonal``: ``R`` is an exact Cayley transform, so ``R_g⁻ᵀ = R_g`` (else a batched inverse)."""
    with autocast_off(dy.device.type):
        impl = BWD.select(dy.device, dy, x, weight, R, need_dx, orthogonal, backend=backend)
        return impl.fn(dy, x, weight, R, need_dx, orthogonal)


@oft_linear_bwd.register_fake
def _(dy, x, weight, R, need_dx, orthogonal, backend=None):
    return dy.new_empty(x.shape if need_dx else (0,)), R.new_empty(R.shape)


class OFTLinearFn(torch.autograd.Function):
    """Autograd glue on 2-D ``x``; ``R`` is the work-dtype rotation from :class:`~pyfastpeft.orthogonal.cayley.CayleyFn`."""

    @staticmethod
    @amp_fwd
    def forward(ctx, x, weight, bias, R, orthogonal, backend):
        y = torch.ops.pyfastpeft.oft_linear_fwd(x, weight, bias, R, backend)
        ctx.backend, ctx.orthogonal = backend, orthogonal
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(x, weight, R)
        return y

    @staticmethod
    @amp_bwd
    def backward(ctx, dy):
        x, weight, R = ctx.saved_tensors
        need_dx = bool(ctx.needs_input_grad[0])
        dx, dR = torch.ops.pyfastpeft.oft_linear_bwd(dy.contiguous(), x, weight, R, need_dx, ctx.orthogonal,
                                                     ctx.backend)
        dbias = dy.sum(0, dtype=acc_dtype(dy.dtype)).to(dy.dtype) if ctx.bias_grad else None
        return (dx if need_dx else None, None, dbias, dR if ctx.needs_input_grad[3] else None, None, None)


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
                          method == "exact", backend)
    return y.reshape(*lead, N)


def explain_args(x, weight, bias, oft_v, block_size, *, method="neumann", convention="minus", terms=5,
                 backend=None):
    """Map public arguments to the forward primitive's (for ``pfp.explain``)."""
    R = torch.empty((oft_v.shape[0], block_size, block_size), device=x.device, dtype=torch.float32)
    return FWD, x.device, (x.reshape(-1, x.shape[-1]), weight, bias, R), backend


# --------------------------------------------------------------------------------------------- cost model
def _on_triton(x) -> bool:
    from pyfastpeft.triton_kernels.orthogonal._oft_cost import oft_triton_supports

    # a GPU (or the model's meta tensors): the Triton backend is the static default there
    return x.device.type != "cpu" and oft_triton_supports(x.dtype, 16) is None


def _rot(name, rows, K, b, G_r, x):
    from pyfastpeft.triton_kernels.orthogonal._oft_cost import oft_rotate_cost

    c = oft_rotate_cost(rows, K, b, G_r, x.element_size(), fp16=x.dtype == torch.float16)
    return launch(f"triton:oft_rotate_{name}", c, x.dtype)


def _diag(M, K, b, x):
    from pyfastpeft.triton_kernels.orthogonal._oft_cost import diag_splits, oft_diag_cost

    S, _ = diag_splits(M, K // b, b, 132)  # the split count only sizes the partial sums (an H100's 132 SMs)
    return launch("triton:oft_diag", oft_diag_cost(M, K, b, x.element_size(), S), x.dtype)


def _fwd_cost(args, kwargs, outputs):
    """On CUDA (the Triton backend, the static default there): the rotation kernel and the vendor GEMM; elsewhere
    the torch path op by op."""
    x, weight, bias, R = args[:4]
    if not _on_triton(x):
        return torch_path_cost(_fallback.oft_fwd)(args, kwargs, outputs)
    (M, K), N, b = x.shape, weight.shape[0], R.shape[-1]
    side = _fallback.oft_weight_side(M, N)
    rot = _rot("weight" if side else "input", N if side else M, K, b, R.shape[0], x)
    return [rot] + list(count_torch(_fallback._linear, x, weight, bias))


def _bwd_cost(args, kwargs, outputs):
    dy, x, weight, R, need_dx = args[:5]
    if not _on_triton(x):
        return torch_path_cost(_fallback.oft_bwd)(args, kwargs, outputs)
    (M, K), N, b = x.shape, weight.shape[0], R.shape[-1]
    mm = count_torch(torch.mm, dy, weight)
    if need_dx and _fallback.oft_weight_side(M, N):
        orthogonal = bool(args[5])
        tail = count_torch(lambda E, R: torch.bmm(E, _fallback.inv_transpose(R, orthogonal)), R.new_empty(R.shape), R)
        return [_rot("weight", N, K, b, R.shape[0], x)] + list(mm) + [_diag(M, K, b, x)] + list(tail)
    return list(mm) + [_diag(M, K, b, x)] + ([_rot("input", M, K, b, R.shape[0], x)] if need_dx else [])


# declared costs, registered by the performance model (pfp.perf) when it is imported
COSTS = {
    "pyfastpeft::oft_linear_fwd": _fwd_cost,
    "pyfastpeft::oft_linear_bwd": _bwd_cost,
}
