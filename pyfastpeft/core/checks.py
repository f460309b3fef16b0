"""Argument checks shared by every op: errors name the argument and say what was expected."""
from __future__ import annotations

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
