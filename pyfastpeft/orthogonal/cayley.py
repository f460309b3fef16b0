"""Batched Cayley transform ``R (G, b, b)`` from packed skew-symmetric generators ``v (G, b(b−1)/2)``.

Maths and PEFT's conventions: ``docs/orthogonal.md`` §1-2.

* ``method="exact"``: ``convention="minus"`` ``R = (I − Q)(I + Q)⁻¹`` (PEFT OFT's exact path) or
  ``"plus"`` ``R = (I + Q)(I − Q)⁻¹`` (PEFT PSOFT's exact path). Solved in fp32 (fp64 for fp64 ``v``) even
  for fp16/bf16 parameters.
* ``method="neumann"``: PEFT's Cayley-Neumann series with ``terms`` terms, term for term (it approximates
  the ``plus`` convention whatever ``convention`` says), with PSOFT's optional Frobenius rescale ``eps``.

Layering as every op: ``pyfastpeft::cayley_fwd`` / ``pyfastpeft::cayley_bwd`` custom ops (the registry
runs inside them, with autocast off), :class:`CayleyFn` (its backward under the forward's autocast state:
:mod:`pyfastpeft.core.amp`), and the public :func:`cayley`. Saved for backward: ``v`` and the
work-dtype ``R`` (``G·b²`` values; the exact backward needs only ``R``, the Neumann backward recomputes
the powers from ``v``).

Backends: ``triton`` (``pyfastpeft.triton_kernels.orthogonal.cayley``: the whole batch in one launch, one block per
program: exact forward ``b ≤ 128``, backward kernel ``b ≤ 64`` (two batched GEMMs from ``R`` above it),
Neumann ``b ≤ 64``), ``cuda`` (``pyfastpeft._C`` exact solve, when built), ``torch``
(``pyfastpeft.orthogonal.torch_impl``: batched LU inverse, the contract).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from pyfastpeft.core import ext as _ext
from pyfastpeft.core.checks import check_scalar
from pyfastpeft.core.cost import count_torch, launch
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.core.backend import (Backend, OpRegistry,
                                  triton_available as _triton_available,
                                  triton_devices as _triton_devices,
                                  triton_why as _triton_why)
from pyfastpeft.orthogonal import torch_impl as _fallback
from pyfastpeft.core.amp import amp_bwd, amp_fwd, autocast_off

METHODS = ("exact", "neumann")
CONVENTIONS = ("minus", "plus")
# one b×b block per program in registers (the kernels' MAX_B / MAX_B_NEUMANN, checked spill-free by the compile
# report); larger blocks use the torch/cuda path
MAX_TRITON_BLOCK = 128  # exact forward
MAX_TRITON_BLOCK_BWD = 64  # exact backward kernel (above it the triton backend runs two batched GEMMs from R)
MAX_TRITON_BLOCK_NEUMANN = 64

FWD = OpRegistry("cayley_fwd", public="cayley", order=("cuda", "triton", "torch"))
BWD = OpRegistry("cayley_bwd", public="cayley", order=("cuda", "triton", "torch"))


# --------------------------------------------------------------------------------------------- backends
def _tk():
    from pyfastpeft.triton_kernels.orthogonal import cayley as tk  # lazy: decorating kernels imports triton

    return tk


def _triton_supports(v: Tensor, block_size: int, method: str = "exact", *_a) -> Optional[str]:
    if v.dtype == torch.float64:
        return "fp64 (the Triton kernels compute in fp32; fp64 runs in torch)"
    limit = MAX_TRITON_BLOCK if method == "exact" else MAX_TRITON_BLOCK_NEUMANN
    if block_size > limit:
        return f"block_size {block_size} > {limit} for method={method!r} (one block per program in registers)"
    if block_size < 2:
        return "block_size < 2 (nothing to rotate)"
    return None


def _triton_fwd(v, block_size, method, convention, terms, eps):
    return _tk().cayley_fwd(v, block_size, method, convention, terms, eps)


def _exact_bwd_in_torch(b: int, method: str) -> bool:
    """Exact blocks above 64: the backward is two batched GEMMs from the saved R (the torch backward, on the
    GPU), so a forced ``triton`` still covers forward and backward."""
    return method == "exact" and b > MAX_TRITON_BLOCK_BWD


def _triton_bwd(dR, v, R, block_size, method, convention, terms, eps):
    if _exact_bwd_in_torch(block_size, method):
        return _fallback.cayley_bwd(dR, v, R, block_size, method, convention, terms, eps)
    return _tk().cayley_bwd(dR, v, R, block_size, method, convention, terms, eps)


def _cuda_available() -> bool:
    return _ext.has_op("cayley_exact")


def _cuda_supports(v: Tensor, block_size: int, method: str, *_a) -> Optional[str]:
    if method != "exact":
        return "the CUDA kernel is the exact solve (the Neumann series runs in Triton, one launch, or torch)"
    if v.dtype == torch.float64:
        return "fp64 (the CUDA kernel solves in fp32)"
    from pyfastpeft.core.twin import cuda_ops_ok
    from pyfastpeft.orthogonal.twin import TWIN_CHECKS

    return cuda_ops_ok(("cayley_exact",), v.device, TWIN_CHECKS)


def _cuda_fwd(v, block_size, method, convention, terms, eps):
    # the pyfastpeft._C kernel does the exact solve for 2 <= b <= 128 (one block per CUDA block, in shared
    # memory); larger blocks are a batched LU inverse that ATen runs on the GPU
    if 2 <= block_size <= 128:
        return torch.ops.pyfastpeft_C.cayley_exact(v.float().contiguous(), block_size, convention == "minus")
    return _fallback.cayley_fwd(v, block_size, method, convention, terms, eps)


FWD.register(Backend("torch", _fallback.cayley_fwd, devices=lambda: ("cpu", "cuda")))
BWD.register(Backend("torch", _fallback.cayley_bwd, devices=lambda: ("cpu", "cuda")))
FWD.register(Backend("triton", _triton_fwd, devices=_triton_devices, available=_triton_available,
                     supports=_triton_supports, why_unavailable=_triton_why))
BWD.register(Backend("triton", _triton_bwd, devices=_triton_devices, available=_triton_available,
                     supports=lambda dR, v, R, b, method, *a: _triton_supports(v, b, method),
                     why_unavailable=_triton_why))
# the exact backward needs only R (two b×b products per block): the cuda backend runs the torch one on
# the GPU (two batched GEMMs), so a forced backend="cuda" covers forward and backward
FWD.register(Backend("cuda", _cuda_fwd, devices=lambda: ("cuda",), available=_cuda_available,
                     supports=_cuda_supports, why_unavailable=_ext.why_unavailable))
BWD.register(Backend("cuda", _fallback.cayley_bwd, devices=lambda: ("cuda",), available=_cuda_available,
                     supports=lambda dR, v, R, b, method, *a: _cuda_supports(v, b, method),
                     why_unavailable=_ext.why_unavailable))


# --------------------------------------------------------------------------------------------- primitives
@torch.library.custom_op("pyfastpeft::cayley_fwd", mutates_args=())
def cayley_fwd(v: Tensor, block_size: int, method: str, convention: str, terms: int, eps: Optional[float],
               backend: Optional[str] = None) -> Tensor:
    """``R (G, b, b)`` in the work dtype (fp32; fp64 for fp64 ``v``), with autocast off (it would run the
    Neumann products and the backward's in 16 bits)."""
    with autocast_off(v.device.type):
        impl = FWD.select(v.device, v, block_size, method, convention, terms, eps, backend=backend)
        return impl.fn(v, block_size, method, convention, terms, eps)


@cayley_fwd.register_fake
def _(v, block_size, method, convention, terms, eps, backend=None):
    return v.new_empty((v.shape[0], block_size, block_size), dtype=acc_dtype(v.dtype))


@torch.library.custom_op("pyfastpeft::cayley_bwd", mutates_args=())
def cayley_bwd(dR: Tensor, v: Tensor, R: Tensor, block_size: int, method: str, convention: str, terms: int,
               eps: Optional[float], backend: Optional[str] = None) -> Tensor:
    """``dv (G, n)`` in the work dtype (autocast off, as the forward)."""
    with autocast_off(v.device.type):
        impl = BWD.select(v.device, dR, v, R, block_size, method, convention, terms, eps, backend=backend)
        return impl.fn(dR, v, R, block_size, method, convention, terms, eps)


@cayley_bwd.register_fake
def _(dR, v, R, block_size, method, convention, terms, eps, backend=None):
    return v.new_empty(v.shape, dtype=acc_dtype(v.dtype))


class CayleyFn(torch.autograd.Function):
    """``v (G, n)`` -> work-dtype ``R (G, b, b)``."""

    @staticmethod
    @amp_fwd
    def forward(ctx, v, block_size, method, convention, terms, eps, backend):
        R = torch.ops.pyfastpeft.cayley_fwd(v, block_size, method, convention, terms, eps, backend)
        ctx.args = (block_size, method, convention, terms, eps, backend)
        ctx.save_for_backward(v, R)
        return R

    @staticmethod
    @amp_bwd
    def backward(ctx, dR):
        v, R = ctx.saved_tensors
        b, method, convention, terms, eps, backend = ctx.args
        dv = torch.ops.pyfastpeft.cayley_bwd(dR.contiguous(), v, R, b, method, convention, terms, eps, backend)
        return dv.to(v.dtype), None, None, None, None, None, None


# --------------------------------------------------------------------------------------------- public API
def validate_cayley_args(v, block_size, method, convention, terms, eps, *, name: str = "v") -> None:
    """Clear errors naming the argument and what was expected (shared with OFT and PSOFT)."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if v.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{name} must be a floating tensor (fp32, fp16, bf16 or fp64), got {v.dtype}")
    n = block_size * (block_size - 1) // 2
    if v.dim() != 2 or v.shape[1] != n:
        raise ValueError(f"{name} must have shape (G, block_size*(block_size-1)/2) = (G, {n}) for block_size="
                         f"{block_size}, got {tuple(v.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if isinstance(terms, bool) or not isinstance(terms, numbers.Integral) or terms < 1:
        raise ValueError(f"terms must be an int >= 1 (Cayley-Neumann terms), got {terms!r}")
    if eps is not None:
        if method != "neumann":
            raise ValueError(f"eps (the Cayley-Neumann Frobenius rescale) applies to method='neumann' only, "
                             f"got eps={eps!r} with method={method!r}")
        if not check_scalar("eps", eps) > 0:  # a number or a 0-d tensor; NaN/inf/bool raise, naming eps
            raise ValueError(f"eps must be a positive number or None, got {eps!r}")


def cayley_work(v: Tensor, block_size: int, method: str, convention: str, terms: int, eps: Optional[float],
                backend: Optional[str]) -> Tensor:
    """Validated call returning ``R`` in the work dtype (what OFT/PSOFT rotate with)."""
    return CayleyFn.apply(v, int(block_size), method, convention, int(terms),
                          None if eps is None else float(eps), backend)


def cayley(v: Tensor, block_size: int, *, method: str = "exact", convention: str = "minus", terms: int = 5,
           eps: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """Batched Cayley transform from the packed upper triangle.

    Args:
        v: ``(G, b(b−1)/2)``: per block, the strict upper triangle of ``Q`` in the row-major order of
            ``torch.triu_indices(b, b, 1)`` (PEFT's ``oft_R.weight`` / ``psoft_R.weight`` layout).
        block_size: ``b``.
        method: ``"exact"`` (solve) or ``"neumann"`` (PEFT's Cayley-Neumann series, term for term).
        convention: exact only: ``"minus"`` ``(I − Q)(I + Q)⁻¹`` or ``"plus"`` ``(I + Q)(I − Q)⁻¹``.
            The Neumann series always approximates ``plus`` (as PEFT's), so it ignores this argument.
        terms: Neumann terms ``T ≥ 1``.
        eps: Neumann only: rescale ``Q`` per block to Frobenius norm ``eps`` when it is larger (PSOFT's
            ``cayley_neumann_eps``); ``None`` = no rescale. A positive number or 0-d tensor (NaN, inf or a
            bool raise ``ValueError`` naming ``eps``).
        backend: ``"cuda" | "triton" | "torch" | None`` (auto). A forced backend that cannot run raises.

    Returns:
        ``R (G, b, b)`` in ``v.dtype``, computed in fp32 (fp64 for fp64 ``v``). ``torch.autocast`` changes
        nothing (the same bits, forward and backward): the solve and the Neumann products never run in 16
        bits (``docs/orthogonal.md`` §7).

    Example:
        >>> import torch, pyfastpeft as pfp
        >>> R = pfp.cayley(torch.randn(4, 6) * 0.1, 4)
        >>> bool(torch.allclose(R.mT @ R, torch.eye(4).expand(4, 4, 4), atol=1e-5))
        True
    """
    validate_cayley_args(v, block_size, method, convention, terms, eps)
    return cayley_work(v, block_size, method, convention, terms, eps, backend).to(v.dtype)


def explain_args(v, block_size, *, method="exact", convention="minus", terms=5, eps=None, backend=None):
    """Map public arguments to the forward primitive's (for ``pfp.explain``)."""
    return FWD, v.device, (v, int(block_size), method, convention, int(terms), eps), backend


# --------------------------------------------------------------------------------------------- cost model
def _triton_runs(v, b: int, method: str, bwd: bool = False) -> bool:
    return _triton_supports(v, b, method) is None and not (bwd and _exact_bwd_in_torch(b, method))


def _fwd_cost(args, kwargs, outputs):
    """The GPU path's launches for ``pfp.perf.count``: the Triton kernel (one launch for the whole batch)
    where it runs; otherwise the torch path, counted op by op (blocks above the Triton limits)."""
    from pyfastpeft.triton_kernels.orthogonal._cayley_cost import cayley_fwd_cost

    v, b, method, convention, terms, eps = args[:6]
    if not _triton_runs(v, b, method):
        return count_torch(_fallback.cayley_fwd, v, b, method, convention, terms, eps)
    c = cayley_fwd_cost(v.shape[0], b, method, terms, v.element_size())
    return [launch("triton:cayley_fwd", c, torch.float32)]


def _bwd_cost(args, kwargs, outputs):
    from pyfastpeft.triton_kernels.orthogonal._cayley_cost import cayley_bwd_cost

    dR, v, R, b, method, convention, terms, eps = args[:8]
    if not _triton_runs(v, b, method, bwd=True):
        return count_torch(_fallback.cayley_bwd, dR, v, R, b, method, convention, terms, eps)
    c = cayley_bwd_cost(v.shape[0], b, method, terms, v.element_size())
    return [launch("triton:cayley_bwd", c, torch.float32)]




# declared costs, registered by the performance model (pfp.perf) when it is imported
COSTS = {
    "pyfastpeft::cayley_fwd": _fwd_cost,
    "pyfastpeft::cayley_bwd": _bwd_cost,
}
