"""What backends this install has, on which devices, and why not where they do not (``pfp.backend_info``)."""
from __future__ import annotations

import importlib.util
import os
import platform
from typing import Optional

import torch

from pyfastpeft.core import ext as _ext
from pyfastpeft.core.backend import REGISTRIES
from pyfastpeft.core.version import __version__


def available_backends(op: str, device="cpu") -> list[str]:
    """Backends of ``op`` (public name or primitive) that are installed and run on ``device`` here."""
    reg = REGISTRIES.get(op) or REGISTRIES.get(f"{op}_fwd")
    if reg is None:
        raise ValueError(f"unknown op {op!r}; known: {sorted({r.public for r in REGISTRIES.values()})}")
    dev = torch.device(device)
    out = []
    for name in reg.names():
        impl = reg._impls[name]
        if impl.available() and dev.type in impl.devices():
            out.append(name)
    return out


def _triton_status() -> tuple[Optional[str], str]:
    if importlib.util.find_spec("triton") is None:
        return None, "not installed"
    try:
        import triton

        ver = triton.__version__
    except Exception as e:  # a broken triton install is reported, not raised
        return None, f"import failed: {e}"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return ver, "interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly"
    return ver, "compiles for CUDA tensors" + ("" if torch.cuda.is_available() else " (no CUDA device here)")


def backend_info() -> dict:
    """What backends exist in this install, on which devices, and why not where they do not."""
    tver, tstat = _triton_status()
    _ext.load()
    cuda = torch.cuda.is_available()
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
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
        "triton": tver,
        "triton_status": tstat,
        "cuda_ext": _ext.load(),
        "cuda_ext_status": "loaded" if _ext.load() else _ext.LOAD_ERROR,
        "backend_env": os.environ.get("PYFASTPEFT_BACKEND", ""),
        "strict": os.environ.get("PYFASTPEFT_STRICT", "0") == "1",
        "ops": ops,
    }


def format_backend_info(info: Optional[dict] = None) -> str:
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
