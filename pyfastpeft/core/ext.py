"""Forgiving, lazy load of the optional CUDA extension ``pyfastpeft._C``.

``import pyfastpeft`` never fails because of it: a CPU-only install simply has no ``_C``
(``LOAD_ERROR`` says why), and an ``_C`` built against another torch/CUDA is reported, not raised.
The extension is loaded on first use (``has_op``/``load``), never at ``import pyfastpeft``.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

import torch

log = logging.getLogger("pyfastpeft")

LOAD_ERROR: Optional[str] = None
_LOADED: Optional[bool] = None


def load() -> bool:
    """Try once to import ``pyfastpeft._C``; True when its ops are registered."""
    global _LOADED, LOAD_ERROR
    if _LOADED is not None:
        return _LOADED
    if os.environ.get("PYFASTPEFT_DISABLE_CUDA_EXT", "0") == "1":
        LOAD_ERROR = "disabled by PYFASTPEFT_DISABLE_CUDA_EXT=1"
        _LOADED = False
        return False
    try:
        importlib.import_module("pyfastpeft._C")
        _LOADED = True
    except ImportError as e:  # not built: normal for CPU-only installs, stay quiet
        LOAD_ERROR = f"pyfastpeft._C not built ({e}); build with PYFASTPEFT_BUILD_CUDA=1"
        _LOADED = False
    except OSError as e:  # built against another torch/CUDA: tell the user why
        LOAD_ERROR = f"pyfastpeft._C failed to load (torch/CUDA mismatch?): {e}"
        log.warning(LOAD_ERROR)
        _LOADED = False
    return _LOADED


def has_op(name: str) -> bool:
    """True when the extension is loaded and defines ``torch.ops.pyfastpeft_C.<name>``."""
    return load() and hasattr(torch.ops.pyfastpeft_C, name)


def why_unavailable() -> str:
    load()
    return LOAD_ERROR or "pyfastpeft._C is loaded but lacks this op"
