"""Our custom ops on ``DTensor`` inputs (FSDP2 / tensor-parallel shards): one explicit sharding strategy.

Inside a module's forward and backward FSDP2 gives our layers full, plain tensors, so this matters only for a
call outside it, e.g. ``pfp.cayley(sharded_param)``. Every ``torch.ops.pyfastpeft`` op gets the same strategy:
every tensor input ``Replicate()`` (DTensor all-gathers a sharded one first) and every output ``Replicate()``.
The ops are not elementwise (a Cayley transform, a GEMM with a reduction over K, a gate over whole rows), so
no sharded placement would be correct without its own maths; replicating is exact and costs one gather.

``torch.distributed.tensor`` takes seconds to import, and ``import pyfastpeft`` never needs it: the strategies
are registered when it is imported (now if it already is, else by a one-shot import hook).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys
import threading

import torch

_TARGET = "torch.distributed.tensor"
_done = False
_lock = threading.Lock()


def _our_overloads():
    ns = torch.ops.pyfastpeft
    for name in dir(ns):
        packet = getattr(ns, name, None)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            for ov in packet.overloads():
                yield getattr(packet, ov)


def register_strategies() -> bool:
    """Register the all-``Replicate`` strategy for every ``torch.ops.pyfastpeft`` op (idempotent).
    Returns whether DTensor is available here."""
    global _done
    with _lock:
        if _done:
            return True
        if not torch.distributed.is_available():
            return False
        try:
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.experimental import register_sharding
        except ImportError:  # pragma: no cover - a torch without DTensor
            return False
        for op in list(_our_overloads()):
            n_out = len(op._schema.returns)

            def replicate_all(*args, _n_out=n_out, **kwargs):
                ins = [Replicate() if _is_spec(a) else None for a in args]
                return [([Replicate()] * _n_out, ins)]

            register_sharding(op)(replicate_all)
        _done = True
        return True


def _is_spec(a) -> bool:
    return type(a).__name__ == "DTensorSpec"


class _Hook(importlib.abc.MetaPathFinder):
    """Runs :func:`register_strategies` right after ``torch.distributed.tensor`` is imported, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                register_strategies()
            except Exception:  # never break the user's import; a DTensor call then fails as without us
                pass

        loader.exec_module = exec_and_register
        return spec


def is_shard(t) -> bool:
    """A parameter that does not hold its full value here: an FSDP2 ``DTensor`` outside its module's forward,
    or a DeepSpeed ZeRO-3 placeholder outside ``GatheredParameters``. No import of torch.distributed."""
    if type(t).__name__ == "DTensor":
        return True
    return is_zero3(t) and t.numel() != math.prod(t.ds_shape)


def is_zero3(t) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter (its ``.data`` is a placeholder outside ``GatheredParameters``)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def install() -> None:
    """Register now if DTensor is already imported, else when it is."""
    if _TARGET in sys.modules:
        register_strategies()
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
