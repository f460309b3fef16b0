"""First-use "twin" check of the hand-written CUDA ops in ``pyfastpeft._C``.

No CI job runs the CUDA kernels (CI is CPU-only), so before a CUDA C++ op is trusted on a GPU, it is
run once on small random inputs next to its twin, a float64 PyTorch computation of the same maths.
The verdict is remembered per (op, GPU name, compute capability, pyfastpeft version, torch version,
CUDA version, extension build), in memory and in ``<cache dir>/twin_checks.json``, where the cache dir
is ``$PYFASTPEFT_CACHE_DIR`` or ``~/.cache/pyfastpeft``. A failing op is disabled: :func:`cuda_op_ok`
returns a reason, a warning is logged on logger ``"pyfastpeft"`` (op, max error, "disabled"), and the
dispatcher uses another backend. ``PYFASTPEFT_TWIN_CHECK=0`` skips the checks (every op is trusted).

Error measure (what every ``TWIN_CHECKS`` function returns): for each case and dtype,
``max|out - ref64| / (max|ref64| * (eps(dtype) + eps(fp32) * sqrt(L)))``, L the length of the
reduction (K for shrink, R + 1 for expand_add), eps the machine epsilon (fp32 1.2e-7, fp16 9.8e-4,
bf16 7.8e-3): the worst error in units of "one output rounding plus a typical fp32 accumulation
error", relative to the largest reference value; the check returns the maximum over all cases and
dtypes (``inf`` for non-finite output, a wrong shape/dtype or a write outside the output).
``THRESHOLD = 8``: the exact-maths stand-in (fp32 accumulation, one rounding; tests/test_twin.py)
scores <= 0.5 in every dtype, while dropping a single term of a K = 120 sum scores ~10 in bf16,
~50 in fp16 and ~1e5 in fp32 (one seed, CPU), and a wrong index or a missing rank chunk far more.

Exceptions raised by a check (out of memory, missing op, "no kernel image") disable the op for this
process only; they are not written to the cache file.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("pyfastpeft")

THRESHOLD = 8.0  # in dtype epsilons relative to max|reference|; see the module docstring
CACHE_FILE = "twin_checks.json"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EPS32 = torch.finfo(torch.float32).eps

# cache key -> None (passed) or the reason the op is disabled; filled per process
_MEMO: dict[str, Optional[str]] = {}
_LOCK = threading.RLock()


# ----------------------------------------------------------------------------------------------------
# the checks: op name -> fn(device) -> normalised max error
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


def check_lora_shrink(device: torch.device, op: Optional[Callable] = None) -> float:
    """``u = x @ a.T`` (x (M, K), a (R, K)) against float64, fp32/fp16/bf16, odd shapes.

    Cases: the odd LoRA case M=37, K=120, R=3; R=40 > 32 (several rank chunks) with x a column slice
    (row stride K+7); R=17 with x transposed (stride(1) != 1, copied by the op); M=0 must give (0, R).
    """
    op = op if op is not None else torch.ops.pyfastpeft_C.lora_shrink
    gen = torch.Generator().manual_seed(1234)
    worst = 0.0
    for M, K, R, layout in ((37, 120, 3, "contiguous"), (19, 300, 40, "row-sliced"),
                            (5, 64, 17, "transposed"), (0, 24, 5, "contiguous")):
        x64 = _randn(gen, M, K)
        a64 = _randn(gen, R, K)
        for dtype in DTYPES:
            x_lo, a_lo = x64.to(dtype), a64.to(dtype)  # the reference uses the rounded inputs
            ref = x_lo.double() @ a_lo.double().T
            if layout == "row-sliced":
                x = torch.zeros(M, K + 7, dtype=dtype, device=device)
                x[:, :K] = x_lo.to(device)
                x = x[:, :K]
            elif layout == "transposed":
                x = x_lo.T.contiguous().to(device).T
            else:
                x = x_lo.to(device)
            u = op(x, a_lo.to(device))
            if tuple(u.shape) != (M, R) or u.dtype != dtype:
                return math.inf
            worst = max(worst, _norm_err(u, ref, dtype, K))
    return worst


def check_lora_expand_add_(device: torch.device, op: Optional[Callable] = None) -> float:
    """``y += scale * u @ b.T`` in place (y (M, N), u (M, R), b (N, R)) against float64.

    y is always a column slice of a wider buffer whose extra columns hold a sentinel: a kernel that
    writes past column N (or ignores the row stride) scores ``inf``. Cases: M=37, N=72, R=3;
    M=40, N=200, R=40 (several row, column and rank tiles); M=1, N=5, R=1.
    """
    op = op if op is not None else torch.ops.pyfastpeft_C.lora_expand_add_
    gen = torch.Generator().manual_seed(4321)
    worst = 0.0
    pad = 5
    for M, N, R, scale in ((37, 72, 3, 0.75), (40, 200, 40, -0.5), (1, 5, 1, 2.0)):
        y64, u64, b64 = _randn(gen, M, N), _randn(gen, M, R), _randn(gen, N, R)
        for dtype in DTYPES:
            y_lo, u_lo, b_lo = y64.to(dtype), u64.to(dtype), b64.to(dtype)
            ref = y_lo.double() + scale * (u_lo.double() @ b_lo.double().T)
            buf = torch.full((M, N + pad), 12345.0, dtype=dtype, device=device)
            buf[:, :N] = y_lo.to(device)
            y = buf[:, :N]
            op(y, u_lo.to(device), b_lo.to(device), scale)
            if not bool((buf[:, N:].cpu() == 12345.0).all()):
                return math.inf
            worst = max(worst, _norm_err(y, ref, dtype, R + 1))
    return worst


def check_gated_gate(device: torch.device, op: Optional[Callable] = None) -> float:
    """Token-selective gate ``(ratio, selected, index, count)`` against float64: ``ratio`` scored like the
    other outputs (L = R²), and the discrete outputs exactly: ``selected == (ratio_out >= max(τ, 0))`` on the
    op's own ratios (so rounding at the threshold cannot fail it), ``index[:count]`` the selected rows in
    increasing order. A wrong flag, index or count scores ``inf``. Cases: M=37, R=3, G=2 with τ at the median
    (ties: τ equal to one row's ratio); M=2100 (three scan chunks of 1024), R=40, G=1, τ at the 30 % quantile;
    τ < 0 (all selected); M=0."""
    op = op if op is not None else torch.ops.pyfastpeft_C.gated_gate
    gen = torch.Generator().manual_seed(2468)
    worst = 0.0
    for M, R, G, q in ((37, 3, 2, 0.5), (2100, 40, 1, 0.3), (64, 16, 3, -1.0), (0, 8, 1, 0.5)):
        u64, b64 = _randn(gen, M, R), _randn(gen, 50, R)
        hsq = torch.rand(G, M, generator=gen, dtype=torch.float64).float() + 0.05
        for dtype in DTYPES:
            u_lo = u64.to(dtype)
            gram = (b64.T @ b64).float()
            ref = 0.5 * ((u_lo.double() @ gram.double()) * u_lo.double()).sum(1).sqrt() / hsq.double().sum(0).sqrt()
            taus = [torch.tensor(-1.0 if q < 0 or M == 0 else float(ref.float().quantile(q)))]
            for tau in taus:
                ratio, sel, index, count = op(u_lo.to(device), gram.to(device), hsq.to(device), tau.to(device), 0.5)
                if tuple(ratio.shape) != (M,) or ratio.dtype != torch.float32 or sel.dtype != torch.bool:
                    return math.inf
                ratio_c, sel_c, n = ratio.cpu(), sel.cpu(), int(count.cpu()[0])
                want = torch.nonzero(ratio_c >= tau.clamp(min=0)).flatten()
                if not torch.equal(sel_c, ratio_c >= tau.clamp(min=0)) or n != want.numel() or \
                        not torch.equal(index.cpu()[:n].long(), want):
                    return math.inf
                worst = max(worst, _norm_err(ratio, ref, dtype, R * R))
                if len(taus) == 1 and q == 0.5 and M:  # again with τ equal to a row's own ratio: the tie selects
                    taus.append(ratio_c[M // 2].clone())
    return worst


def check_gated_expand_add_(device: torch.device, op: Optional[Callable] = None) -> float:
    """``y[index[j]] += scale · u[index[j]] bᵀ`` for ``j < count`` in place, against float64; ``y`` a column
    slice with sentinel columns, rows not in the list must be untouched (else ``inf``). Cases: M=37, N=72,
    R=3 with every third row; M=70, N=200, R=40 with 0 rows (count 0) and with all rows."""
    op = op if op is not None else torch.ops.pyfastpeft_C.gated_expand_add_
    gen = torch.Generator().manual_seed(1357)
    worst, pad = 0.0, 5
    for M, N, R, step, scale in ((37, 72, 3, 3, 0.75), (70, 200, 40, 0, -0.5), (70, 200, 40, 1, 2.0)):
        y64, u64, b64 = _randn(gen, M, N), _randn(gen, M, R), _randn(gen, N, R)
        rows = torch.arange(0, M, step) if step else torch.zeros(0, dtype=torch.long)
        index = torch.full((M,), -1, dtype=torch.int32)  # entries past the count must never be read
        index[: rows.numel()] = rows.int()
        count = torch.tensor([rows.numel()], dtype=torch.int32)
        for dtype in DTYPES:
            y_lo, u_lo, b_lo = y64.to(dtype), u64.to(dtype), b64.to(dtype)
            ref = y_lo.double()
            ref[rows] += scale * (u_lo.double()[rows] @ b_lo.double().T)
            buf = torch.full((M, N + pad), 12345.0, dtype=dtype, device=device)
            buf[:, :N] = y_lo.to(device)
            y = buf[:, :N]
            op(y, u_lo.to(device), b_lo.to(device), index.to(device), count.to(device), scale)
            if not bool((buf[:, N:].cpu() == 12345.0).all()):
                return math.inf
            worst = max(worst, _norm_err(y, ref, dtype, R + 1))
    return worst


TWIN_CHECKS: dict[str, Callable[[torch.device], float]] = {
    "lora_shrink": check_lora_shrink,
    "lora_expand_add_": check_lora_expand_add_,
}
TWIN_CHECKS["gated_gate"] = check_gated_gate
TWIN_CHECKS["gated_expand_add_"] = check_gated_expand_add_


def check_atom_grad_conv2d(device: torch.device, op: Optional[Callable] = None) -> float:
    """Filter-atom gradient ``dD (C_in, m, kh, kw)`` against float64 (``specs/atoms.md`` §1), per global input
    channel: ``Σ_{o in group(i)} coeff[o, i mod C_in/g, j] · dW'[o, i mod C_in/g, p, q]`` with ``dW'`` the conv
    weight gradient of ``(x, dy)`` in float64. Cases: 3x3 with odd channels and padding; stride 2 and dilation
    with groups and m = 9; a depthwise 7x7 with x channels_last. L = N·Ho·Wo·(C_out/g)."""
    op = op if op is not None else torch.ops.pyfastpeft_C.atom_grad_conv2d
    gen = torch.Generator().manual_seed(99)
    worst = 0.0
    for N, cin, cout, H, W, k, s, p, d, g, m, cl in ((2, 5, 7, 9, 8, 3, 1, 1, 1, 1, 4, False),
                                                     (2, 6, 9, 11, 10, 3, 2, 2, 2, 3, 9, False),
                                                     (1, 8, 8, 12, 12, 7, 1, 3, 1, 8, 4, True)):
        x64, coeff = _randn(gen, N, cin, H, W), _randn(gen, cout, cin // g, m).float()
        ho, wo = (H + 2 * p - d * (k - 1) - 1) // s + 1, (W + 2 * p - d * (k - 1) - 1) // s + 1
        dy64 = _randn(gen, N, cout, ho, wo)
        for dtype in DTYPES:
            x_lo, dy_lo = x64.to(dtype), dy64.to(dtype)
            dw = torch.nn.grad.conv2d_weight(x_lo.double(), (cout, cin // g, k, k), dy_lo.double(), s, p, d, g)
            ref = torch.cat([torch.einsum("oij,oipq->ijpq", coeff.double()[gi * (cout // g):(gi + 1) * (cout // g)],
                                          dw[gi * (cout // g):(gi + 1) * (cout // g)]) for gi in range(g)])
            x = x_lo.to(device)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            out = op(dy_lo.to(device), x, coeff.to(device), k, k, [s, s], [p, p], [d, d], g)
            if tuple(out.shape) != tuple(ref.shape) or out.dtype != torch.float32:
                return math.inf
            worst = max(worst, _norm_err(out, ref, dtype, N * ho * wo * (cout // g)))
    return worst


TWIN_CHECKS["atom_grad_conv2d"] = check_atom_grad_conv2d


def check_cayley_exact(device: torch.device, op: Optional[Callable] = None) -> float:
    """Exact batched Cayley ``R (G, b, b)`` from packed ``v (G, b(b-1)/2)`` fp32, both conventions, against
    float64 ``torch.linalg.solve`` on the same (fp32-rounded) ``v``. Cases: b = 7 (odd, padded), 32, 128
    (the largest block, 66 KB of shared memory), G = 0; ``‖Q‖_F`` about 2 (cond(I ± Q) <= 3). Length
    ``L = b²`` (a Gauss-Jordan entry accumulates ~b rounded updates of growth ~b)."""
    op = op if op is not None else torch.ops.pyfastpeft_C.cayley_exact
    gen = torch.Generator().manual_seed(777)
    worst = 0.0
    for G, b in ((5, 7), (3, 32), (2, 128), (0, 4)):
        n = b * (b - 1) // 2
        v64 = _randn(gen, G, n)
        v64 = v64 * (2.0 / max(b, 2) ** 1.0)  # ‖Q‖_F ≈ √2 ‖v‖ ≈ 2 per block
        v32 = v64.float()
        rows, cols = torch.triu_indices(b, b, 1)
        Q = torch.zeros(G, b, b, dtype=torch.float64)
        Q[:, rows, cols] = v32.double()
        Q = Q - Q.transpose(1, 2)
        eye = torch.eye(b, dtype=torch.float64).expand(G, b, b)
        for minus in (True, False):
            ref = (torch.linalg.solve(eye + Q, eye - Q, left=False) if minus
                   else torch.linalg.solve(eye - Q, eye + Q, left=False))
            out = op(v32.to(device), b, minus)
            if tuple(out.shape) != (G, b, b) or out.dtype != torch.float32:
                return math.inf
            worst = max(worst, _norm_err(out, ref, torch.float32, b * b))
    return worst


TWIN_CHECKS["cayley_exact"] = check_cayley_exact


# ----------------------------------------------------------------------------------------------------
# verdicts: memory + JSON cache
# ----------------------------------------------------------------------------------------------------

def enabled() -> bool:
    """False when ``PYFASTPEFT_TWIN_CHECK`` is 0/false/off/no (read on every call)."""
    return os.environ.get("PYFASTPEFT_TWIN_CHECK", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_path() -> Path:
    """``$PYFASTPEFT_CACHE_DIR/twin_checks.json``, else ``~/.cache/pyfastpeft/twin_checks.json``."""
    base = os.environ.get("PYFASTPEFT_CACHE_DIR") or os.path.join(Path.home(), ".cache", "pyfastpeft")
    return Path(base) / CACHE_FILE


def _pkg_version() -> str:
    mod = sys.modules.get("pyfastpeft")
    ver = getattr(mod, "__version__", None)
    if ver:
        return str(ver)
    try:
        return importlib.metadata.version("pyfastpeft")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _ext_fingerprint() -> str:
    """Size and mtime of the loaded ``pyfastpeft._C``: a rebuilt extension (same version) is re-checked."""
    path = getattr(sys.modules.get("pyfastpeft._C"), "__file__", None)
    if not path:
        return "none"
    try:
        st = os.stat(path)
    except OSError:
        return "unknown"
    return f"{os.path.basename(path)}:{st.st_size}:{int(st.st_mtime)}"


def _identity(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(idx)
        cc = "%d.%d" % torch.cuda.get_device_capability(idx)
    else:
        gpu, cc = device.type, "n/a"
    return {"gpu": gpu, "cc": cc, "pyfastpeft": _pkg_version(), "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "ext": _ext_fingerprint()}


def _key(op: str, ident: dict[str, str]) -> str:
    return "|".join([op] + [f"{k}={ident[k]}" for k in sorted(ident)])


def _read_cache(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # unreadable or corrupt: start over (it is only a cache)
        log.debug("pyfastpeft: ignoring unreadable twin-check cache %s (%s)", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _write_entry(path: Path, key: str, entry: dict) -> None:
    """Read-modify-write with an atomic replace; a read-only home only costs a re-check next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=".twin_checks.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log.debug("pyfastpeft: could not write twin-check cache %s (%s)", path, e)


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


def cuda_op_ok(op: str, device: torch.device) -> Optional[str]:
    """None if ``torch.ops.pyfastpeft_C.<op>`` passed its twin check on ``device``, else a reason.

    The check runs on the first call per (op, GPU, versions) and is cached in memory and on disk.
    Always None when ``PYFASTPEFT_TWIN_CHECK=0``. An op without a registered check is disabled.
    """
    if not enabled():
        return None
    fn = TWIN_CHECKS.get(op)
    if fn is None:
        return f"pyfastpeft: CUDA op {op} has no twin check in pyfastpeft._twin.TWIN_CHECKS; it stays disabled"
    return _run_check(op, torch.device(device), fn)
