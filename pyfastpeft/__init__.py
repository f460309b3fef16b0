"""pyfastpeft: fused Triton and CUDA kernels for parameter-efficient fine-tuning.

``import pyfastpeft`` never needs a GPU, a compiler, Triton or the CUDA extension: every op has a
``torch`` backend, and :func:`backend_info` / :func:`explain` say what runs where and why.

Every public op, layer and method comes from the table of families (:mod:`pyfastpeft.families`); the
tools (``pfp.perf``, the command line) load on first use.
"""
from __future__ import annotations

from pyfastpeft import _compat
from pyfastpeft.core.version import __version__

_compat.install()

import torch as _torch  # noqa: E402

from pyfastpeft import families as _families  # noqa: E402
from pyfastpeft import nn, reference, subtractive  # noqa: E402,F401
from pyfastpeft.core.backend import (ORDER, REGISTRIES, BackendUnavailable, Decision, last_backend,  # noqa: E402,F401
                                     use_backend)
from pyfastpeft.core.info import available_backends, backend_info, format_backend_info  # noqa: E402
from pyfastpeft.surgery import (disable_adapters, from_peft, inject, load_adapter, merge_and_unload,  # noqa: E402
                                save_adapter, summary, unload)

_OPS = _families.ops()
from pyfastpeft.core import dtensor as _dtensor  # noqa: E402

_dtensor.install()  # our ops on DTensor inputs: one explicit Replicate strategy (docs/distributed.md)
globals().update({name: op.fn for name, op in _OPS.items() if op.top_level})
globals().update(_families.exports())

__all__ = ["__version__", "nn", "reference", "subtractive", "perf", "backend_info", "format_backend_info", "explain",
           "available_backends", "use_backend", "last_backend", "BackendUnavailable",
           "inject", "from_peft", "merge_and_unload", "unload", "disable_adapters", "save_adapter", "load_adapter",
           "summary"]
__all__ += [name for name, op in _OPS.items() if op.top_level] + list(_families.exports())


def __getattr__(name: str):
    if name == "perf":  # the performance model is a tool: imported on first use, never by ``import pyfastpeft``
        import importlib

        return importlib.import_module("pyfastpeft.tools.perf")
    if name == "integrations":  # needs transformers: imported on first use
        import importlib

        return importlib.import_module("pyfastpeft.integrations")
    raise AttributeError(f"module 'pyfastpeft' has no attribute {name!r}")


def explain(op, *args, **kwargs) -> Decision:
    """Which backend a call ``op(*args, **kwargs)`` would use, and why each other one was skipped.

    ``op`` is a public op name (``"lora_linear"``) or the function itself. Nothing is computed.
    """
    name = getattr(op, "__name__", op)
    if name not in _OPS:
        raise ValueError(f"explain: unknown op {op!r}; known: {sorted(_OPS)}")
    reg, device, prim_args, backend = _OPS[name].explain(*args, **kwargs)
    return reg.explain(device, *prim_args, backend=backend)
