"""Measured dispatch: on a GPU, the fastest backend of an op is found by timing, once, and remembered.

When an op is called in auto mode on a CUDA tensor and more than one backend can run the call, the first
call for a (GPU, op, dtype, shape bucket) times every one of them (CUDA events through
``triton.testing.do_bench``; the plain torch path on cuBLAS / cuDNN is one of them), picks the fastest and
stores the decision in ``<cache dir>/dispatch.json`` (``core/cache.py``: ``$PYFASTPEFT_CACHE_DIR`` or
``~/.cache/pyfastpeft``), keyed by the GPU name and compute capability and the pyfastpeft, torch, Triton
and CUDA versions, so a new driver stack or library measures again. Later calls, in this process or
another, use the decision without timing. CUDA backends have passed their twin check (``core/twin.py``)
before they are candidates.

No timing happens while ``torch.compile`` traces or a CUDA graph is being captured: there the cached
decision is used if there is one, else the static default. ``PYFASTPEFT_TUNE=0`` turns measuring off;
the static default then applies: the backend that a results file for this GPU (``core/results.py``: written by
``pyfastpeft bench --device cuda --smoke``, named by ``PYFASTPEFT_RESULTS`` or shipped with the package) found
fastest for the op and shape bucket, if it can run the call; else the op's *vendor order* (ops whose work is a
large GEMM put their cuBLAS-backed backends first), else its preference order.

A cache file that is corrupt or was not written by this library is ignored with one warning (and
replaced on the next write). Writes are atomic and locked, so processes that measure at once keep
each other's entries.

The timer, the machine identity and the device check are module attributes (:data:`hooks`) so that the
logic is tested without a GPU.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from pyfastpeft.core import cache as _cache

log = logging.getLogger("pyfastpeft")

CACHE_FILE = "dispatch.json"
FORMAT = "pyfastpeft-dispatch"
VERSION = 1


def enabled() -> bool:
    """False when ``PYFASTPEFT_TUNE`` is 0/false/off/no (read on every call)."""
    return os.environ.get("PYFASTPEFT_TUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_path() -> Path:
    """``<cache dir>/dispatch.json``."""
    return _cache.cache_dir() / CACHE_FILE


def _do_bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (CUDA events)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class Hooks:
    """What the decision logic asks of the machine; replaced in tests by fakes."""

    timer: Callable[[Callable[[], Any]], float] = _do_bench  # milliseconds of one call
    identity: Callable[[torch.device], dict] = _cache.identity
    measurable_device: Callable[[torch.device], bool] = lambda d: d.type == "cuda"
    capturing: Callable[[torch.device], bool] = _capturing


hooks = Hooks()


@dataclass
class Measurement:
    """A decision: the chosen backend, the median time of each candidate, where it came from."""

    op: str
    chosen: str
    times_ms: dict[str, float]
    gpu: str
    source: str  # "measured" | "cached"
    failed: dict[str, str] = field(default_factory=dict)  # backend -> why it could not be timed

    def describe(self) -> str:
        times = ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        fails = "".join(f"; {n} failed: {why}" for n, why in self.failed.items())
        where = "measured" if self.source == "measured" else "measured earlier"
        return f"{where} on {self.gpu}: {times}{fails} -> {self.chosen}"


_MEMO: dict[str, Measurement] = {}
_LOCK = threading.RLock()
_WARNED: set[str] = set()
_IDENTS: dict[tuple, dict] = {}  # (identity hook, device) -> identity: read once per process, not per call


def _identity(device: torch.device) -> dict:
    """``hooks.identity(device)``, asked once per device (it reads the GPU name and package metadata, too
    slow for every call of an op)."""
    where = str(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        where = f"cuda:{torch.cuda.current_device()}"  # "cuda" is the current device, which may change
    key = (hooks.identity, where)
    ident = _IDENTS.get(key)
    if ident is None:
        ident = _IDENTS[key] = hooks.identity(device)
    return ident


def _bucket_dim(d: int) -> int:
    """Sizes up to 16 exactly, then the next power of two."""
    return d if d <= 16 else 1 << (d - 1).bit_length()


def bucket(args: Sequence[Any]) -> str:
    """The shape bucket of a call: per tensor its dtype, bucketed shape and whether it is contiguous; other
    arguments that select a kernel (ints, bools, strings, None) as they are. Float values (``scale``) are not
    part of it: they do not change which kernel runs."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            shape = "x".join(str(_bucket_dim(int(s))) for s in a.shape)
            parts.append(f"{str(a.dtype).replace('torch.', '')}[{shape}]{'' if a.is_contiguous() else 'nc'}")
        elif a is None or isinstance(a, (bool, int, str)):
            parts.append(repr(a))
        else:
            parts.append("_")
    return ",".join(parts)


def _key(op: str, args: Sequence[Any], ident: dict) -> str:
    return "|".join([op, bucket(args)] + [f"{k}={ident[k]}" for k in sorted(ident)])


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(f"pyfastpeft: ignoring the dispatch cache {path} ({why}); backends will be measured "
                      f"again and the file rewritten", RuntimeWarning, stacklevel=3)


def _entries(path: Path) -> dict:
    data = _cache.read_json(path, on_bad=lambda why: _warn_once(path, f"unreadable: {why}"))
    if not data:
        return {}
    if data.get("format") != FORMAT or data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
        _warn_once(path, f"not a {FORMAT} v{VERSION} file")
        return {}
    return data["entries"]


def _store(path: Path, key: str, entry: dict) -> None:
    def update(data: dict) -> dict:
        ok = data.get("format") == FORMAT and data.get("version") == VERSION and isinstance(data.get("entries"), dict)
        entries = dict(data["entries"]) if ok else {}
        entries[key] = entry
        return {"format": FORMAT, "version": VERSION, "entries": entries}

    _cache.update_json(path, update, prefix=".dispatch.")


def allowed(device: torch.device) -> bool:
    """Whether this call may be timed: measuring on, a measurable (CUDA) device, not tracing or capturing."""
    return (enabled() and hooks.measurable_device(device) and not torch.compiler.is_compiling()
            and not hooks.capturing(device))


def lookup(op: str, device: torch.device, args: Sequence[Any], candidates: Sequence[str]) -> Optional[Measurement]:
    """The remembered decision for this call (memory, then disk), without timing anything."""
    ident = _identity(device)
    key = _key(op, args, ident)
    with _LOCK:
        m = _MEMO.get(key)
        if m is not None and m.chosen in candidates:
            return m
        entry = _entries(cache_path()).get(key)
        if (isinstance(entry, dict) and entry.get("chosen") in candidates
                and isinstance(entry.get("times_ms"), dict)):
            m = Measurement(op, entry["chosen"], {str(k): float(v) for k, v in entry["times_ms"].items()},
                            ident.get("gpu", "?"), "cached", dict(entry.get("failed") or {}))
            _MEMO[key] = m
            return m
    return None


def choose(op: str, device: torch.device, args: Sequence[Any], candidates: Sequence[str],
           call: Callable[[str], Callable[[], Any]]) -> Optional[Measurement]:
    """The fastest of ``candidates`` for this call: remembered, or measured now with ``hooks.timer`` on
    ``call(name)`` and stored. None when no candidate could be timed (every one raised)."""
    m = lookup(op, device, args, candidates)
    if m is not None:
        return m
    ident = _identity(device)
    key = _key(op, args, ident)
    with _LOCK:
        times: dict[str, float] = {}
        failed: dict[str, str] = {}
        for name in candidates:
            try:
                times[name] = float(hooks.timer(call(name)))
            except Exception as e:  # a backend that cannot run this call is not a candidate
                failed[name] = f"{type(e).__name__}: {e}"[:200]
        if not times:
            return None
        chosen = min(times, key=lambda n: (times[n], list(candidates).index(n)))
        m = Measurement(op, chosen, times, ident.get("gpu", "?"), "measured", failed)
        _MEMO[key] = m
        _store(cache_path(), key, {"op": op, "chosen": chosen, "times_ms": times, "failed": failed, **ident})
        log.info("pyfastpeft %s: %s", op, m.describe())
        return m


def shipped(op: str, device: torch.device, args: Sequence[Any], candidates: Sequence[str]) -> Optional[tuple[str, str]]:
    """The static default a results file gives for this call: ``(backend, how)``, or None when no results file
    for this GPU timed ``op`` at this shape bucket with one of ``candidates``."""
    from pyfastpeft.core import results

    ident = _identity(device)
    found = results.for_machine(ident)
    if found is None:
        return None
    path, data = found
    chosen = results.fastest(data, op, bucket(args), candidates)
    if chosen is None:
        return None
    return chosen, f"static default from the results file {path.name} (measured on {data['machine']['gpu']})"


def clear_memory() -> None:
    """Forget this process's decisions (the file stays): the next call reads the file again."""
    with _LOCK:
        _MEMO.clear()
        _WARNED.clear()
        _IDENTS.clear()
    from pyfastpeft.core import results

    results.clear()
