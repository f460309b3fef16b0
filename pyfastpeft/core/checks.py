"""Argument checks shared by every op: errors name the argument and say what was expected."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class InvalidArgument(ValueError, TypeError):
    """An argument of the wrong kind (e.g. not a tensor): a ``ValueError`` that is also a ``TypeError``."""


def check_tensor(name: str, t, ndim: Union[int, tuple[int, ...], None] = None) -> Tensor:
    """``t`` is a floating tensor (fp32, fp16, bf16 or fp64), with ``ndim`` dimensions (one of them, for a tuple)."""
    if not isinstance(t, Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp32, fp16, bf16 or fp64), got {t.dtype}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_bias(bias: Optional[Tensor], n: int, what: str = "out_features") -> None:
    """``bias`` is None or a floating ``(n,)`` tensor (``what`` names the dimension in the error)."""
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},) ({what}), got {tuple(bias.shape)}")


def check_same_device(x: Tensor, **tensors: Optional[Tensor]) -> None:
    """Every tensor given (None skipped) is on ``x``'s device; the error names the first that is not."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share a device")


def autocast_on(device_type: str) -> bool:
    """Autocast is enabled for this device type (it exists for real devices only: asking about "meta" raises)."""
    return device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype an op computes in: the autocast dtype when autocast is on (fp64 stays fp64), else ``x``'s."""
    if autocast_on(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def check_scalar(name: str, value) -> float:
    """A finite real number: a Python number or a 0-d (one-element) tensor, returned as a float.

    Under ``torch.compile`` a traced (symbolic) number passes unchecked: testing it would break the graph.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number, got a {value.dtype} tensor")
        if torch.compiler.is_compiling() or value.device.type == "meta" or _is_fake(value):
            return value
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if isinstance(value, (torch.SymFloat, torch.SymInt)) or torch.compiler.is_compiling():
        return value
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def check_finite_tensor(name: str, t: Optional[Tensor]) -> None:
    """Every element of ``t`` (None skipped) is finite. Reads the value back (one host sync), so it is
    skipped under ``torch.compile`` and CUDA-graph capture, where the caller's eager runs did the check."""
    if t is None or torch.compiler.is_compiling() or t.device.type == "meta" or _is_fake(t):
        return  # no values to read: tracing, or the performance model's meta tensors
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} must be finite, got {t.detach().flatten()[:4].tolist()}"
                         f"{' ...' if t.numel() > 4 else ''}")
