"""pyfastpeft: fused Triton and CUDA kernels for parameter-efficient fine-tuning.

``import pyfastpeft`` never needs a GPU, a compiler, Triton or the CUDA extension: every op has a
``torch`` backend, and :func:`backend_info` / :func:`explain` say what runs where and why.
"""
from __future__ import annotations

__version__ = "0.1.0"

import importlib.util as _ilu
import os as _os
import platform as _platform
from typing import Optional as _Optional

import torch as _torch

from pyfastpeft import _ext
from pyfastpeft._backend import ORDER, REGISTRIES, BackendUnavailable, Decision, last_backend, use_backend
from pyfastpeft.functional import gated_lora_linear, lora_linear
from pyfastpeft.ops import gated_lora_linear as _gated_ops
from pyfastpeft.ops import lora_linear as _lora_ops
from pyfastpeft.ops import atoms as _atom_ops
from pyfastpeft.ops.atoms import atom_conv2d, atom_linear
from pyfastpeft.ops import cayley as _cayley_ops
from pyfastpeft.ops import oft_linear as _oft_ops
from pyfastpeft.ops import psoft_linear as _psoft_ops
from pyfastpeft.ops.cayley import cayley
from pyfastpeft.ops.oft_linear import oft_linear
from pyfastpeft.ops.psoft_linear import psoft_linear
from pyfastpeft.ops import gram_accumulate as _gram_ops
from pyfastpeft import nn
from pyfastpeft.surgery import from_peft, inject, load_adapter, merge_and_unload, save_adapter, summary

# public op name -> function mapping public args to (registry, device, primitive args, backend)
_EXPLAIN = {"lora_linear": _lora_ops.explain_args, "gated_lora_linear": _gated_ops.explain_args}
_EXPLAIN.update(atom_conv2d=_atom_ops.explain_args, atom_linear=_atom_ops.explain_linear_args)
_EXPLAIN.update(cayley=_cayley_ops.explain_args, oft_linear=_oft_ops.explain_args,
                psoft_linear=_psoft_ops.explain_args)
_EXPLAIN.update(gram_accumulate=_gram_ops.explain_args)

__all__ = [
    "__version__", "lora_linear", "gated_lora_linear", "gate_loss", "nn", "perf", "backend_info", "format_backend_info", "explain",
    "available_backends", "use_backend", "last_backend", "BackendUnavailable",
]
__all__ += ["atom_conv2d", "atom_linear"]
__all__ += ["cayley", "oft_linear", "psoft_linear"]
__all__ += ["inject", "from_peft", "merge_and_unload", "save_adapter", "load_adapter", "summary"]


def __getattr__(name: str):
    # pfp.perf (measurement tools) is imported on first use: it is not needed to run ops
    if name == "perf":
        import importlib

        return importlib.import_module("pyfastpeft.perf")
    if name == "subtractive":  # SFP (fit / rank_modules), imported on first use
        import importlib

        return importlib.import_module("pyfastpeft.subtractive")
    raise AttributeError(f"module 'pyfastpeft' has no attribute {name!r}")


def gate_loss(model: _torch.nn.Module) -> _torch.Tensor:
    """Sum of ``gate_loss()`` over every gated layer of ``model`` (add ``λ ·`` this to the training loss)."""
    from pyfastpeft.nn import GatedLoRALinear

    losses = [m.gate_loss() for m in model.modules() if isinstance(m, GatedLoRALinear)]
    if not losses:
        raise ValueError("gate_loss: the model has no GatedLoRALinear layer")
    return _torch.stack(losses).sum()


def available_backends(op: str, device="cpu") -> list[str]:
    """Backends of ``op`` (public name or primitive) that are installed and run on ``device`` here."""
    reg = REGISTRIES.get(op) or REGISTRIES.get(f"{op}_fwd")
    if reg is None:
        raise ValueError(f"unknown op {op!r}; known: {sorted({r.public for r in REGISTRIES.values()})}")
    dev = _torch.device(device)
    out = []
    for name in reg.names():
        impl = reg._impls[name]
        if impl.available() and dev.type in impl.devices():
            out.append(name)
    return out


def _triton_status() -> tuple[_Optional[str], str]:
    if _ilu.find_spec("triton") is None:
        return None, "not installed"
    try:
        import triton

        ver = triton.__version__
    except Exception as e:  # a broken triton install is reported, not raised
        return None, f"import failed: {e}"
    if _os.environ.get("TRITON_INTERPRET", "0") == "1":
        return ver, "interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly"
    return ver, "compiles for CUDA tensors" + ("" if _torch.cuda.is_available() else " (no CUDA device here)")


def backend_info() -> dict:
    """What backends exist in this install, on which devices, and why not where they do not."""
    tver, tstat = _triton_status()
    _ext.load()
    cuda = _torch.cuda.is_available()
    ops = {}
    for name, reg in sorted(REGISTRIES.items()):
        rows = {}
        for b in reg.order:  # in the op's auto preference order
            impl = reg._impls.get(b)
            if impl is None:
                rows[b] = "not implemented"
            elif not impl.available():
                rows[b] = "unavailable: " + impl.why_unavailable()
            else:
                rows[b] = "available on " + "/".join(impl.devices())
        ops[name] = rows
    return {
        "pyfastpeft": __version__,
        "python": _platform.python_version(),
        "torch": _torch.__version__,
        "torch_cuda": _torch.version.cuda,
        "cuda_available": cuda,
        "devices": [_torch.cuda.get_device_name(i) for i in range(_torch.cuda.device_count())] if cuda else ["cpu"],
        "triton": tver,
        "triton_status": tstat,
        "cuda_ext": _ext.load(),
        "cuda_ext_status": "loaded" if _ext.load() else _ext.LOAD_ERROR,
        "backend_env": _os.environ.get("PYFASTPEFT_BACKEND", ""),
        "strict": _os.environ.get("PYFASTPEFT_STRICT", "0") == "1",
        "ops": ops,
    }


def format_backend_info(info: _Optional[dict] = None) -> str:
    info = info or backend_info()
    lines = [f"pyfastpeft {info['pyfastpeft']}  python {info['python']}  torch {info['torch']} "
             f"(CUDA build {info['torch_cuda']})",
             f"devices: {', '.join(info['devices'])}",
             f"triton: {info['triton'] or '-'} ({info['triton_status']})",
             f"pyfastpeft._C: {info['cuda_ext_status']}",
             f"PYFASTPEFT_BACKEND={info['backend_env'] or '(auto)'}  PYFASTPEFT_STRICT={int(info['strict'])}",
             "ops:"]
    for op, rows in info["ops"].items():
        lines.append(f"  {op}")
        for b, why in rows.items():
            lines.append(f"    {b:<7} {why}")
    return "\n".join(lines)


def explain(op, *args, **kwargs) -> Decision:
    """Which backend a call ``op(*args, **kwargs)`` would use, and why each other one was skipped.

    ``op`` is a public op name (``"lora_linear"``) or the function itself. Nothing is computed.
    """
    name = getattr(op, "__name__", op)
    if name not in _EXPLAIN:
        raise ValueError(f"explain: unknown op {op!r}; known: {sorted(_EXPLAIN)}")
    reg, device, prim_args, backend = _EXPLAIN[name](*args, **kwargs)
    return reg.explain(device, *prim_args, backend=backend)
