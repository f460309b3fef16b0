"""Autocast inside our ops, one helper for every family (users' view: ``docs/orthogonal.md`` §7,
``docs/token_selective.md``, ``docs/atoms.md``).

Under ``torch.autocast`` the public functions cast ``x``, the frozen weight, the bias and the adapters to
the autocast dtype themselves (:func:`pyfastpeft.core.checks.compute_dtype`), so every backend receives
tensors already in the dtype it must compute in; the pieces that are fp32 on purpose (gate terms and the
Gram ``BᵀB``, Cayley solves, rotations, atom folds, calibration statistics, gradient accumulations) stay
fp32. From there on autocast must not touch anything (it would recast them to the 16-bit dtype), so:

* the primitives run their backend with autocast disabled (:func:`autocast_off`);
* the autograd Functions record the forward's autocast state and replay it in their backward
  (:func:`amp_fwd` / :func:`amp_bwd`, or :func:`autocast_state` / :func:`autocast_as` by hand): what
  ``torch.amp.custom_fwd`` / ``custom_bwd`` do, for the device of the input rather than one device type
  fixed at decoration, so a backward called inside or outside ``torch.autocast`` computes the same thing.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from pyfastpeft.core.checks import autocast_on

AutocastState = tuple[str, bool, Optional[torch.dtype]]


def autocast_off(device_type: str):
    """A context with autocast disabled for ``device_type`` (nothing to do when it is off already, or for
    devices autocast does not know, such as ``meta``)."""
    if autocast_on(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_state(device_type: str) -> AutocastState:
    """The autocast state of ``device_type`` now: ``(device_type, enabled, dtype)``."""
    on = autocast_on(device_type)
    return device_type, on, (torch.get_autocast_dtype(device_type) if on else None)


def autocast_as(state: AutocastState):
    """A context that restores ``state`` (recorded in a forward) for its backward, whatever autocast state
    ``backward()`` itself was called under."""
    device_type, on, dtype = state
    if on:
        return torch.autocast(device_type, dtype=dtype, enabled=True)
    return autocast_off(device_type)


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type
    return "cpu"


def amp_fwd(forward):
    """Decorate an autograd ``Function.forward``: records the autocast state of its first tensor's device."""

    @functools.wraps(forward)
    def wrapper(ctx, *args):
        ctx.amp_state = autocast_state(_device_type(args))
        return forward(ctx, *args)

    return wrapper


def amp_bwd(backward):
    """Decorate the matching ``Function.backward``: runs it under the forward's autocast state."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with autocast_as(ctx.amp_state):
            return backward(ctx, *grads)

    return wrapper
