"""``pyfastpeft bench --device cuda --smoke``: one command for whoever has a GPU, within a time budget
(8 minutes by default), that leaves one results file the dispatch and the model read.

Stages, each announced with the time left and skipped, with the reason, when the budget is spent:

a. **build** the CUDA extension in place (``python setup.py build_ext --inplace`` with
   ``PYFASTPEFT_BUILD_CUDA=1`` and the GPU's own architecture) when nvcc and a source checkout are here;
   a failure is reported, not fatal;
b. **GPU tests**: ``pytest -m gpu`` of the checkout's ``tests/``, with a timeout; pass/fail counts recorded;
c. **timing** with CUDA events (``triton.testing.do_bench``, quantiles 0.5 / 0.2 / 0.8): LoRA linear at the
   spec's shapes (Llama-3-8B 4096 x 4096, M = 8192; ViT-B/16 768 x 768, M = 64 * 197; r = 16; bf16) for the
   frozen layer (``F.linear``: cuBLAS) and each runnable backend (after the fp64 correctness gate), in fwd,
   bwd and fwd+bwd; then every other op's runnable backends at the largest case of its check table; then the
   plain cuBLAS GEMM against our fused Triton LoRA forward at the Llama shape, which gives the measured
   Triton efficiency (our kernel's FLOP rate over cuBLAS's);
d. **one results JSON** (``core/results.py`` documents and validates the schema) in ``pyfastpeft-results/``
   (``--out`` to change): machine identity, rows, the per-(primitive op, shape bucket) timings the dispatch
   reads, and the Triton efficiency the model reads. Point ``PYFASTPEFT_RESULTS`` at it, or ship it in
   ``pyfastpeft/data/results/``.

The machine-facing parts (CUDA check, timer, identity, subprocesses, clock) are :data:`hooks`, so the
logic is tested on a CPU with fakes.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

BUDGET_S = 480.0
MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)
ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout (setup.py, tests/) when run from source


def _do_bench(fn: Callable[[], Any], what: str, leaves: Sequence[torch.Tensor] = ()) -> tuple[float, float, float]:
    import triton.testing

    return tuple(float(v) for v in triton.testing.do_bench(fn, grad_to_none=list(leaves) or None,
                                                            quantiles=list(QUANTILES)))  # type: ignore[return-value]


def _run(cmd: Sequence[str], env: dict, timeout: float, cwd: Path) -> tuple[Optional[int], str]:
    """``(returncode, output)``; returncode None when it ran past ``timeout``."""
    try:
        p = subprocess.run(list(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        return None, out.decode(errors="replace") if isinstance(out, bytes) else str(out)


def _identity(device: torch.device) -> dict:
    from pyfastpeft.core import tune

    return dict(tune.hooks.identity(device))


@dataclass
class Hooks:
    """What the smoke command asks of the machine; replaced by fakes in tests."""

    cuda_available: Callable[[], bool] = torch.cuda.is_available
    timer: Callable[..., tuple[float, float, float]] = _do_bench  # (fn, what, leaves) -> ms (p50, p20, p80)
    identity: Callable[[torch.device], dict] = _identity
    run: Callable[..., tuple[Optional[int], str]] = _run  # (cmd, env, timeout, cwd)
    clock: Callable[[], float] = time.monotonic
    nvcc: Callable[[], Optional[str]] = lambda: shutil.which("nvcc")
    root: Path = ROOT


hooks = Hooks()


class Budget:
    """Seconds left of the smoke's total budget."""

    def __init__(self, total_s: float):
        self.total_s, self.start = float(total_s), hooks.clock()

    def spent(self) -> float:
        return hooks.clock() - self.start

    def left(self) -> float:
        return self.total_s - self.spent()


def _say(budget: Budget, msg: str) -> None:
    print(f"[smoke {budget.spent():5.0f} s / {budget.total_s:.0f} s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# a. build, b. GPU tests
# ----------------------------------------------------------------------------------------------------
def stage_build(budget: Budget, device: torch.device, reserve_s: float = 240.0) -> dict:
    """Build ``pyfastpeft._C`` in place; ``{"status": built | failed | skipped, "why", "seconds"}``."""
    if not (hooks.root / "setup.py").is_file():
        return {"status": "skipped", "why": "not a source checkout (no setup.py): install with the extension instead"}
    if hooks.nvcc() is None:
        return {"status": "skipped", "why": "nvcc not found (put the CUDA toolkit's bin on PATH to build)"}
    limit = min(budget.left() - reserve_s, 240.0)
    if limit < 30:
        return {"status": "skipped", "why": f"time budget spent ({budget.left():.0f} s left)"}
    cc = hooks.identity(device).get("cc", "")
    env = dict(os.environ, PYFASTPEFT_BUILD_CUDA="1")
    if re.fullmatch(r"\d+\.\d+", cc or ""):
        env["TORCH_CUDA_ARCH_LIST"] = cc  # this GPU only: the fastest build that runs here
    t0 = hooks.clock()
    rc, out = hooks.run([sys.executable, "setup.py", "build_ext", "--inplace"], env, limit, hooks.root)
    secs = round(hooks.clock() - t0, 1)
    if rc == 0:
        return {"status": "built", "seconds": secs}
    why = f"ran past {limit:.0f} s" if rc is None else f"exit {rc}: " + " | ".join(out.strip().splitlines()[-3:])[:400]
    return {"status": "failed", "why": why, "seconds": secs}


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def stage_tests(budget: Budget, reserve_s: float = 150.0) -> dict:
    """``pytest -m gpu``; ``{"status": passed | failed | skipped, "passed", "failed", "skipped", ...}``."""
    tests = hooks.root / "tests"
    if not tests.is_dir():
        return {"status": "skipped", "why": "no tests/ folder here (run the smoke from a source checkout)"}
    limit = min(budget.left() - reserve_s, 180.0)
    if limit < 20:
        return {"status": "skipped", "why": f"time budget spent ({budget.left():.0f} s left)"}
    t0 = hooks.clock()
    rc, out = hooks.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(tests)],
                        dict(os.environ), limit, hooks.root)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    for n, what in _COUNT.findall(tail):
        key = "errors" if what.startswith("error") else what
        if key in counts:
            counts[key] = int(n)
    res = {**counts, "seconds": round(hooks.clock() - t0, 1), "summary": tail[:300]}
    if rc is None:
        return {**res, "status": "failed", "why": f"ran past {limit:.0f} s"}
    return {**res, "status": "passed" if rc == 0 or (rc == 5 and not counts["failed"]) else "failed"}


# ----------------------------------------------------------------------------------------------------
# c. timing
# ----------------------------------------------------------------------------------------------------
@dataclass
class Target:
    """One op at one shape: ``providers`` maps a provider name to ``prepare() -> bench.Prepared``."""

    op: str
    label: str
    shape: dict
    providers: dict[str, Callable[[], Any]]
    gy: Callable[[torch.Tensor], torch.Tensor]
    gate: Optional[Callable[[Any], Optional[str]]] = None  # None: correctness is the GPU tests' job
    modes: tuple[str, ...] = MODES


def lora_targets(device: torch.device, dtype: torch.dtype, workloads: Sequence[Any]) -> list[Target]:
    """LoRA linear at ``workloads`` (``bench.LinearWorkload``): frozen + each runnable backend, gated."""
    import pyfastpeft
    from pyfastpeft.tools import bench

    out = []
    for w in workloads:
        inp = bench.make_inputs(w, dtype, device)
        provs: dict[str, Callable[[], Any]] = {"frozen": (lambda inp=inp: bench.prepare_frozen(inp))}
        for b in pyfastpeft.available_backends("lora_linear", device):
            provs[b] = (lambda inp=inp, b=b: bench.prepare_pyfastpeft(b)(inp))
        ref = [None]

        def gate(p, w=w, inp=inp, ref=ref):
            if ref[0] is None:
                ref[0] = bench.reference(inp, w, dtype, 1)
            return bench.gate(p, ref[0], w)

        out.append(Target("lora_linear", w.label, {"M": w.M, "K": w.K, "N": w.N, "R": w.R}, provs,
                          gy=lambda y, g=torch.Generator(device=device).manual_seed(1): torch.randn(
                              y.shape, generator=g, device=y.device, dtype=torch.float32).to(y.dtype),
                          gate=gate))
    return out


def check_targets(device: torch.device, dtype: torch.dtype, skip: Sequence[str] = ("lora_linear",),
                  ops: Optional[Sequence[str]] = None, backends: Optional[Sequence[str]] = None) -> list[Target]:
    """Every other op of the check table at its largest case, each runnable backend."""
    import pyfastpeft
    from pyfastpeft.tools import check as _check

    out = []
    for chk in _check.CHECKS:
        if chk.op in skip or (ops is not None and chk.op not in ops):
            continue
        if any(t.op == chk.op for t in out):
            continue
        cases = chk.cases(device, dtype)
        if not cases:
            continue
        sized = [(sum(v.numel() for v in chk.make(c, torch.Generator().manual_seed(0)).values()
                      if isinstance(v, torch.Tensor)), i) for i, c in enumerate(cases)]
        case = cases[max(sized)[1]]
        leaves = chk.make(case, torch.Generator().manual_seed(0))

        def prep(backend, chk=chk, leaves=leaves):
            from pyfastpeft.tools.bench import Prepared

            ls = _check._to(leaves, dtype, device, chk.grads, chk.keep_fp32)
            kw = chk.build(ls)
            grads = [ls[k] for k in chk.grads if isinstance(ls.get(k), torch.Tensor)]
            return Prepared(lambda: chk.call(kw, backend), grads, lambda: {})

        provs = {b: (lambda b=b, prep=prep: prep(b)) for b in pyfastpeft.available_backends(chk.op, device)
                 if backends is None or b in backends}
        out.append(Target(chk.op, f"{chk.op} {getattr(case, 'name', case)}", {"case": str(getattr(case, "name", case))},
                          provs, gy=lambda y: torch.randn_like(y), modes=MODES if chk.grads else ("fwd",)))
    return out


def _row(t: Target, provider: str, mode: str, dtype: torch.dtype, status: str,
         q: Optional[tuple[float, float, float]] = None) -> dict:
    from pyfastpeft.tools import timing

    r = {"op": t.op, "label": t.label, "shape": t.shape, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
         "provider": provider, "backend": None if provider in ("frozen", "cublas-gemm") else provider.split(":")[0],
         "variant": provider.split(":", 1)[1] if ":" in provider else None, "status": status,
         "ms_p50": None, "ms_p20": None, "ms_p80": None, "spread": None, "noisy": None, "ratio_to_frozen": None}
    if q is not None:
        r["ms_p50"], r["ms_p20"], r["ms_p80"] = (float(v) for v in q)
        r["spread"] = timing.spread(*q)
        r["noisy"] = timing.noisy(*q)
    return r


def time_targets(targets: Sequence[Target], dtype: torch.dtype, budget: Budget, reserve_s: float = 20.0,
                 say: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Time every (target, provider, mode); returns ``(rows, dispatch)`` where ``dispatch`` maps
    ``"<primitive op>|<shape bucket>"`` to ``{"times_ms": {backend: ms}, "fastest": backend}`` from the
    primitives each forced call ran (recorded by ``core.backend.record_calls``)."""
    from pyfastpeft.core.backend import record_calls
    from pyfastpeft.tools.bench import mode_callable

    rows: list[dict] = []
    disp: dict[str, dict] = {}
    for t in targets:
        if budget.left() < reserve_s:
            rows.extend(_row(t, prov, m, dtype, f"skipped: time budget spent ({budget.left():.0f} s left)")
                        for prov in t.providers for m in t.modes)
            continue
        say(f"timing {t.label}: {', '.join(t.providers)}")
        for prov, prepare in t.providers.items():
            try:
                p = prepare()
                bad = t.gate(p) if (t.gate is not None and prov != "frozen") else None
            except Exception as e:  # noqa: BLE001 - a provider that cannot run is a row, not a crash
                bad = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
                p = None
            if bad is not None:
                rows.extend(_row(t, prov, m, dtype, f"FAILED correctness: {bad}" if p is not None else f"FAILED: {bad}")
                            for m in t.modes)
                continue
            gy = None
            for mode in t.modes:
                try:
                    if gy is None and mode != "fwd":
                        y = p.fn()
                        gy = t.gy(y)
                        del y
                    for leaf in p.leaves:
                        leaf.grad = None
                    tc = mode_callable(p, mode, gy)
                    with record_calls() as rec:
                        tc.call()  # once outside the timer: which primitives (and buckets) this mode runs
                    q = hooks.timer(tc.call, f"{t.label}/{mode}/{prov}", tc.leaves)
                except Exception as e:  # noqa: BLE001
                    rows.append(_row(t, prov, mode, dtype, f"FAILED while timing: {type(e).__name__}: {e}"[:300]))
                    continue
                rows.append(_row(t, prov, mode, dtype, "ok", q))
                if prov == "frozen" or mode == "fwd+bwd":
                    continue
                phase = "_fwd" if mode == "fwd" else "_bwd"
                for op, bucket, _ in rec:
                    if op.endswith(phase) or not op.endswith(("_fwd", "_bwd")):
                        e = disp.setdefault(f"{op}|{bucket}", {"op": op, "bucket": bucket, "times_ms": {}})
                        e["times_ms"][prov] = float(q[0])
    for e in disp.values():
        e["fastest"] = min(e["times_ms"], key=e["times_ms"].get)
    _ratios(rows)
    return rows, disp


def _ratios(rows: list[dict]) -> None:
    from pyfastpeft.tools import timing

    base = {(r["op"], r["label"], r["mode"]): r for r in rows if r["provider"] == "frozen" and r["ms_p50"]}
    for r in rows:
        b = base.get((r["op"], r["label"], r["mode"]))
        if b is None or not r["ms_p50"]:
            continue
        r["ratio_to_frozen"] = r["ms_p50"] / b["ms_p50"]
        r["ratio_to_frozen_noisy"] = bool(r["noisy"] or b["noisy"])
        if r["ratio_to_frozen_noisy"]:
            r["note"] = timing.FOOTNOTE


def triton_efficiency(device: torch.device, dtype: torch.dtype, w: Any, budget: Budget,
                      say: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """Our fused Triton LoRA forward's FLOP rate over cuBLAS's ``addmm`` at the same GEMM shape (``w``):
    ``{"value", "cublas_ms", "triton_ms", "gemm": {...}}`` (value None, with ``why``, when not measurable),
    and the two timing rows."""
    import pyfastpeft
    from pyfastpeft.tools import bench

    gemm = {"M": w.M, "K": w.K, "N": w.N, "R": w.R, "dtype": str(dtype).replace("torch.", "")}
    if "triton" not in pyfastpeft.available_backends("lora_linear", device):
        return {"value": None, "why": "the triton backend does not run here", "gemm": gemm}, []
    if budget.left() < 10:
        return {"value": None, "why": "time budget spent", "gemm": gemm}, []
    say(f"Triton efficiency: cuBLAS addmm vs the fused Triton LoRA forward at M={w.M} K={w.K} N={w.N} r={w.R}")
    from pyfastpeft.triton_kernels.lora._lora_linear_cost import fwd_cost

    inp = bench.make_inputs(w, dtype, device)
    x, W, b, A, B = inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"]
    t = Target("gemm", f"gemm M{w.M} K{w.K} N{w.N}", gemm, {}, gy=lambda y: y, modes=("fwd",))
    rows = []
    with torch.no_grad():
        qc = hooks.timer(lambda: torch.addmm(b, x, W.t()), "gemm/cublas", ())
        qt = hooks.timer(lambda: pyfastpeft.lora_linear(x, W, b, A, B, inp["scale"], backend="triton"),
                         "gemm/triton", ())
    rows.append(_row(t, "cublas-gemm", "fwd", dtype, "ok", qc))
    rows.append(_row(t, "triton", "fwd", dtype, "ok", qt))
    rows[-1]["variant"] = "lora_fwd"
    fused = fwd_cost(w.M, w.N, w.K, w.R, x.element_size(), has_bias=True, has_xl=False)["flops"]
    value = (fused / qt[0]) / (2 * w.M * w.N * w.K / qc[0])
    return {"value": round(value, 4), "cublas_ms": qc[0], "triton_ms": qt[0], "gemm": gemm,
            "how": "FLOP rate of the fused Triton LoRA forward (its declared FLOPs, rank-r work included) over "
                   "cuBLAS addmm's (2 M N K) at the same shape; medians of do_bench",
            "noisy": bool(rows[0]["noisy"] or rows[1]["noisy"])}, rows


# ----------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------
def smoke(device: torch.device, out_dir: Path, budget_s: float = BUDGET_S, *, argv: Sequence[str] = (),
          lora_workloads: Optional[Sequence[Any]] = None, ops: Optional[Sequence[str]] = None,
          dtype: torch.dtype = torch.bfloat16, build: bool = True, tests: bool = True,
          backends: Optional[Sequence[str]] = None) -> tuple[int, Optional[Path]]:
    """Run the stages; returns ``(exit code, results path)``."""
    from pyfastpeft.core import results
    from pyfastpeft.tools import bench

    budget = Budget(budget_s)
    say = lambda m: _say(budget, m)  # noqa: E731
    ident = hooks.identity(device)
    say(f"on {ident.get('gpu')} (cc {ident.get('cc')}), budget {budget_s:.0f} s")
    stages: dict[str, dict] = {}
    say("a. build the CUDA extension")
    stages["build"] = stage_build(budget, device) if build else {"status": "skipped", "why": "not asked"}
    say(f"   build: {stages['build']['status']} {stages['build'].get('why', '')}".rstrip())
    say("b. GPU tests (pytest -m gpu)")
    stages["tests"] = stage_tests(budget) if tests else {"status": "skipped", "why": "not asked"}
    say(f"   tests: {stages['tests']['status']} {stages['tests'].get('summary') or stages['tests'].get('why', '')}")
    say("c. timing against the frozen layer (cuBLAS)")
    if lora_workloads is None:
        lora_workloads = [bench.LinearWorkload("llama3-8b", bench.LLAMA3_8B_TOKENS, 4096, 4096, 16, bench.LLAMA3_8B_TOKENS),
                          bench.LinearWorkload("vit-b16", bench.VIT_B16_TOKENS, 768, 768, 16, bench.VIT_B16_TOKENS)]
    targets = lora_targets(device, dtype, lora_workloads) + check_targets(device, dtype, ops=ops, backends=backends)
    rows, disp = time_targets(targets, dtype, budget, say=say)
    eff, eff_rows = triton_efficiency(device, dtype, lora_workloads[0], budget, say=say)
    rows += eff_rows
    stages["timing"] = {"status": "done" if not any(r["status"].startswith("skipped") for r in rows) else "partial",
                        "rows": len(rows), "failed": sum(r["status"].startswith("FAILED") for r in rows)}
    data = {"format": results.FORMAT, "version": results.VERSION, "machine": ident,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "pyfastpeft " + " ".join(argv), "budget_s": budget_s, "seconds": round(budget.spent(), 1),
            "stages": stages, "timer": "triton.testing.do_bench (CUDA events, quantiles 0.5/0.2/0.8, L2 flushed)",
            "rows": rows, "dispatch": disp, "triton_efficiency": eff}
    bad = results.validate(data)
    if bad:  # a bug here, not the user's: say so rather than write a file the readers would reject
        print(f"pyfastpeft bench --smoke: the results are not valid ({'; '.join(bad)})", file=sys.stderr)
        return 1, None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"smoke-{bench.sanitize(str(ident.get('gpu')))}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    say(f"d. wrote {path}")
    for r in rows:
        if r["ms_p50"] is not None and r["mode"] == "fwd+bwd":
            rt = r.get("ratio_to_frozen")
            rtxt = "" if rt is None else (f"  ({rt:.2f})! x frozen: spread > 20 %" if r.get("ratio_to_frozen_noisy")
                                          else f"  {rt:.2f} x frozen")
            say(f"   {r['label']:<32} {r['provider']:<8} fwd+bwd {r['ms_p50']:.3f} ms{rtxt}")
    say(f"   Triton efficiency: {eff.get('value') if eff.get('value') is not None else eff.get('why')}")
    say(f"use it: PYFASTPEFT_RESULTS={path} (dispatch default without measuring; the model's Triton efficiency)")
    failed = stages["tests"]["status"] == "failed" or stages["timing"]["failed"] > 0
    return (1 if failed else 0), path


def main(device_name: str, out: Optional[str], budget_s: Optional[float], argv: Sequence[str] = ()) -> int:
    from pyfastpeft.tools import bench

    if device_name != "cuda" or not hooks.cuda_available():
        print("pyfastpeft bench --smoke: needs a CUDA GPU (run it with --device cuda on a machine where "
              "torch.cuda.is_available() is true)", file=sys.stderr)
        return 2
    code, _ = smoke(torch.device("cuda"), bench.results_dir(out), budget_s or BUDGET_S, argv=argv)
    return code
