"""``pyfastpeft check``: every op x every backend available here x dtypes x a few awkward shapes, against
the fp64 reference, forward and every gradient, judged by :func:`pyfastpeft.testing.compare`.

The checks are table driven: :data:`CHECKS` holds one :class:`OpCheck` per public op, so a new op adds
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
from pyfastpeft._backend import ORDER

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

TRITON_CPU_REASON = "n/a on cpu (set TRITON_INTERPRET=1, or pass --interpret, to run it in the interpreter)"


# ----------------------------------------------------------------------------------------------------
# table formatting (shared with ``pyfastpeft bench``)
# ----------------------------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with left-aligned columns (no third-party dependency)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# the table of checks
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearCase:
    """One LoRA-linear case: ``x (*lead, M, K)``, ``W (N, K)``, rank ``R``."""

    name: str
    M: int
    K: int
    N: int
    R: int
    lead: tuple[int, ...] = ()
    bias: bool = True
    noncontig: bool = False  # x is a transposed (column-major) view of a (K, M) leaf

    @property
    def tokens(self) -> int:
        return self.M * math.prod(self.lead)


@dataclass
class OpCheck:
    """How to check one public op.

    Attributes:
        op: the public op name (the key of ``pyfastpeft.available_backends``).
        cases: ``(device, dtype) -> [case]``.
        make: ``(case, generator) -> leaves`` -- fp64 CPU tensors (or None, or plain numbers); the runner
            converts them to the dtype/device under test.
        build: ``(leaves) -> kwargs`` of the call (views such as a transposed ``x`` are made here, so a
            gradient always lands on a leaf).
        call: ``(kwargs, backend) -> output``; ``ref``: ``(kwargs) -> output`` (the reference).
        grads: names of the leaves that require gradients.
        reduction: ``(case) -> {"out": n, <grad name>: n}`` the longest reduction behind each result.
    """

    op: str
    cases: Callable[[torch.device, torch.dtype], list]
    make: Callable[[Any, torch.Generator], dict]
    build: Callable[[dict], dict]
    call: Callable[[dict, str], torch.Tensor]
    ref: Callable[[dict], torch.Tensor]
    grads: tuple[str, ...]
    reduction: Callable[[Any], dict]
    sample_args: Optional[Callable[[torch.device, torch.dtype], tuple]] = None
    # leaves that stay fp32 when the case runs in fp16/bf16 (as in a real model: a learnable threshold is an
    # fp32 parameter); their gradients are judged by the low-precision rule of the activations they come from
    keep_fp32: tuple[str, ...] = ()


def _lora_cases(device: torch.device, dtype: torch.dtype) -> list[LinearCase]:
    return [
        LinearCase("64x96->80 r8", 64, 96, 80, 8),
        LinearCase("odd 37x120->72 r3", 37, 120, 72, 3),
        LinearCase("3-D x (2,5,48)->40 r4", 5, 48, 40, 4, lead=(2,)),
        LinearCase("non-contig x 33x64->48 r5", 33, 64, 48, 5, noncontig=True),
        LinearCase("no bias 40x56->24 r16", 40, 56, 24, 16, bias=False),
    ]


def _lora_make(c: LinearCase, g: torch.Generator) -> dict:
    K, N, R = c.K, c.N, c.R
    x_shape = (K, c.M) if c.noncontig else (*c.lead, c.M, K)
    r = testing.randn
    return dict(
        x=r(*x_shape, dtype=torch.float64, generator=g),
        weight=r(N, K, dtype=torch.float64, scale=K ** -0.5, generator=g),
        bias=r(N, dtype=torch.float64, generator=g) if c.bias else None,
        lora_a=r(R, K, dtype=torch.float64, scale=K ** -0.5, generator=g),
        lora_b=r(N, R, dtype=torch.float64, scale=R ** -0.5, generator=g),
        scale=2.0,
        _noncontig=c.noncontig,
    )


def _lora_build(leaves: dict) -> dict:
    kw = {k: v for k, v in leaves.items() if not k.startswith("_")}
    if leaves.get("_noncontig"):
        kw["x"] = kw["x"].t()
    return kw


def _lora_call(kw: dict, backend: str) -> torch.Tensor:
    import pyfastpeft
    return pyfastpeft.lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], kw["scale"],
                                  backend=backend)


def _lora_ref(kw: dict) -> torch.Tensor:
    from pyfastpeft.reference import lora_linear_ref
    return lora_linear_ref(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], kw["scale"])


def _lora_reduction(c: LinearCase) -> dict:
    # y: sums over K (and R); dx = dy W + g A: over N (and R); dA = g^T x: over tokens, g itself over N;
    # dB = scale dy^T u: over tokens, u itself over K.
    return {"out": c.K + c.R, "x": c.N + c.R, "lora_a": max(c.tokens, c.N), "lora_b": max(c.tokens, c.K)}


def _lora_sample(device: torch.device, dtype: torch.dtype) -> tuple:
    x = torch.zeros(4, 8, device=device, dtype=dtype)
    w = torch.zeros(6, 8, device=device, dtype=dtype)
    a = torch.zeros(2, 8, device=device, dtype=dtype)
    b = torch.zeros(6, 2, device=device, dtype=dtype)
    return (x, w, None, a, b, 1.0)


GATE_WIDTH = 0.5  # wide, so that several tokens of each small case fall inside the tau surrogate's window


def _gated_make(c: LinearCase, g: torch.Generator) -> dict:
    """LoRA leaves plus a tau halfway between two tokens' fp64 ratios (about half the tokens selected;
    no tie that rounding could flip)."""
    from pyfastpeft.reference import gated_lora_linear_ref
    leaves = _lora_make(c, g)
    kw = _lora_build(leaves)
    with torch.no_grad():
        _, _, ratio = gated_lora_linear_ref(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"],
                                            kw["scale"], torch.tensor(0.0, dtype=torch.float64), return_gate=True)
    r = ratio.flatten().sort().values
    k = max(r.numel() // 2, 1)
    leaves["tau"] = ((r[k - 1] + r[k]) / 2).reshape(())
    return leaves


def _gated_call(kw: dict, backend: str) -> torch.Tensor:
    import pyfastpeft
    return pyfastpeft.gated_lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], kw["scale"],
                                        kw["tau"], gate_width=GATE_WIDTH, backend=backend)


def _gated_ref(kw: dict) -> torch.Tensor:
    from pyfastpeft.reference import gated_lora_linear_ref
    return gated_lora_linear_ref(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], kw["scale"],
                                 kw["tau"], gate_width=GATE_WIDTH)


def _gated_reduction(c: LinearCase) -> dict:
    return dict(_lora_reduction(c), x=c.N + c.R + c.K, tau=c.tokens * (c.N + c.R))


def _gated_sample(device: torch.device, dtype: torch.dtype) -> tuple:
    return _lora_sample(device, dtype) + (torch.zeros((), device=device, dtype=dtype),)


CHECKS: list[OpCheck] = [
    OpCheck(op="lora_linear", cases=_lora_cases, make=_lora_make, build=_lora_build, call=_lora_call,
            ref=_lora_ref, grads=("x", "lora_a", "lora_b"), reduction=_lora_reduction, sample_args=_lora_sample),
    OpCheck(op="gated_lora_linear", cases=_lora_cases, make=_gated_make, build=_lora_build, call=_gated_call,
            ref=_gated_ref, grads=("x", "lora_a", "lora_b", "tau"), reduction=_gated_reduction,
            sample_args=_gated_sample, keep_fp32=("tau",)),
]


from pyfastpeft._check_atoms import atom_checks as _atom_checks  # noqa: E402  (filter atoms, specs/atoms.md)

CHECKS += _atom_checks(OpCheck)

from pyfastpeft._check_gram import gram_checks as _gram_checks  # noqa: E402  (SFP accumulation, no gradient)

CHECKS += _gram_checks(OpCheck)

from pyfastpeft._check_orthogonal import orthogonal_checks as _orth_checks  # noqa: E402  (specs/orthogonal.md)

CHECKS += _orth_checks(OpCheck)


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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    return format_table(HEADERS, [r.cells() for r in rows])


def summary(rows: Sequence[CheckRow]) -> str:
    n = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "skip")}
    return f"{n['PASS']} passed, {n['FAIL']} failed, {n['skip']} skipped"
