"""The on-disk cache shared by the twin checks (``core/twin.py``) and measured dispatch (``core/tune.py``).

Where: ``$PYFASTPEFT_CACHE_DIR``, else ``~/.cache/pyfastpeft``. What: small JSON files of decisions that
depend on the machine (GPU name and compute capability, pyfastpeft, torch, Triton and CUDA versions, the
built extension), so each decision is keyed by :func:`identity`. How: a write re-reads the file, adds its
entry and replaces the file atomically (a temporary file, then ``os.replace``) under an advisory lock
(``fcntl`` where available), so two processes writing at once keep both entries and a reader never sees
a half-written file. It is only a cache: an unreadable file is treated as empty, and a file that cannot be
written costs a new measurement next time.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("pyfastpeft")


def cache_dir() -> Path:
    """``$PYFASTPEFT_CACHE_DIR``, else ``~/.cache/pyfastpeft`` (read on every call)."""
    return Path(os.environ.get("PYFASTPEFT_CACHE_DIR") or os.path.join(Path.home(), ".cache", "pyfastpeft"))


def pkg_version() -> str:
    mod = sys.modules.get("pyfastpeft")
    ver = getattr(mod, "__version__", None)
    if ver:
        return str(ver)
    try:
        return importlib.metadata.version("pyfastpeft")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def ext_fingerprint() -> str:
    """Size and mtime of the loaded ``pyfastpeft._C``: a rebuilt extension (same version) is re-checked."""
    path = getattr(sys.modules.get("pyfastpeft._C"), "__file__", None)
    if not path:
        return "none"
    try:
        st = os.stat(path)
    except OSError:
        return "unknown"
    return f"{os.path.basename(path)}:{st.st_size}:{int(st.st_mtime)}"


def triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def identity(device: torch.device, *, version: Callable[[], str] = pkg_version,
             ext: Callable[[], str] = ext_fingerprint) -> dict[str, str]:
    """What a cached decision depends on, for ``device``."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(idx)
        cc = "%d.%d" % torch.cuda.get_device_capability(idx)
    else:
        gpu, cc = device.type, "n/a"
    return {"gpu": gpu, "cc": cc, "pyfastpeft": version(), "torch": torch.__version__,
            "triton": triton_version(), "cuda": str(torch.version.cuda), "ext": ext()}


def read_json(path: Path, on_bad: Optional[Callable[[str], None]] = None) -> dict:
    """The JSON object in ``path``; ``{}`` when it is missing, and also (after ``on_bad(why)``) when it is
    unreadable, corrupt or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # unreadable or corrupt: start over (it is only a cache)
        (on_bad or (lambda why: log.debug("pyfastpeft: ignoring cache file %s (%s)", path, why)))(str(e))
        return {}
    if not isinstance(data, dict):
        (on_bad or (lambda why: None))(f"a JSON {type(data).__name__}, not an object")
        return {}
    return data


@contextlib.contextmanager
def _locked(path: Path):
    """An advisory lock on ``<path>.lock`` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic replace alone (a concurrent writer may lose its entry)
        yield
        return
    with open(str(path) + ".lock", "a+") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lk, fcntl.LOCK_UN)


def update_json(path: Path, update: Callable[[dict], dict], prefix: str = ".cache.") -> bool:
    """Read ``path``, apply ``update`` to its object and write the result atomically (under the lock).
    False (logged at debug) when the file cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            data = update(read_json(path))
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        return True
    except OSError as e:
        log.debug("pyfastpeft: could not write cache file %s (%s)", path, e)
        return False
