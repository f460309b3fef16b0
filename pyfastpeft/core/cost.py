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
        ctas: the launch's grid size (thread blocks), when known. The model credits a launch of fewer
            CTAs than the GPU has SMs with only that share of the SMs' FLOP rate and bandwidth. None (every
            aten op, i.e. cuBLAS / cuDNN / PyTorch kernels): the whole GPU.
        reread: HBM bytes read again beyond ``bytes`` because a tile left L2 before its next use
            (:func:`l2_reread`); ``bytes`` stays the unique bytes the launch touches.
    """

    name: str
    flops: int
    bytes: int
    dtype: Optional[torch.dtype] = None
    tensor_core: bool = False
    phase: str = "fwd"
    kind: str = "custom"
    ctas: Optional[int] = None
    reread: int = 0


def launch(name: str, cost: dict, dtype: torch.dtype, tensor_core: bool = True, *, ctas: Optional[int] = None,
           reread: int = 0) -> Launch:
    """A :class:`Launch` from a declared cost dict (``flops``, ``read``, ``write``); fp16/bf16 launches
    with ``tensor_core`` run at the tensor-core peak. ``ctas``: the grid size; ``reread``: HBM bytes read
    again after L2 evicted them (see :class:`Launch`)."""
    return Launch(name, cost["flops"], cost["read"] + cost["write"], dtype,
                  tensor_core=tensor_core and dtype in _HALF, kind="custom", ctas=ctas, reread=int(reread))


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


H100_SMS = 132
H100_L2_BYTES = 50 * 2 ** 20


def grid_order(num_m: int, num_n: int, group_m: Optional[int] = None):
    """The (row tile, column tile) of each program in launch order: row-grouped as the Triton kernels'
    ``_grouped_pid`` (``group_m`` row tiles sweep the columns together), or, with ``group_m=None``, a 2-D grid
    ``(num_m, num_n)`` whose first axis varies fastest (CUDA's ``blockIdx.x`` order)."""
    total = num_m * num_n
    for pid in range(total):
        if group_m is None:
            yield pid % num_m, pid // num_m
            continue
        in_group = group_m * num_n
        first = (pid // in_group) * group_m
        size = min(num_m - first, group_m)
        yield first + (pid % in_group) % size, (pid % in_group) // size


def l2_reread(num_m: int, num_n: int, row_bytes: int, col_bytes: int, *, group_m: Optional[int] = None,
              sms: int = H100_SMS, l2_bytes: int = H100_L2_BYTES) -> int:
    """HBM bytes a GEMM-like launch reads again because a tile's operand panel left L2 (a MODEL).

    Program ``(i, j)`` reads row panel ``i`` (``row_bytes``: e.g. ``BLOCK_M x K`` of x) and column panel ``j``
    (``col_bytes``). Programs run in launch order (:func:`grid_order`) in waves of ``sms`` at once. Within a
    wave the programs advance through K together, so a panel shared in the wave is read from HBM once. Across
    waves a panel is found in L2 only if it is still among the most recently used ``l2_bytes`` of panels (an
    LRU at panel granularity). Returns the bytes read beyond one read of every panel (0 when everything is
    reused)."""
    if num_m <= 0 or num_n <= 0:
        return 0
    from collections import OrderedDict

    lru: "OrderedDict[tuple, int]" = OrderedDict()
    held, loaded = 0, 0
    order = list(grid_order(num_m, num_n, group_m))
    for w0 in range(0, len(order), max(1, sms)):
        wave: dict[tuple, int] = {}
        for i, j in order[w0:w0 + sms]:
            wave[("r", i)] = row_bytes
            wave[("c", j)] = col_bytes
        for key, nbytes in wave.items():
            if key in lru:
                lru.move_to_end(key)
                continue
            loaded += nbytes
            lru[key] = nbytes
            held += nbytes
            while held > l2_bytes and len(lru) > 1:
                _, b = lru.popitem(last=False)
                held -= b
    return loaded - num_m * row_bytes - num_n * col_bytes


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (tile and program counts)."""
    return -(-a // b)
