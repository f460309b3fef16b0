"""``pyfastpeft check``: every op x every backend available here x dtypes x a few awkward shapes, against
the fp64 reference, forward and every gradient, judged by :func:`pyfastpeft.testing.compare`.

The checks are table driven: :data:`CHECKS` holds the :class:`OpCheck` rows every family declares (``pyfastpeft/<family>/checks.py``), so a new op adds
one entry (its cases, how to build inputs, how to call it, its reference, which inputs get gradients and
the reduction length of each result for the fp32 rule).

Tolerances (``pyfastpeft/testing.py``): fp32 outputs get ``rtol=1e-5`` and an ``atol`` that grows with
the square root of the reduction length; fp16/bf16 outputs may be at most 2x (forward) or 3x (gradients)
as far from the fp64 reference as the reference run in that same dtype is, plus a floor.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from pyfastpeft import testing
from pyfastpeft.core.backend import ORDER
from pyfastpeft.core.table import table
from pyfastpeft.core.triton_config import interpreting

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

TRITON_CPU_REASON = "n/a on cpu (set TRITON_INTERPRET=1, or pass --interpret, to run it in the interpreter)"


# ----------------------------------------------------------------------------------------------------
# the table of checks
# ----------------------------------------------------------------------------------------------------
from pyfastpeft.testing import LinearCase, OpCheck  # noqa: E402,F401  (the row types live with the tolerances)


def _all_checks() -> list[OpCheck]:
    from pyfastpeft.families import check_rows

    return check_rows()


CHECKS: list[OpCheck] = _all_checks()


# ----------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------
@dataclass
class CheckRow:
    op: str
    backend: str
    dtype: str
    case: str
    status: str  # "PASS" | "FAIL" | "skip"
    fwd: str = ""
    grads: str = ""
    detail: str = ""
    seconds: float = 0.0

    def cells(self) -> list[str]:
        status = self.status if self.status != "skip" else f"skip: {self.detail}"
        if self.status == "FAIL" and self.detail:
            status = f"FAIL ({self.detail})"
        return [self.op, self.backend, self.dtype, self.case, self.fwd, self.grads, status]


HEADERS = ["op", "backend", "dtype", "case", "fwd err/budget", "worst grad err/budget", "result"]


def _to(leaves: dict, dtype: torch.dtype, device: torch.device, grads: Sequence[str],
        keep_fp32: Sequence[str] = ()) -> dict:
    out = {}
    for k, v in leaves.items():
        if isinstance(v, torch.Tensor):
            dt = torch.float32 if (k in keep_fp32 and dtype in (torch.float16, torch.bfloat16)) else dtype
            t = v.detach().to(device=device, dtype=dt).clone()
            out[k] = t.requires_grad_(k in grads)
        else:
            out[k] = v
    return out


def _run(fn: Callable[[dict], torch.Tensor], check: OpCheck, leaves: dict, dtype: torch.dtype,
         device: torch.device, gy: torch.Tensor) -> tuple[torch.Tensor, dict]:
    ls = _to(leaves, dtype, device, check.grads, check.keep_fp32)
    y = fn(check.build(ls))
    if check.grads:  # an op without gradients (gram_accumulate) is checked forward only
        y.backward(gy.to(device=y.device, dtype=y.dtype))
    return y.detach(), {k: (ls[k].grad.detach() if ls[k].grad is not None else None) for k in check.grads}


def _fmt(v: testing.Verdict) -> str:
    return f"{v.err:.1e}/{v.budget:.1e}"


def _skip_reason(check: OpCheck, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend == "triton" and device.type == "cpu" and not interpreting():
        return TRITON_CPU_REASON
    import pyfastpeft
    try:
        if check.sample_args is not None and hasattr(pyfastpeft, "explain"):
            dec = pyfastpeft.explain(check.op, *check.sample_args(device, dtype), backend=backend)
            for name, why in getattr(dec, "rows", []):
                if name == backend and why != "chosen":
                    return why
    except Exception as e:  # explain may itself raise for a forced backend that cannot run
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return msg[:120]
    return f"not available on {device.type}"


def available(op: str, device: torch.device) -> list[str]:
    import pyfastpeft
    return list(pyfastpeft.available_backends(op, device))


def run_checks(device: str | torch.device = "cpu", dtypes: Optional[Sequence[str]] = None,
               backends: Optional[Sequence[str]] = None, ops: Optional[Sequence[str]] = None,
               seed: int = 0, progress: Optional[Callable[[CheckRow], None]] = None) -> list[CheckRow]:
    """Run every check; returns one row per (op, backend, dtype, case), plus one skip row per backend
    that cannot run here."""
    import pyfastpeft
    device = torch.device(device)
    if dtypes is None:
        dtypes = ["fp32"] if device.type == "cpu" else ["fp32", "fp16", "bf16"]
    wanted = [b.strip() for b in backends] if backends else list(ORDER)
    rows: list[CheckRow] = []
    BU = getattr(pyfastpeft, "BackendUnavailable", RuntimeError)

    def emit(row: CheckRow) -> None:
        rows.append(row)
        if progress is not None:
            progress(row)

    for check in CHECKS:
        if ops and check.op not in ops:
            continue
        here = available(check.op, device)
        for backend in wanted:
            for dname in dtypes:
                dtype = DTYPES[dname]
                if backend not in here:
                    emit(CheckRow(check.op, backend, dname, "*", "skip",
                                  detail=_skip_reason(check, backend, device, dtype)))
                    break  # one skip row per backend, not per dtype
                for i, case in enumerate(check.cases(device, dtype)):
                    emit(_check_case(check, backend, case, dname, dtype, device, seed + i, BU))
    return rows


def _check_case(check: OpCheck, backend: str, case: Any, dname: str, dtype: torch.dtype,
                device: torch.device, seed: int, BU: type) -> CheckRow:
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    leaves = check.make(case, g)
    red = check.reduction(case)
    gy = _upstream(check, leaves, g)
    y64, gr64 = _run(check.ref, check, leaves, torch.float64, torch.device("cpu"), gy)
    y_lo = gr_lo = None
    if dtype not in (torch.float32, torch.float64):
        y_lo, gr_lo = _run(check.ref, check, leaves, dtype, device, gy)
    name = getattr(case, "name", str(case))
    row = CheckRow(check.op, backend, dname, name, "FAIL")
    try:
        y, gr = _run(lambda kw: check.call(kw, backend), check, leaves, dtype, device, gy)
    except BU as e:
        row.status, row.detail = "skip", _first_line(e)
        return row
    except Exception as e:  # a crashing backend is a failure, reported in the table
        row.detail = f"{type(e).__name__}: {_first_line(e)}"
        row.seconds = time.perf_counter() - t0
        return row
    fv = testing.compare(y, y64, y_lo, factor=testing.FWD_FACTOR, reduction=red["out"])
    row.fwd = _fmt(fv)
    ok = fv.ok
    worst: Optional[tuple[float, str, testing.Verdict]] = None
    bad = [] if fv.ok else ["fwd"]
    for k in check.grads:
        if gr64[k] is None:
            continue
        if gr[k] is None:
            ok = False
            bad.append(f"d{k} missing")
            continue
        v = testing.compare(gr[k], gr64[k], None if gr_lo is None else gr_lo[k], factor=testing.GRAD_FACTOR,
                            reduction=red.get(k, 1), as_dtype=dtype if k in check.keep_fp32 else None)
        if not v.ok:
            ok = False
            bad.append(f"d{k}")
        key = (0 if v.ok else 1, v.err / v.budget if v.budget > 0 else math.inf)
        if worst is None or key > worst[0]:
            worst = (key, k, v)
    if worst is not None:
        row.grads = f"d{worst[1]} {_fmt(worst[2])}"
    row.status = "PASS" if ok else "FAIL"
    if not ok:
        row.detail = "wrong: " + ", ".join(bad)
    row.seconds = time.perf_counter() - t0
    return row


def _upstream(check: OpCheck, leaves: dict, g: torch.Generator) -> torch.Tensor:
    """A random upstream gradient of the output's shape (found by a no-grad fp64 reference call)."""
    with torch.no_grad():
        shape = check.ref(check.build(leaves)).shape
    return testing.randn(*shape, dtype=torch.float64, generator=g)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:160]


def format_rows(rows: Sequence[CheckRow]) -> str:
    return table(HEADERS, [r.cells() for r in rows])


def summary(rows: Sequence[CheckRow]) -> str:
    n = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "skip")}
    return f"{n['PASS']} passed, {n['FAIL']} failed, {n['skip']} skipped"
