"""Gram accumulation for the subtractive fit: ``G = X̃ᵀX̃`` and ``C = X̃ᵀY`` in one pass over the rows.

Maths (``docs/subtractive.md`` §1 and §5): ``x (M, K)``, ``y (M, N)``, ``X̃ = [X, 1]`` (the bias
column only when ``bias``); returns ``G (K+1, K+1)`` (symmetric, both triangles filled) and
``C (K+1, N)``. The fit adds these per batch (in fp64) and solves ``(G + λI) F = C`` once; rows are
never held. No gradient: the fit runs under ``torch.no_grad()`` (a call on inputs that require grad
raises).

Precision: inputs fp32/fp16/bf16 give fp32 ``G``, ``C``; fp64 inputs give fp64; under ``torch.autocast``
the same (the primitive runs with autocast off). Summation is blocked:
fp32 partial sums over bounded row blocks (16-bit products are exact in fp32) combined in wider
precision (the torch backend adds blocks in fp64; the Triton kernel Kahan-compensates its block sums and
adds its row splits in fp64), so the error does not grow with ``M``.

Backends (one primitive ``pyfastpeft::gram_accumulate``, a fake for ``torch.compile``):

* ``triton``: ``pyfastpeft.triton_kernels.subtractive.gram_accumulate``, one launch: each program owns one output
  tile (an upper-triangle tile of ``G`` or a tile of ``C``) and one row split; the ones column is made
  in registers (``X̃`` is never materialised); diagonal-crossing tiles are mirrored on store.
* ``torch``: ``pyfastpeft.subtractive.torch_impl`` (fp32 BLAS blocks, fp64 between blocks).
* ``cuda``: none yet (the Triton kernel is the GPU path).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyfastpeft.core.amp import autocast_off
from pyfastpeft.core.cost import launch
from pyfastpeft.core.backend import (Backend, OpRegistry,
                                  triton_available as _triton_available,
                                  triton_devices as _triton_devices)
from pyfastpeft.subtractive import torch_impl as _fallback

REG = OpRegistry("gram_accumulate", public="gram_accumulate", order=("triton", "cuda", "torch"))
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------- backends
def _tk():
    from pyfastpeft.triton_kernels.subtractive import gram_accumulate as tk  # lazy: decorating kernels imports triton

    return tk


def _triton_supports(x, y, bias):
    return _tk().supports(x.dtype)


def _triton_fwd(x, y, bias):
    return _tk().gram_fwd(x, y, bias)


REG.register(Backend("torch", _fallback.fwd, devices=lambda: ("cpu", "cuda")))
REG.register(Backend("triton", _triton_fwd, devices=_triton_devices, available=_triton_available,
                     supports=_triton_supports, why_unavailable=lambda: "triton is not installed (pip install triton)"))


# --------------------------------------------------------------------------------------------- primitive
@torch.library.custom_op("pyfastpeft::gram_accumulate", mutates_args=())
def gram_accumulate_prim(x: Tensor, y: Tensor, bias: bool, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Primitive on 2-D ``x (M, K)``, ``y (M, N)``: ``(G (K+1, K+1), C (K+1, N))``.

    Autocast is still enabled inside a custom op: it is switched off here, so that the sums stay fp32 (fp64)
    under ``torch.autocast`` whatever ops a backend uses (a bf16 ``mm`` would round ``G`` to 8 bits)."""
    impl = REG.select(x.device, x, y, bias, backend=backend)
    with autocast_off(x.device.type):
        return impl.fn(x, y, bias)


@gram_accumulate_prim.register_fake
def _(x, y, bias, backend=None):
    kb = x.shape[1] + (1 if bias else 0)
    dt = _fallback.acc_dtype(x.dtype)
    return x.new_empty((kb, kb), dtype=dt), x.new_empty((kb, y.shape[1]), dtype=dt)


# --------------------------------------------------------------------------------------------- public API
def validate_args(x, y, where: str = "gram_accumulate") -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise ValueError(f"{where}: {name} must be a floating tensor (fp32, fp16, bf16 or fp64), got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    if x.dtype != y.dtype:
        raise ValueError(f"{where}: y dtype {y.dtype} must match x dtype {x.dtype}")
    if x.device != y.device:
        raise ValueError(f"{where}: y is on {y.device} but x is on {x.device}: both must share a device")
    if x.requires_grad or y.requires_grad:
        raise ValueError(f"{where}: has no gradient; call it under torch.no_grad() or on detached tensors")


def gram_accumulate(x: Tensor, y: Tensor, *, bias: bool = True, backend: Optional[str] = None
                    ) -> tuple[Tensor, Tensor]:
    """``G = X̃ᵀX̃`` and ``C = X̃ᵀY`` with ``X̃ = [X, 1]``, one pass over the rows.

    Args:
        x: ``(M, K)`` rows of the module's input, any strides; fp32/fp16/bf16/fp64.
        y: ``(M, N)`` rows of its output, same dtype and device.
        bias: append the ones column (``G`` and ``C`` get one more row; ``G[K, K] = M``).
        backend: ``"triton" | "torch" | None`` (auto); a forced backend that cannot run raises.

    Returns:
        ``G (K+1, K+1)`` (symmetric) and ``C (K+1, N)``; fp32 (fp64 for fp64 inputs).

    Example:
        >>> import torch, pyfastpeft.subtractive.gram_accumulate as ga
        >>> g, c = ga.gram_accumulate(torch.randn(10, 3), torch.randn(10, 2))
        >>> g.shape, c.shape, float(g[3, 3])
        (torch.Size([4, 4]), torch.Size([4, 2]), 10.0)
    """
    validate_args(x, y)
    return torch.ops.pyfastpeft.gram_accumulate(x, y, bool(bias), backend)


def explain_args(x, y, *, bias=True, backend=None):
    """Map public arguments to the primitive's (for ``pfp.explain``)."""
    return REG, x.device, (x, y, bool(bias)), backend


# --------------------------------------------------------------------------------------------- cost model
def _cost(args, kwargs, outputs):
    """Launches of the Triton path on an H100 (``pfp.perf.count``): the kernel, plus the split reduction."""
    from pyfastpeft.triton_kernels.subtractive._gram_accumulate_cost import gram_cost, split_sum_cost

    x, y, bias = args[:3]
    (M, K), N = x.shape, y.shape[1]
    c = gram_cost(M, K, N, x.element_size(), bias=bias)
    out = [launch("triton:gram_accumulate", c, x.dtype)]
    if c["splits"] > 1:
        out.append(launch("aten:sum(splits)", split_sum_cost(K, N, c["splits"], bias=bias), torch.float32))
    return out




# declared costs, registered by the performance model (pfp.perf) when it is imported
COSTS = {
    "pyfastpeft::gram_accumulate": _cost,
}
