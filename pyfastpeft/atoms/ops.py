"""Filter-atom tuning (Chen, Miao, Qiu, ICLR 2025; ``docs/atoms.md``): ``atom_conv2d`` and ``atom_linear``.

Conv2d, frozen ``W (C_out, C_in/g, kh, kw)`` and atom coefficients ``coeff (C_out, C_in/g, m)``, trainable
atoms ``D (m, kh, kw)`` (shared) or ``(C_in/g, m, kh, kw)`` (per input channel: recursive atoms, §2, are
composed outside the op by :func:`compose_atoms` and get their gradients by autograd through it)::

    y = conv2d(x, W + ΔW, b, stride, padding, dilation, groups),   ΔW[o,i] = Σ_j coeff[o,i,j] · D[(i,)j]

Linear with ``kc × kc`` channel blocks: ``y = x (W + ΔW)ᵀ + b``, ``ΔW[bo, bi] = Σ_j coeff[bo,bi,j] · D[j]``.

What runs: forward is ONE convolution (the delta folded into the weight first, weight-sized work), never the
seed code's base conv plus a second conv. Backward: ``dx`` is the conv input gradient with forward's folded
weight, and ``dD`` comes from the 1×1 contraction of ``dy`` with ``coeff`` followed by a depthwise
correlation with ``x`` (``pyfastpeft.atoms.torch_impl``), or, where that is costlier, from the frozen conv's
weight gradient contracted with ``coeff`` (both exact; ``PYFASTPEFT_ATOM_GRAD`` picks one).
Saved for backward: ``x`` (the frozen conv saves it too) and, when ``x`` needs a gradient, the folded weight
``W'`` (weight-sized, batch-independent); ``W``, ``coeff``, ``D`` are parameters/buffers.

Layering as every op: ``torch.library.custom_op`` primitives ``pyfastpeft::atom_conv2d_fwd/_bwd`` and
``pyfastpeft::atom_linear_fwd/_bwd`` (with fakes), glued by ``AtomConv2dFn`` / ``AtomLinearFn``; the backend
registries run inside the primitives.

Backends (auto order ``triton``, ``cuda``, ``torch``):
* ``triton``: the fold kernel (``W + ΔW`` in one pass) and, in backward, the atom-gradient kernel that forms
  ``g = coeff·dy`` tile by tile in registers and reduces its correlation with ``x`` straight into ``dD``
  (``pyfastpeft.triton_kernels.atoms.atoms``); the convolutions themselves are cuDNN's (through ATen). Where the
  modeled H100 cost says the frozen conv's weight gradient plus a weight-sized contraction is cheaper (m =
  kh·kw, depthwise convs), that exact route runs instead (:func:`gpu_route`, ``PYFASTPEFT_ATOM_GRAD``).
  Linear atoms: the fold kernel, and ``dD`` from register tiles of ``dyᵀx`` contracted on the fly.
* ``cuda``: ``pyfastpeft._C``'s atom-gradient kernel in backward (checked once per GPU before first use);
  fold and convs in PyTorch.
* ``torch``: ``pyfastpeft.atoms.torch_impl``, the contract.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfastpeft.core import ext as _ext
from pyfastpeft.core.amp import autocast_off
from pyfastpeft.core.cost import launch
from pyfastpeft.core.checks import FLOAT_DTYPES, autocast_on, check_same_device, check_tensor, compute_dtype
from pyfastpeft.core.dtypes import acc_dtype
from pyfastpeft.core.backend import (Backend, OpRegistry,
                                  triton_available as _triton_available,
                                  triton_devices as _triton_devices,
                                  triton_why as _triton_why)
from pyfastpeft.atoms import torch_impl as _fallback

_ORDER = ("triton", "cuda", "torch")
CONV_FWD = OpRegistry("atom_conv2d_fwd", public="atom_conv2d", order=_ORDER)
CONV_BWD = OpRegistry("atom_conv2d_bwd", public="atom_conv2d", order=_ORDER)
LIN_FWD = OpRegistry("atom_linear_fwd", public="atom_linear", order=_ORDER)
LIN_BWD = OpRegistry("atom_linear_bwd", public="atom_linear", order=_ORDER)

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------- backends
def _tk():
    from pyfastpeft.triton_kernels.atoms import atoms as tk  # lazy: decorating kernels imports triton

    return tk


def _kernel_dtype_why(t: Tensor) -> Optional[str]:
    if t.dtype not in _KERNEL_DTYPES:
        return f"dtype {t.dtype} (the atom kernels take float32, float16, bfloat16)"
    return None


def _triton_conv_fwd_supports(x, weight, bias, coeff, atoms, stride, padding, dilation, groups):
    return _kernel_dtype_why(x)


def _triton_conv_bwd_supports(dy, x, weight, coeff, atoms, stride, padding, dilation, groups, need_dx, need_dd):
    return _kernel_dtype_why(x) or _tk().atom_grad_supports(x, weight, coeff, atoms, groups)


def _triton_conv_fwd(x, weight, bias, coeff, atoms, stride, padding, dilation, groups):
    w = _tk().fold(weight, coeff, atoms)
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation), groups), w


def _conv_dx(dy, x, w, stride, padding, dilation, groups):
    return torch.ops.aten.convolution_backward(dy, x, w, None, list(stride), list(padding), list(dilation), False,
                                               [0, 0], groups, [True, False, False])[0]


def _empty_dd(x, atoms):
    return torch.zeros(atoms.shape, dtype=acc_dtype(x.dtype),
                       device=x.device)


def gpu_route(dy, x, weight, coeff, stride, padding, dilation, groups) -> str:
    """Which exact route computes dD on the fast paths: the atom-gradient kernel (``"contract"``) or the frozen
    conv's weight gradient plus a weight-sized contraction (``"weight_grad"``), by the modeled H100 cost
    (``triton_kernels/_atoms_cost.prefer_weight_grad``); ``PYFASTPEFT_ATOM_GRAD`` forces one."""
    from pyfastpeft.triton_kernels.atoms import _atoms_cost as c

    N, cin, H, W = x.shape
    cout, cin_g, m = coeff.shape
    kh, kw = weight.shape[-2:]  # atoms' kernel (the caller passes the atoms or the weight)
    ho, wo = dy.shape[-2:]
    return _fallback.grad_route(m, kh * kw, cout // groups, lambda *_: c.prefer_weight_grad(
        N, cin, H, W, cout, cin_g, kh, kw, ho, wo, m, x.element_size(), groups))


def _triton_conv_bwd(dy, x, weight, coeff, atoms, stride, padding, dilation, groups, need_dx, need_dd):
    tk = _tk()  # weight is forward's folded W' (only read for dx)
    dx = _conv_dx(dy, x, weight, stride, padding, dilation, groups) if need_dx else dy.new_empty((0,))
    if not need_dd:
        return dx, _empty_dd(x, atoms)
    if gpu_route(dy, x, atoms, coeff, stride, padding, dilation, groups) == "weight_grad":
        dd = _fallback.atom_grad_via_weight_grad(dy, x, coeff, tuple(atoms.shape[-2:]), stride, padding, dilation,
                                                 groups, atoms.dim() == 3)
    else:
        dd = tk.atom_grad(dy, x, coeff, atoms, stride, padding, dilation, groups)
    return dx, dd


def _triton_lin_fwd(x, weight, bias, coeff, atoms):
    return F.linear(x, _tk().fold_linear(weight, coeff, atoms), bias)


def _triton_lin_bwd(dy, x, weight, coeff, atoms, need_dx):
    tk = _tk()
    dx = torch.mm(dy, tk.fold_linear(weight, coeff, atoms)) if need_dx else dy.new_empty((0,))
    kc = atoms.shape[-1]
    if tk.linear_grad_supports(kc):  # dW' tiles contracted in registers: dW' never reaches HBM
        return dx, tk.atom_linear_grad(dy, x, coeff, kc)
    return dx, _fallback.linear_bwd(dy, x, weight, coeff, atoms, False)[1]


_CUDA_OPS = ("atom_grad_conv2d",)


def _cuda_available() -> bool:
    return all(_ext.has_op(op) for op in _CUDA_OPS)


def _cuda_bwd_supports(dy, x, weight, coeff, atoms, stride, padding, dilation, groups, need_dx, need_dd):
    why = _kernel_dtype_why(x)
    if why is not None:
        return why
    if coeff.shape[-1] > 16:
        return f"num_atoms {coeff.shape[-1]} > 16 (the CUDA atom-gradient kernel keeps m <= 16 in shared memory)"
    if weight.shape[-1] * weight.shape[-2] > 64:
        return f"kernel {tuple(weight.shape[-2:])} has more than 64 taps (CUDA atom-gradient kernel limit)"
    from pyfastpeft.atoms.twin import TWIN_CHECKS
    from pyfastpeft.core.twin import cuda_ops_ok

    return cuda_ops_ok(_CUDA_OPS, x.device, TWIN_CHECKS)


def _cuda_conv_bwd(dy, x, weight, coeff, atoms, stride, padding, dilation, groups, need_dx, need_dd):
    dx = _conv_dx(dy, x, weight, stride, padding, dilation, groups) if need_dx else dy.new_empty((0,))
    if not need_dd:
        return dx, _empty_dd(x, atoms)
    kh, kw = atoms.shape[-2:]
    if gpu_route(dy, x, atoms, coeff, stride, padding, dilation, groups) == "weight_grad":
        return dx, _fallback.atom_grad_via_weight_grad(dy, x, coeff, (kh, kw), stride, padding, dilation, groups,
                                                       atoms.dim() == 3)
    dd = torch.ops.pyfastpeft_C.atom_grad_conv2d(dy, x, coeff, kh, kw, list(stride), list(padding), list(dilation),
                                                 groups)  # (C_in, m, kh, kw) fp32, coeff converted once inside
    ci, m = coeff.shape[1], coeff.shape[2]
    dd = dd.reshape(groups, ci, m, kh, kw).sum(0)
    return dx, (dd.sum(0) if atoms.dim() == 3 else dd)


def _register() -> None:
    torch_dev = lambda: ("cpu", "cuda")  # noqa: E731
    CONV_FWD.register(Backend("torch", _fallback.fwd, devices=torch_dev))
    CONV_BWD.register(Backend("torch", _fallback.bwd, devices=torch_dev))
    LIN_FWD.register(Backend("torch", _fallback.linear_fwd, devices=torch_dev))
    LIN_BWD.register(Backend("torch", _fallback.linear_bwd, devices=torch_dev))
    trit = dict(devices=_triton_devices, available=_triton_available, why_unavailable=_triton_why)
    CONV_FWD.register(Backend("triton", _triton_conv_fwd, supports=_triton_conv_fwd_supports, **trit))
    CONV_BWD.register(Backend("triton", _triton_conv_bwd, supports=_triton_conv_bwd_supports, **trit))
    LIN_FWD.register(Backend("triton", _triton_lin_fwd, supports=lambda x, *a: _kernel_dtype_why(x), **trit))
    LIN_BWD.register(Backend("triton", _triton_lin_bwd, supports=lambda dy, x, *a: _kernel_dtype_why(x), **trit))
    # cuda forward: fold in PyTorch, one cuDNN conv (the hand-written kernel is the backward's atom gradient)
    CONV_FWD.register(Backend("cuda", _fallback.fwd, devices=lambda: ("cuda",), available=_cuda_available,
                              supports=lambda x, *a: _kernel_dtype_why(x), why_unavailable=_ext.why_unavailable))
    CONV_BWD.register(Backend("cuda", _cuda_conv_bwd, devices=lambda: ("cuda",), available=_cuda_available,
                              supports=_cuda_bwd_supports, why_unavailable=_ext.why_unavailable))


_register()


# --------------------------------------------------------------------------------------------- primitives
@torch.library.custom_op("pyfastpeft::atom_conv2d_fwd", mutates_args=())
def atom_conv2d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], coeff: Tensor, atoms: Tensor,
                    stride: list[int], padding: list[int], dilation: list[int], groups: int,
                    backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Primitive forward: ``(conv2d(x, W', bias), W')`` with ``W' = W + ΔW``, symmetric integer padding."""
    impl = CONV_FWD.select(x.device, x, weight, bias, coeff, atoms, stride, padding, dilation, groups,
                           backend=backend)
    with autocast_off(x.device.type):
        return impl.fn(x, weight, bias, coeff, atoms, stride, padding, dilation, groups)


@atom_conv2d_fwd.register_fake
def _(x, weight, bias, coeff, atoms, stride, padding, dilation, groups, backend=None):
    return F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups), torch.empty_like(
        weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("pyfastpeft::atom_conv2d_bwd", mutates_args=())
def atom_conv2d_bwd(dy: Tensor, x: Tensor, weight: Tensor, coeff: Tensor, atoms: Tensor, stride: list[int],
                    padding: list[int], dilation: list[int], groups: int, need_dx: bool, need_dd: bool,
                    backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Primitive backward: ``(dx or (0,), dD fp32 of atoms' shape)``; ``weight`` is forward's folded ``W'`` (read
    for dx only; any tensor when ``need_dx`` is false). See ``pyfastpeft.atoms.torch_impl``."""
    impl = CONV_BWD.select(dy.device, dy, x, weight, coeff, atoms, stride, padding, dilation, groups, need_dx,
                           need_dd, backend=backend)
    with autocast_off(dy.device.type):
        return impl.fn(dy, x, weight, coeff, atoms, stride, padding, dilation, groups, need_dx, need_dd)


@atom_conv2d_bwd.register_fake
def _(dy, x, weight, coeff, atoms, stride, padding, dilation, groups, need_dx, need_dd, backend=None):
    if need_dx:
        dx = torch.ops.aten.convolution_backward(dy, x, weight, None, list(stride), list(padding), list(dilation),
                                                 False, [0, 0], groups, [True, False, False])[0]
    else:
        dx = dy.new_empty((0,))
    return dx, atoms.new_empty(atoms.shape, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("pyfastpeft::atom_linear_fwd", mutates_args=())
def atom_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], coeff: Tensor, atoms: Tensor,
                    backend: Optional[str] = None) -> Tensor:
    """Primitive forward on 2-D ``x (M, K)``: ``x (W + ΔW)ᵀ + bias``."""
    impl = LIN_FWD.select(x.device, x, weight, bias, coeff, atoms, backend=backend)
    with autocast_off(x.device.type):
        return impl.fn(x, weight, bias, coeff, atoms)


@atom_linear_fwd.register_fake
def _(x, weight, bias, coeff, atoms, backend=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("pyfastpeft::atom_linear_bwd", mutates_args=())
def atom_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, coeff: Tensor, atoms: Tensor, need_dx: bool,
                    backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Primitive backward: ``(dx (M, K) or (0,), dD (m, kc, kc) fp32)``."""
    impl = LIN_BWD.select(dy.device, dy, x, weight, coeff, atoms, need_dx, backend=backend)
    with autocast_off(dy.device.type):
        return impl.fn(dy, x, weight, coeff, atoms, need_dx)


@atom_linear_bwd.register_fake
def _(dy, x, weight, coeff, atoms, need_dx, backend=None):
    dx = dy.new_empty((dy.shape[0], weight.shape[1]) if need_dx else (0,))
    return dx, atoms.new_empty(atoms.shape, dtype=acc_dtype(x.dtype))


class AtomConv2dFn(torch.autograd.Function):
    """Autograd glue; ``W`` and ``coeff`` never get gradients (frozen weight, frozen coefficients)."""

    @staticmethod
    def forward(ctx, x, weight, bias, coeff, atoms, stride, padding, dilation, groups, backend):
        y, w_folded = torch.ops.pyfastpeft.atom_conv2d_fwd(x, weight, bias, coeff, atoms, stride, padding, dilation,
                                                           groups, backend)
        ctx.conf = (stride, padding, dilation, groups, backend)
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        # W' (weight-sized) is kept only when dx is needed: the fold then runs once per step, not twice
        ctx.save_for_backward(x, w_folded if ctx.needs_input_grad[0] else weight, coeff, atoms)
        ctx.mark_non_differentiable(w_folded)
        ctx.set_materialize_grads(False)  # W' gets no gradient: no zero tensor of its size in backward
        return y, w_folded

    @staticmethod
    def backward(ctx, dy, _dw_folded):
        x, weight, coeff, atoms = ctx.saved_tensors
        stride, padding, dilation, groups, backend = ctx.conf
        need_dx, need_dd = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        dx = dd = None
        if dy is None:
            return (None,) * 10
        if need_dx or need_dd:
            dx, dd = torch.ops.pyfastpeft.atom_conv2d_bwd(dy, x, weight, coeff, atoms, stride, padding, dilation,
                                                          groups, need_dx, need_dd, backend)
        dbias = dy.sum((0, 2, 3)) if ctx.bias_grad else None
        return (dx if need_dx else None, None, dbias, None, dd.to(atoms.dtype) if need_dd else None,
                None, None, None, None, None)


class AtomLinearFn(torch.autograd.Function):
    """Autograd glue on 2-D inputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, coeff, atoms, backend):
        y = torch.ops.pyfastpeft.atom_linear_fwd(x, weight, bias, coeff, atoms, backend)
        ctx.backend = backend
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(x, weight, coeff, atoms)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, coeff, atoms = ctx.saved_tensors
        need_dx, need_dd = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        dx = dd = None
        if need_dx or need_dd:
            dx, dd = torch.ops.pyfastpeft.atom_linear_bwd(dy.contiguous(), x, weight, coeff, atoms, need_dx,
                                                          ctx.backend)
        dbias = dy.sum(0) if ctx.bias_grad else None
        return (dx if need_dx else None, None, dbias, None, dd.to(atoms.dtype) if need_dd else None, None)


# --------------------------------------------------------------------------------------------- public API


def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    vals = (v, v) if isinstance(v, numbers.Integral) else tuple(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool)
                                                 and a >= minimum for a in vals):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return int(vals[0]), int(vals[1])


def conv_padding(padding, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]):
    """``(pad4 or None, (ph, pw))``: ``pad4`` = ``(left, right, top, bottom)`` for an explicit ``F.pad`` when the
    padding is asymmetric (``"same"`` with an even effective kernel), else the symmetric conv padding."""
    if isinstance(padding, str):
        if padding == "valid":
            return None, (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as torch.nn.Conv2d), got stride={stride}")
        tot = [d * (k - 1) for d, k in zip(dilation, kernel)]
        lo = [t // 2 for t in tot]
        hi = [t - l for t, l in zip(tot, lo)]
        if lo == hi:
            return None, (lo[0], lo[1])
        return (lo[1], hi[1], lo[0], hi[0]), (0, 0)
    return None, _pair("padding", padding, 0)






def _check_frozen_and_placed(x, weight, bias, coeff, atoms) -> None:
    """Checks shared by both atom ops: one device, frozen weight and coefficients, weight in x's dtype."""
    check_same_device(x, weight=weight, bias=bias, coeff=coeff, atoms=atoms)
    if weight.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): atom tuning trains only the atoms")
    if coeff.requires_grad:
        raise ValueError("coeff must be frozen (requires_grad=False): the atom coefficients are fixed")
    if weight.dtype != x.dtype and not autocast_on(x.device.type):
        raise ValueError(f"weight dtype {weight.dtype} must match x dtype {x.dtype} (or run under autocast)")


def validate_conv_args(x, weight, bias, coeff, atoms, stride, padding, dilation, groups):
    """Errors name the argument and what was expected; returns normalised ``(stride, dilation)``."""
    check_tensor("x", x, 4)
    check_tensor("weight", weight, 4)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    co, ci, kh, kw = weight.shape
    cin = x.shape[1]
    if cin % groups or co % groups:
        raise ValueError(f"groups={groups} must divide in_channels={cin} and out_channels={co}")
    if ci * groups != cin:
        raise ValueError(f"weight must have shape (C_out, C_in/groups={cin // groups}, kh, kw) for x with "
                         f"C_in={cin}, got {tuple(weight.shape)}")
    check_tensor("coeff", coeff, 3)
    m = coeff.shape[-1]
    if coeff.shape[:2] != (co, ci) or m < 1:
        raise ValueError(f"coeff must have shape ({co}, {ci}, m) = (C_out, C_in/groups, num_atoms) with m >= 1, "
                         f"got {tuple(coeff.shape)}")
    check_tensor("atoms", atoms, (3, 4))
    want = [(m, kh, kw), (ci, m, kh, kw)]
    if tuple(atoms.shape) not in want:
        raise ValueError(f"atoms must have shape {want[0]} (shared) or {want[1]} (per input channel), "
                         f"got {tuple(atoms.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != co:
            raise ValueError(f"bias must have shape ({co},) (out_channels), got {tuple(bias.shape)}")
    _check_frozen_and_placed(x, weight, bias, coeff, atoms)
    return _pair("stride", stride, 1), _pair("dilation", dilation, 1)


def atom_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], coeff: Tensor, atoms: Tensor, *,
                stride: Union[int, tuple[int, int]] = 1, padding: Union[int, tuple[int, int], str] = 0,
                dilation: Union[int, tuple[int, int]] = 1, groups: int = 1, backend: Optional[str] = None) -> Tensor:
    """Filter-atom conv: ``conv2d(x, W + Σ_j coeff[..., j] · atoms[j], bias, ...)`` with ``W`` and ``coeff`` frozen.

    Args:
        x: ``(N, C_in, H, W)``, any memory format (``channels_last`` stays channels_last).
        weight: ``(C_out, C_in/groups, kh, kw)`` frozen base weight, x's dtype.
        bias: ``(C_out,)`` or None (may require grad).
        coeff: ``(C_out, C_in/groups, m)`` frozen atom coefficients (any float dtype; folded in fp32).
        atoms: ``(m, kh, kw)`` shared atoms, or ``(C_in/groups, m, kh, kw)`` per input channel (recursive atoms:
            build them with :func:`compose_atoms`, which autograd differentiates). Typically fp32 parameters.
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d``; ``padding`` also ``"same"`` /
            ``"valid"`` (asymmetric "same" padding is applied by an explicit ``F.pad``).
        backend: ``"cuda" | "triton" | "torch" | None`` (auto); a forced backend that cannot run raises.

    Returns:
        ``(N, C_out, H_out, W_out)`` in the compute dtype. The atoms' gradient comes back in their dtype.
    """
    stride, dilation = validate_conv_args(x, weight, bias, coeff, atoms, stride, padding, dilation, groups)
    pad4, pad = conv_padding(padding, tuple(weight.shape[-2:]), stride, dilation)
    dt = compute_dtype(x)
    x = x.to(dt)
    if pad4 is not None:
        x = F.pad(x, pad4)
    return AtomConv2dFn.apply(x, weight.to(dt), None if bias is None else bias.to(dt), coeff, atoms,
                              list(stride), list(pad), list(dilation), int(groups), backend)[0]


def compose_atoms(beta: Tensor, sub_atoms: Tensor) -> Tensor:
    """Recursive atoms (``docs/atoms.md`` §2): ``D[i,j] = Σ_l beta[l,j,i] · sub_atoms[l,j]``, ``(C_in/g, m, kh, kw)``.

    ``beta (m1, m, C_in/g)``, ``sub_atoms (m1, m, kh, kw)``; a tiny einsum that autograd differentiates, so the
    per-channel atom gradient of :func:`atom_conv2d` flows on to both (and to deeper levels composed the same way).
    Computed in the wider of the two dtypes (fp16 sub-atoms with fp32 coefficients give fp32 atoms) with autocast
    off: under autocast the atoms are not rounded to bf16/fp16 before the fp32 fold.
    """
    check_tensor("beta", beta, 3)
    check_tensor("sub_atoms", sub_atoms, 4)
    if beta.shape[:2] != sub_atoms.shape[:2]:
        raise ValueError(f"beta (m1, m, C_in/g) and sub_atoms (m1, m, kh, kw) must agree on (m1, m), got "
                         f"{tuple(beta.shape)} and {tuple(sub_atoms.shape)}")
    dt = torch.promote_types(beta.dtype, sub_atoms.dtype)
    with autocast_off(beta.device.type):
        return torch.einsum("lji,ljpq->ijpq", beta.to(dt), sub_atoms.to(dt))


def explain_args(x, weight, bias, coeff, atoms, *, stride=1, padding=0, dilation=1, groups=1, backend=None):
    """Map public arguments to the forward primitive's (for ``pfp.explain``)."""
    s, d = _pair("stride", stride, 1), _pair("dilation", dilation, 1)
    _, pad = conv_padding(padding, tuple(weight.shape[-2:]), s, d)
    return CONV_FWD, x.device, (x, weight, bias, coeff, atoms, list(s), list(pad), list(d), groups), backend


def validate_linear_args(x, weight, bias, coeff, atoms, block) -> None:
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a last dimension of size in_features, got a 0-D tensor")
    check_tensor("weight", weight, 2)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x.shape[-1] must equal weight.shape[1] (in_features={K}), got x of shape {tuple(x.shape)}")
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if N % block or K % block:
        raise ValueError(f"block={block} must divide both out_features={N} and in_features={K}")
    check_tensor("coeff", coeff, 3)
    m = coeff.shape[-1]
    if coeff.shape[:2] != (N // block, K // block) or m < 1:
        raise ValueError(f"coeff must have shape ({N // block}, {K // block}, m) = (N/block, K/block, num_atoms), "
                         f"got {tuple(coeff.shape)}")
    check_tensor("atoms", atoms, 3)
    if tuple(atoms.shape) != (m, block, block):
        raise ValueError(f"atoms must have shape ({m}, {block}, {block}) = (num_atoms, block, block), "
                         f"got {tuple(atoms.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape ({N},) (out_features), got {tuple(bias.shape)}")
    _check_frozen_and_placed(x, weight, bias, coeff, atoms)


def atom_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], coeff: Tensor, atoms: Tensor, *, block: int,
                backend: Optional[str] = None) -> Tensor:
    """Channel-block filter atoms on a linear layer: ``y = x (W + ΔW)ᵀ + b``, ``ΔW[bo, bi] = Σ_j coeff[bo,bi,j] D[j]``.

    Args:
        x: ``(..., K)``; weight: ``(N, K)`` frozen; bias: ``(N,)`` or None.
        coeff: ``(N/block, K/block, m)`` frozen; atoms: ``(m, block, block)`` trainable.
        block: the channel-block size ``kc``; must divide both N and K (no silent fallback).
        backend: ``"cuda" | "triton" | "torch" | None`` (auto).

    Returns:
        ``(..., N)`` in the compute dtype.
    """
    validate_linear_args(x, weight, bias, coeff, atoms, block)
    dt = compute_dtype(x)
    N, K = weight.shape
    lead = x.shape[:-1]
    y = AtomLinearFn.apply(x.to(dt).reshape(-1, K), weight.to(dt), None if bias is None else bias.to(dt), coeff,
                           atoms, backend)
    return y.reshape(*lead, N)


def explain_linear_args(x, weight, bias, coeff, atoms, *, block=None, backend=None):
    return LIN_FWD, x.device, (x.reshape(-1, x.shape[-1]), weight, bias, coeff, atoms), backend


# --------------------------------------------------------------------------------------------- cost model
def _conv_geom(x, weight, stride, padding, dilation):
    N, _, H, W = x.shape
    kh, kw = weight.shape[-2:]
    ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return N, ho, wo




def _conv_fwd_cost(args, kwargs, outputs):
    """Triton path: the fold kernel, then cuDNN's one conv."""
    from pyfastpeft.triton_kernels.atoms import _atoms_cost as c

    x, weight, bias, coeff, atoms, stride, padding, dilation, groups = args[:9]
    N, ho, wo = _conv_geom(x, weight, stride, padding, dilation)
    s = x.element_size()
    co, ci, kh, kw = weight.shape
    m = coeff.shape[-1]
    return [launch("triton:atom_fold", c.fold_cost(co, ci, kh * kw, m, s, per_channel=atoms.dim() == 4), x.dtype,
                    tensor_core=False),
            launch("cudnn:conv2d", c.conv_cost(N, x.shape[1], x.shape[2], x.shape[3], co, ci, kh, kw, ho, wo, s,
                                                has_bias=bias is not None), x.dtype)]


def _conv_bwd_cost(args, kwargs, outputs):
    """Triton path: re-fold, cuDNN's input gradient, the atom-gradient kernel (GEMM part on tensor cores, the
    depthwise correlation on SIMT units: declared as two launches)."""
    from pyfastpeft.triton_kernels.atoms import _atoms_cost as c

    dy, x, weight, coeff, atoms, stride, padding, dilation, groups, need_dx, need_dd = args[:11]
    N, ho, wo = _conv_geom(x, weight, stride, padding, dilation)
    s = x.element_size()
    co, ci, kh, kw = weight.shape
    m = coeff.shape[-1]
    out = []
    if need_dx:  # forward's W' is reused: no second fold
        out.append(launch("cudnn:conv2d_dx", c.conv_dx_cost(N, x.shape[1], x.shape[2], x.shape[3], co, ci, kh, kw,
                                                             ho, wo, s), x.dtype))
    if need_dd and gpu_route(dy, x, atoms, coeff, stride, padding, dilation, groups) == "weight_grad":
        wgrad, contract = c.weight_grad_route_cost(N, x.shape[1], x.shape[2], x.shape[3], co, ci, kh, kw, ho, wo, m, s)
        out.append(launch("cudnn:conv2d_wgrad", wgrad, x.dtype))
        out.append(launch("atom_contract(coeff . dW')", contract, x.dtype, tensor_core=False))
    elif need_dd:
        for name, cost, tc in c.atom_grad_launches(N, x.shape[1], x.shape[2], x.shape[3], co, ci, kh, kw, ho, wo, m, s,
                                                   groups):
            out.append(launch(name, cost, x.dtype, tensor_core=tc))
    return out


def _lin_fwd_cost(args, kwargs, outputs):
    from pyfastpeft.triton_kernels.atoms import _atoms_cost as c

    x, weight, bias, coeff, atoms = args[:5]
    (M, K), N, s = x.shape, weight.shape[0], x.element_size()
    return [launch("triton:atom_fold", c.fold_cost(*coeff.shape[:2], atoms.shape[-1] ** 2, coeff.shape[-1], s),
                    x.dtype, tensor_core=False),
            launch("cublas:linear", dict(flops=2 * M * N * K, read=(M * K + N * K) * s, write=M * N * s), x.dtype)]


def _lin_bwd_cost(args, kwargs, outputs):
    from pyfastpeft.triton_kernels.atoms import _atoms_cost as c

    dy, x, weight, coeff, atoms, need_dx = args[:6]
    (M, N), K, s = dy.shape, weight.shape[1], dy.element_size()
    kc = atoms.shape[-1]
    if kc <= c.LIN_BLOCK and (kc & (kc - 1)) == 0:
        out = [launch("triton:atom_linear_grad", c.linear_grad_cost(M, N, K, kc, coeff.shape[-1], s), dy.dtype)]
    else:
        out = [launch("cublas:dW", dict(flops=2 * M * N * K, read=(M * N + M * K) * s, write=N * K * 4), dy.dtype),
               launch("atom_contract(coeff . dW')", c.fold_cost(*coeff.shape[:2], kc * kc, coeff.shape[-1], 4),
                       dy.dtype, tensor_core=False)]
    if need_dx:
        out.insert(0, launch("triton:atom_fold", c.fold_cost(*coeff.shape[:2], atoms.shape[-1] ** 2,
                                                              coeff.shape[-1], s), dy.dtype, tensor_core=False))
        out.insert(1, launch("cublas:dx", dict(flops=2 * M * N * K, read=(M * N + N * K) * s, write=M * K * s),
                              dy.dtype))
    return out




# declared costs, registered by the performance model (pfp.perf) when it is imported
COSTS = {
    "pyfastpeft::atom_conv2d_fwd": _conv_fwd_cost,
    "pyfastpeft::atom_conv2d_bwd": _conv_bwd_cost,
    "pyfastpeft::atom_linear_fwd": _lin_fwd_cost,
    "pyfastpeft::atom_linear_bwd": _lin_bwd_cost,
}
