"""``torch`` backend of filter-atom conv and linear layers: the contract the Triton/CUDA paths implement.

Conv2d (``docs/atoms.md`` §1-2), symmetric integer padding (the public op turns ``"same"`` and asymmetric
padding into an explicit ``F.pad`` first)::

    W' = W + ΔW,  ΔW[o,i,p,q] = Σ_j coeff[o,i,j] · D[(i,) j,p,q]          (fold: weight-sized work, fp32)
    fwd:  y = conv2d(x, W', b)                                            (ONE conv, not two)
    bwd:  dx = conv2d_input_grad(dy, W')                                  (forward's W', saved when x needs dx)
          g[n,i,j,h,w] = Σ_{o in group(i)} coeff[o,i,j] · dy[n,o,h,w]    (a grouped 1×1 conv, C_out -> C_in·m)
          dD[i,j,p,q] = Σ_{n,h,w} g[n,i,j,h,w] · x_pad[n,i,h·s+p·d,w·s+q·d]  (a depthwise weight gradient)

The full weight gradient ``dW'`` is never formed: the 1×1 contraction costs ``m / (kh·kw)`` of it and the
depthwise correlation ``C_out / (C_in/g)``-times less again. ``dD`` comes back per *local* input channel
``(C_in/g, m, kh, kw)`` summed over groups; for shared atoms ``(m, kh, kw)`` it is also summed over channels.
Saved for backward (by :mod:`pyfastpeft.atoms.ops`): ``x`` only (plus the parameters/buffers).

Linear (§3) with ``kc × kc`` channel blocks: ``y = x W'ᵀ + b``; backward ``dx = dy W'`` and
``dD[j,p,q] = Σ_{a,b} coeff[a,b,j] · dW'[a·kc+p, b·kc+q]`` with ``dW' = dyᵀ x`` (one GEMM: the cheap route
``z = x·coeff`` materialises ``m×`` the output and is left to a fused kernel).

Also here: :func:`seed_atom_conv2d`, the seed code's formulation (base conv plus a second conv with the
materialised ``ΔW``, autograd through both), a *provider* for tests and benchmarks, never a backend.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.core.dtypes import acc_dtype

_HALF = (torch.float16, torch.bfloat16)




# ----------------------------------------------------------------------------------------------- conv
def delta_conv(coeff: Tensor, atoms: Tensor, dtype: torch.dtype) -> Tensor:
    """``ΔW (C_out, C_in/g, kh, kw)`` in ``dtype`` (a matmul over m)."""
    c = coeff.to(dtype)
    a = atoms.to(dtype)
    co, ci, m = c.shape
    if a.dim() == 3:  # shared atoms: one (C_out·C_in/g, m) @ (m, kh·kw) GEMM
        return (c.reshape(co * ci, m) @ a.reshape(m, -1)).reshape(co, ci, *a.shape[-2:])
    # per-channel atoms: a batched GEMM over the local input channel
    d = torch.bmm(c.permute(1, 0, 2), a.reshape(ci, m, -1))  # (C_in/g, C_out, kh·kw)
    return d.permute(1, 0, 2).reshape(co, ci, *a.shape[-2:])


def fold_conv(weight: Tensor, coeff: Tensor, atoms: Tensor) -> Tensor:
    """``W + ΔW`` computed in fp32 (fp64 for fp64) and rounded once to ``weight.dtype``; one ``addmm`` (shared
    atoms) or ``baddbmm`` (per-channel atoms) over the weight."""
    acc = acc_dtype(weight.dtype)
    co, ci, kh, kw = weight.shape
    m = coeff.shape[-1]
    w = weight.to(acc).reshape(co * ci, kh * kw) if weight.dtype != acc else weight.reshape(co * ci, kh * kw)
    c, a = coeff.to(acc), atoms.to(acc)
    if a.dim() == 3:
        out = torch.addmm(w, c.reshape(co * ci, m), a.reshape(m, kh * kw))
    else:
        out = torch.baddbmm(w.reshape(co, ci, kh * kw).transpose(0, 1), c.transpose(0, 1),
                            a.reshape(ci, m, kh * kw)).transpose(0, 1)
    return out.reshape(co, ci, kh, kw).to(weight.dtype)


def fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], coeff: Tensor, atoms: Tensor, stride: Sequence[int],
        padding: Sequence[int], dilation: Sequence[int], groups: int) -> tuple[Tensor, Tensor]:
    """``(y, W')``: the folded weight is returned so that backward reuses it (one fold per step)."""
    w = fold_conv(weight, coeff, atoms)
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation), groups), w


def coeff_as_1x1(coeff: Tensor, groups: int) -> Tensor:
    """``coeff (C_out, C_in/g, m)`` as the weight ``(C_in·m, C_out/g, 1, 1)`` of the grouped 1×1 conv that maps
    ``dy`` to ``g``: output channel ``i·m + j`` (i global) reads ``coeff[o, i mod C_in/g, j]`` over its group."""
    co, ci, m = coeff.shape
    return coeff.reshape(groups, co // groups, ci, m).permute(0, 2, 3, 1).reshape(groups * ci * m, co // groups, 1, 1)


def contract_1x1(dy: Tensor, coeff: Tensor, groups: int) -> Tensor:
    """``g[n, i·m + j, h, w] = Σ_{o in group(i)} coeff[o, i mod C_in/g, j] · dy[n, o, h, w]`` as one GEMM per group
    on the channels-last view of ``dy`` (a grouped 1×1 ``conv2d`` takes a slow path on CPU: ~4× slower here)."""
    N, co, ho, wo = dy.shape
    _, ci, m = coeff.shape
    P = N * ho * wo
    rows = dy.permute(0, 2, 3, 1).reshape(P, co)  # a view when dy is channels_last, else one copy
    a = coeff.reshape(groups, co // groups, ci * m)
    if groups == 1:
        g = rows @ a[0]
    else:
        g = torch.bmm(rows.reshape(P, groups, co // groups).transpose(0, 1), a).transpose(0, 1).reshape(P, -1)
    return g.reshape(N, ho, wo, groups * ci * m).permute(0, 3, 1, 2)


def atom_grad_conv(dy: Tensor, x: Tensor, coeff: Tensor, kernel: Sequence[int], stride, padding, dilation,
                   groups: int, shared: bool) -> Tensor:
    """``dD`` without the full weight gradient: a grouped 1×1 conv then a depthwise weight gradient, fp32."""
    acc = acc_dtype(x.dtype)
    co, ci, m = coeff.shape
    cin = ci * groups
    dy_, x_ = dy.to(acc), x.to(acc)
    g = contract_1x1(dy_, coeff.to(acc), groups)  # (N, C_in·m, Ho, Wo), channels_last
    kh, kw = kernel
    dd = torch.ops.aten.convolution_backward(
        g, x_, torch.empty((cin * m, 1, kh, kw), dtype=acc, device=x.device).expand(cin * m, 1, kh, kw),
        None, list(stride), list(padding), list(dilation), False, [0, 0], cin, [False, True, False])[1]
    dd = dd.reshape(groups, ci, m, kh, kw).sum(0)  # per local input channel
    return dd.sum(0) if shared else dd


def bwd(dy: Tensor, x: Tensor, w_folded: Tensor, coeff: Tensor, atoms: Tensor, stride: Sequence[int],
        padding: Sequence[int], dilation: Sequence[int], groups: int, need_dx: bool,
        need_dd: bool = True) -> tuple[Tensor, Tensor]:
    """``(dx, dD)``: dx in x's dtype (an empty ``(0,)`` tensor when ``need_dx`` is false), dD in fp32 (fp64)
    of the atoms' shape (zeros when ``need_dd`` is false). ``w_folded`` is forward's ``W'`` (read only for dx;
    may be empty when ``need_dx`` is false)."""
    if need_dx:
        dx = torch.ops.aten.convolution_backward(dy, x, w_folded, None, list(stride), list(padding), list(dilation),
                                                 False, [0, 0], groups, [True, False, False])[0]
    else:
        dx = empty_out((0,), like=dy)
    if not need_dd:
        return dx, torch.zeros(atoms.shape, dtype=acc_dtype(x.dtype), device=x.device)
    kernel = tuple(atoms.shape[-2:])
    if grad_route(coeff.shape[-1], kernel[0] * kernel[1], coeff.shape[0] // groups, fewer_flops) == "weight_grad":
        dd = atom_grad_via_weight_grad(dy, x, coeff, kernel, stride, padding, dilation, groups, atoms.dim() == 3)
    else:
        dd = atom_grad_conv(dy, x, coeff, kernel, stride, padding, dilation, groups, atoms.dim() == 3)
    return dx, dd


ROUTES = ("auto", "contract", "weight_grad")


def grad_route(m: int, taps: int, cout_g: int, prefer_weight_grad) -> str:
    """``"contract"`` (1×1 contraction + depthwise correlation, no weight gradient) or ``"weight_grad"`` (the
    frozen conv's weight gradient ``dW'`` once, then ``dD = Σ coeff · dW'``, weight-sized): both are exact; auto
    picks the cheaper by ``prefer_weight_grad(m, taps, cout_g)``. ``PYFASTPEFT_ATOM_GRAD=contract|weight_grad``
    forces one (tests and benchmarks pin each)."""
    route = os.environ.get("PYFASTPEFT_ATOM_GRAD", "auto").strip().lower() or "auto"
    if route not in ROUTES:
        raise ValueError(f"PYFASTPEFT_ATOM_GRAD must be one of {ROUTES}, got {route!r}")
    if route != "auto":
        return route
    return "weight_grad" if prefer_weight_grad(m, taps, cout_g) else "contract"


def fewer_flops(m: int, taps: int, cout_g: int) -> bool:
    """CPU rule (every FLOP costs alike): the contraction route issues ``m·(C_out/g + kh·kw)`` multiply-adds per
    output pixel and input channel, the weight gradient ``kh·kw·C_out/g``. At ResNet's m = 4, C_out/g = 64 the
    contraction does 0.51x the work; at m = kh·kw (or a depthwise conv) the weight gradient is cheaper."""
    return m * (cout_g + taps) >= taps * cout_g


def atom_grad_via_weight_grad(dy, x, coeff, kernel, stride, padding, dilation, groups, shared):
    """``dD[i,j,t] = Σ_o coeff[o,i,j] · dW'[o,i,t]``, ``dW'`` the frozen conv's weight gradient (one conv)."""
    acc = acc_dtype(x.dtype)
    co, ci, m = coeff.shape
    kh, kw = kernel
    dw = torch.ops.aten.convolution_backward(
        dy, x, torch.empty((co, ci, kh, kw), dtype=x.dtype, device=x.device).expand(co, ci, kh, kw), None,
        list(stride), list(padding), list(dilation), False, [0, 0], groups, [False, True, False])[1]
    dd = torch.bmm(coeff.to(acc).permute(1, 2, 0), dw.to(acc).reshape(co, ci, kh * kw).transpose(0, 1))
    dd = dd.reshape(ci, m, kh, kw)  # per local input channel (the bmm summed over every group's outputs)
    return dd.sum(0) if shared else dd


# ----------------------------------------------------------------------------------------------- linear
def delta_linear(coeff: Tensor, atoms: Tensor, dtype: torch.dtype) -> Tensor:
    """``ΔW (N, K)`` from ``coeff (N/kc, K/kc, m)`` and ``atoms (m, kc, kc)`` in ``dtype``."""
    nb, kb, m = coeff.shape
    kc = atoms.shape[-1]
    d = coeff.to(dtype).reshape(nb * kb, m) @ atoms.to(dtype).reshape(m, kc * kc)  # (Nb·Kb, kc·kc)
    return d.reshape(nb, kb, kc, kc).permute(0, 2, 1, 3).reshape(nb * kc, kb * kc)


def fold_linear(weight: Tensor, coeff: Tensor, atoms: Tensor) -> Tensor:
    acc = acc_dtype(weight.dtype)
    return (weight.to(acc) + delta_linear(coeff, atoms, acc)).to(weight.dtype)


def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], coeff: Tensor, atoms: Tensor) -> Tensor:
    """2-D ``x (M, K)`` -> ``y (M, N)``."""
    return F.linear(x, fold_linear(weight, coeff, atoms), bias)


def linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, coeff: Tensor, atoms: Tensor,
               need_dx: bool) -> tuple[Tensor, Tensor]:
    """``(dx (M, K) or empty, dD (m, kc, kc) fp32)``."""
    dx = torch.mm(dy, fold_linear(weight, coeff, atoms)) if need_dx else empty_out((0,), like=dy)
    acc = acc_dtype(x.dtype)
    nb, kb, m = coeff.shape
    kc = atoms.shape[-1]
    dw = torch.mm(dy.t().to(acc), x.to(acc))  # (N, K)
    dd = coeff.to(acc).reshape(nb * kb, m).t() @ dw.reshape(nb, kc, kb, kc).permute(0, 2, 1, 3).reshape(nb * kb, -1)
    return dx, dd.reshape(m, kc, kc)


# ----------------------------------------------------------------------------------------------- seed provider
def seed_atom_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], coeff: Tensor, atoms: Tensor, stride=1,
                     padding=0, dilation=1, groups: int = 1) -> Tensor:
    """The seed code's formulation (our own code): ``conv(x, W, b) + conv(x, ΔW)`` with ``ΔW`` materialised by
    autograd-tracked ops, so backward runs two input gradients and the full weight gradient of ``ΔW``."""
    dw = delta_conv(coeff, atoms, x.dtype)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups) + F.conv2d(x, dw, None, stride, padding,
                                                                                  dilation, groups)
