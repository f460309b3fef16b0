"""Launch and cost plumbing: how an op declares what its GPU path costs, without loading the model.

An op module declares ``COSTS = {"pyfastpeft::<op>": fn}``; ``fn`` receives the op's arguments (meta
tensors) and returns the :class:`Launch` list of its GPU path. The performance model
(``pfp.perf``, a tool) registers those tables when it is imported, and installs :func:`count_torch`'s
counter, which a cost function calls for a path that runs PyTorch ops rather than our kernels.
Nothing here imports the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Launch:
    """One (real or modeled) kernel launch.

    Attributes:
        name: op or kernel name, e.g. ``"aten.mm"`` or ``"pyfastpeft.lora_linear_fwd:up"``.
        flops: floating-point operations (a multiply-add is 2).
        bytes: HBM bytes read plus written.
        dtype: the precision that decides which peak applies (for GEMMs: the operand dtype).
        tensor_core: True if the FLOPs run on tensor cores (GEMM/conv/attention). Only tensor-core
            launches in fp16/bf16 get the tensor-core peak in the roofline.
        phase: ``"fwd"`` or ``"bwd"``; filled in by ``pfp.perf.count``.
        kind: coarse class: ``"matmul"``, ``"conv"``, ``"attention"``, ``"pointwise"``,
            ``"reduction"``, ``"other"`` or ``"custom"``.
    """

    name: str
    flops: int
    bytes: int
    dtype: Optional[torch.dtype] = None
    tensor_core: bool = False
    phase: str = "fwd"
    kind: str = "custom"


def launch(name: str, cost: dict, dtype: torch.dtype, tensor_core: bool = True) -> Launch:
    """A :class:`Launch` from a declared cost dict (``flops``, ``read``, ``write``); fp16/bf16 launches
    with ``tensor_core`` run at the tensor-core peak."""
    return Launch(name, cost["flops"], cost["read"] + cost["write"], dtype,
                  tensor_core=tensor_core and dtype in _HALF, kind="custom")


_COUNTER: Optional[Callable[..., list]] = None


def install_counter(counter: Callable[..., list]) -> None:
    """Called by the performance model: ``counter(fn, *args)`` -> the launches of a PyTorch code path."""
    global _COUNTER
    _COUNTER = counter


def count_torch(fn: Callable, *args: Any) -> list:
    """The launches of running ``fn(*args)`` (PyTorch ops) on meta tensors, counted by the model."""
    if _COUNTER is None:
        raise RuntimeError("count_torch is used by the performance model: import pyfastpeft.tools.perf first")
    return _COUNTER(fn, *args)


def torch_path_cost(fn: Callable) -> Callable:
    """A cost function for an op whose GPU path is ``fn`` (PyTorch ops): its launches, counted op by op."""

    def cost(args, kwargs, outputs):
        return count_torch(fn, *args[:fn.__code__.co_argcount])

    return cost


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (tile and program counts)."""
    return -(-a // b)
