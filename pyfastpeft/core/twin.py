"""First-use "twin" check of the hand-written CUDA ops in ``pyfastpeft._C``.

No CI job runs the CUDA kernels (CI is CPU-only), so before a CUDA C++ op is trusted on a GPU, it is
run once on small random inputs next to its twin, a float64 PyTorch computation of the same maths.
The verdict is remembered per (op, GPU name, compute capability, pyfastpeft version, torch version,
CUDA version, extension build), in memory and in ``<cache dir>/twin_checks.json``, where the cache dir
is ``$PYFASTPEFT_CACHE_DIR`` or ``~/.cache/pyfastpeft`` (``core/cache.py``). A failing op is disabled: :func:`cuda_op_ok`
returns a reason, a warning is logged on logger ``"pyfastpeft"`` (op, max error, "disabled"), and the
dispatcher uses another backend. ``PYFASTPEFT_TWIN_CHECK=0`` skips the checks (every op is trusted).

Error measure (what every twin check, ``pyfastpeft.<family>.twin.TWIN_CHECKS``, returns): for each case and dtype,
``max|out - ref64| / (max|ref64| * (eps(dtype) + eps(fp32) * sqrt(L)))``, L the length of the
reduction (K for shrink, R + 1 for expand_add), eps the machine epsilon (fp32 1.2e-7, fp16 9.8e-4,
bf16 7.8e-3): the worst error in units of "one output rounding plus a typical fp32 accumulation
error", relative to the largest reference value; the check returns the maximum over all cases and
dtypes (``inf`` for non-finite output, a wrong shape/dtype or a write outside the output).
``THRESHOLD = 8``: the exact-maths stand-in (fp32 accumulation, one rounding; tests/core/test_twin.py)
scores <= 0.5 in every dtype, while dropping a single term of a K = 120 sum scores ~10 in bf16,
~50 in fp16 and ~1e5 in fp32 (one seed, CPU), and a wrong index or a missing rank chunk far more.

Exceptions raised by a check (out of memory, missing op, "no kernel image") disable the op for this
process only; they are not written to the cache file.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from pyfastpeft.core import cache as _cache

log = logging.getLogger("pyfastpeft")

THRESHOLD = 8.0  # in dtype epsilons relative to max|reference|; see the module docstring
CACHE_FILE = "twin_checks.json"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EPS32 = torch.finfo(torch.float32).eps

# cache key -> None (passed) or the reason the op is disabled; filled per process
_MEMO: dict[str, Optional[str]] = {}
_LOCK = threading.RLock()


# ----------------------------------------------------------------------------------------------------
# helpers of the checks (each family's checks: pyfastpeft.<family>.twin.TWIN_CHECKS)
# ----------------------------------------------------------------------------------------------------

def _norm_err(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, length: int) -> float:
    """max|out - ref| / (max|ref| * (eps(dtype) + eps(fp32) * sqrt(length))); inf if not finite."""
    o = out.detach().to("cpu", torch.float64)
    if not torch.isfinite(o).all():
        return math.inf
    if o.numel() == 0:
        return 0.0
    unit = torch.finfo(dtype).eps + _EPS32 * math.sqrt(length)
    scale = max(ref64.abs().max().item(), 1e-30) * unit
    return (o - ref64).abs().max().item() / scale


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# verdicts: memory + JSON cache
# ----------------------------------------------------------------------------------------------------

def enabled() -> bool:
    """False when ``PYFASTPEFT_TWIN_CHECK`` is 0/false/off/no (read on every call)."""
    return os.environ.get("PYFASTPEFT_TWIN_CHECK", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_path() -> Path:
    """``$PYFASTPEFT_CACHE_DIR/twin_checks.json``, else ``~/.cache/pyfastpeft/twin_checks.json``."""
    return _cache.cache_dir() / CACHE_FILE


def _pkg_version() -> str:
    return _cache.pkg_version()


def _identity(device: torch.device) -> dict[str, str]:
    return _cache.identity(device, version=_pkg_version)


def _key(op: str, ident: dict[str, str]) -> str:
    return "|".join([op] + [f"{k}={ident[k]}" for k in sorted(ident)])


def _read_cache(path: Path) -> dict:
    return _cache.read_json(path)


def _write_entry(path: Path, key: str, entry: dict) -> None:
    """Add ``entry`` under ``key`` (read-modify-write, atomic replace); a read-only home only costs a re-check."""
    _cache.update_json(path, lambda data: {**data, key: entry}, prefix=".twin_checks.")


def _run_check(op: str, device: torch.device, fn: Callable[[torch.device], float], *,
               memo: Optional[dict] = None, path: Optional[Path] = None,
               ident: Optional[dict[str, str]] = None) -> Optional[str]:
    """Verdict for ``op`` on ``device``: None (passed) or the reason it is disabled.

    Looks in ``memo`` (default: this process's), then in the JSON file ``path`` (default:
    :func:`cache_path`), and only then runs ``fn(device)``; the result is stored in both. The
    injectable ``fn``/``memo``/``path``/``ident`` let the logic be tested without a GPU.
    """
    device = torch.device(device)
    memo = _MEMO if memo is None else memo
    ident = _identity(device) if ident is None else ident
    key = _key(op, ident)
    with _LOCK:
        if key in memo:
            return memo[key]
        path = cache_path() if path is None else Path(path)
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("ok"), bool):
            reason = None if entry["ok"] else str(entry.get("reason") or f"CUDA op {op} failed its twin check")
            if reason is not None:
                log.warning("%s [cached verdict from %s; delete it to re-check]", reason, path)
            memo[key] = reason
            return reason

        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                err = float(fn(device))
        except Exception as e:
            reason = (f"pyfastpeft: the twin check of CUDA op {op} on {ident['gpu']} raised "
                      f"{type(e).__name__}: {e}; the CUDA kernel {op} is disabled for this process")
            log.warning(reason)
            memo[key] = reason
            return reason
        seconds = time.perf_counter() - t0

        ok = math.isfinite(err) and err <= THRESHOLD
        reason = None if ok else (
            f"pyfastpeft: CUDA op {op} failed its twin check on {ident['gpu']} (sm {ident['cc']}): "
            f"max normalised error {err:.3g} > {THRESHOLD:g} (dtype epsilons of max|ref|); "
            f"the CUDA kernel {op} is disabled, another backend is used")
        if ok:
            log.info("pyfastpeft: CUDA op %s passed its twin check on %s (max normalised error %.3g, %.2f s)",
                     op, ident["gpu"], err, seconds)
        else:
            log.warning(reason)
        _write_entry(path, key, {
            "op": op, **ident, "ok": ok, "max_err": err if math.isfinite(err) else str(err),
            "threshold": THRESHOLD, "reason": reason, "seconds": round(seconds, 3),
            "checked_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        memo[key] = reason
        return reason


def cuda_op_ok(op: str, device: torch.device, check: Optional[Callable[[torch.device], float]]) -> Optional[str]:
    """None if ``torch.ops.pyfastpeft_C.<op>`` passed its twin ``check`` on ``device``, else a reason.

    ``check`` is the op's entry in its family's ``TWIN_CHECKS`` (``pyfastpeft.<family>.twin``). The check runs
    on the first call per (op, GPU, versions) and is cached in memory and on disk. Always None when
    ``PYFASTPEFT_TWIN_CHECK=0``. An op without a twin check (``check=None``) is disabled.
    """
    if not enabled():
        return None
    fn = check
    if fn is None:
        return f"pyfastpeft: CUDA op {op} has no twin check in its family's TWIN_CHECKS; it stays disabled"
    return _run_check(op, torch.device(device), fn)


def cuda_ops_ok(ops, device: torch.device, checks: dict) -> Optional[str]:
    """None if every ``pyfastpeft._C`` op of ``ops`` passed its twin check (``checks[op]``, the family's
    ``TWIN_CHECKS``) on ``device``, else the first reason, naming the op."""
    for op in ops:
        why = cuda_op_ok(op, device, checks.get(op))
        if why is not None:
            return f"{op} disabled on this GPU: {why}"
    return None
