"""``pyfastpeft bench``: the LoRA-linear workloads of ``docs/performance.md`` on this device.

One source of truth for the workloads (``benchmarks/shapes.py`` and the pytest-benchmark suite import
them from here), the providers, the correctness gate, the timers, the results files and the plot.

* Workloads: Llama-3-8B projections (M = 8192 tokens) and ViT-B/16 (M = 64 * 197), r in {8, 16, 64};
  bf16 on a GPU, fp32 with M / 16 on a CPU.
* Providers: ``frozen`` (``F.linear`` with the frozen weight; the target), ``pyfastpeft-<backend>`` for
  every backend available here (forced, under ``PYFASTPEFT_STRICT=1``), ``peft`` (a real PEFT
  ``lora.Linear`` with the same weights, B non-zero), ``ref-eager`` and ``ref-compile`` (the reference,
  eager and under ``torch.compile``).
* Modes: ``fwd`` (training forward: inputs require grad), ``bwd`` (forward once, then time
  ``y.backward(g, retain_graph=True)``), ``fwd+bwd``.
* Gate: before timing, each provider's output and gradients (x, A, B) are compared with the fp64
  reference by :func:`pyfastpeft.testing.compare`; a wrong provider gets a ``FAILED correctness`` row and
  no timing.
* Timer: CUDA: ``triton.testing.do_bench(quantiles=(0.5, 0.2, 0.8))`` (L2 flushed); CPU:
  :func:`pyfastpeft.tools.timing.time_interleaved` (warm-up, then rounds that run every provider once in
  rotating order; median / p20 / p80 of the per-call times).
* Spread: every timing carries ``spread = (p80 - p20) / median``; a row over 20 % is flagged ``!`` (not a
  result) in the tables and hatched in the plot, and a ratio that uses a flagged row is flagged too
  (:mod:`pyfastpeft.tools.timing`).
* Output: ``./pyfastpeft-results/`` (:data:`DEFAULT_OUT_DIR`, git-ignored) unless ``--out`` names a folder, so
  the committed ``benchmarks/results/`` files change only on purpose (``--out benchmarks/results``).
* Modeled columns (labelled as models): bytes saved for backward per token
  (``pyfastpeft.tools.perf.saved_bytes``) and modeled H100 fwd+bwd time in bf16 at the GPU shape
  (``pyfastpeft.tools.perf.count`` + ``roofline``).
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from pyfastpeft import testing
from pyfastpeft.tools.check import DTYPE_NAMES
from pyfastpeft.core.table import table
from pyfastpeft.tools import timing as _timing
from pyfastpeft.tools.timing import time_interleaved

# ----------------------------------------------------------------------------------------------------
# workloads (docs/performance.md section 3)
# ----------------------------------------------------------------------------------------------------
LLAMA3_8B_TOKENS = 8192
LLAMA3_8B_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
VIT_B16_TOKENS = 64 * 197
VIT_B16_SHAPES: tuple[tuple[int, int], ...] = ((768, 768), (768, 3072), (3072, 768))
LORA_RANKS: tuple[int, ...] = (8, 16, 64)
CPU_M_DIVISOR = 16
MODELS = {"llama3-8b": (LLAMA3_8B_TOKENS, LLAMA3_8B_SHAPES), "vit-b16": (VIT_B16_TOKENS, VIT_B16_SHAPES)}
MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)
OP = "lora_linear"


@dataclass(frozen=True)
class LinearWorkload:
    """One LoRA linear workload: ``x (M, K)``, ``W (N, K)``, rank ``R``; ``gpu_M`` is the spec's token count
    (used for the modeled H100 time whatever ``M`` is benchmarked here)."""

    model: str
    M: int
    K: int
    N: int
    R: int
    gpu_M: int

    @property
    def name(self) -> str:
        return f"{self.model} {self.K}x{self.N} r{self.R}"

    @property
    def label(self) -> str:
        return f"{self.name} M{self.M}"


def lora_workloads(device: str | torch.device = "cuda", *, quick: bool = False, tiny: bool = False,
                   ranks: Sequence[int] = LORA_RANKS) -> list[LinearWorkload]:
    """The LoRA linear workloads for ``device`` (GPU: the spec's M; CPU: M / 16).

    ``quick``: ViT-B (768, 768) r=16 and Llama (4096, 4096) r=16, the latter at M / 8 (so on CPU M / 128);
    ``tiny``: one small shape (for tests and smoke runs).
    """
    dev = torch.device(device)
    div = 1 if dev.type == "cuda" else CPU_M_DIVISOR
    if tiny:
        return [LinearWorkload("tiny", 64, 96, 80, 8, 64)]
    if quick:
        return [LinearWorkload("vit-b16", VIT_B16_TOKENS // div, 768, 768, 16, VIT_B16_TOKENS),
                LinearWorkload("llama3-8b", LLAMA3_8B_TOKENS // (8 * div), 4096, 4096, 16, LLAMA3_8B_TOKENS)]
    out = []
    for model, (m, shapes) in MODELS.items():
        for K, N in shapes:
            for R in ranks:
                out.append(LinearWorkload(model, m // div, K, N, R, m))
    return out


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# explicit formulas for the TFLOP/s and GB/s columns (not measured; minimal traffic, each tensor once)
def flops(w: LinearWorkload, provider: str, mode: str) -> float:
    M, K, N, R = w.M, w.K, w.N, w.R
    if provider == "frozen":
        f, b = 2 * M * K * N, 2 * M * N * K  # bwd: dx only (the weight is frozen)
    else:
        f = 2 * M * (K * N + K * R + R * N)
        b = 2 * M * (N * K + 2 * N * R + 2 * R * K)  # dx = dy W + g A; g = dy B; dA = g^T x; dB = dy^T u
    return {"fwd": f, "bwd": b, "fwd+bwd": f + b}[mode]


def min_bytes(w: LinearWorkload, provider: str, mode: str, elem: int) -> float:
    M, K, N, R = w.M, w.K, w.N, w.R
    if provider == "frozen":
        f = M * K + N * K + M * N  # x, W, y
        b = M * N + N * K + M * K  # dy, W, dx
    else:
        f = M * K + N * K + M * N + R * K + N * R + M * R  # x, W, y, A, B, u (saved)
        b = M * N + N * K + 2 * M * K + M * R + 2 * (R * K + N * R)  # dy, W, x, dx, u, A/B + grads
    return elem * {"fwd": f, "bwd": b, "fwd+bwd": f + b}[mode]


# ----------------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------------
class Skip(Exception):
    """A provider that cannot run here; the message is the reason."""


@dataclass
class Prepared:
    """A provider ready to run one workload: ``fn()`` returns the output; ``leaves`` are the tensors
    whose ``.grad`` is reset between reps; ``grads()`` returns ``{"x", "lora_a", "lora_b"}`` gradients."""

    fn: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    grads: Callable[[], dict]
    note: str = ""


def make_inputs(w: LinearWorkload, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Random inputs (drawn in fp32 on the device, then cast; B is not zero)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    return dict(x=r(w.M, w.K), weight=r(w.N, w.K, scale=w.K ** -0.5), bias=r(w.N),
                lora_a=r(w.R, w.K, scale=w.K ** -0.5), lora_b=r(w.N, w.R, scale=w.R ** -0.5), scale=2.0)


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def _grads_of(**ts: torch.Tensor) -> Callable[[], dict]:
    return lambda: {k: (v.grad if v is not None else None) for k, v in ts.items()}


def prepare_frozen(inp: dict, **_: Any) -> Prepared:
    x, W, b = _leaf(inp["x"], True), inp["weight"], inp["bias"]
    return Prepared(lambda: F.linear(x, W, b), [x], _grads_of(x=x))


def prepare_pyfastpeft(backend: str) -> Callable[..., Prepared]:
    def prep(inp: dict, **_: Any) -> Prepared:
        import pyfastpeft
        x, A, B = _leaf(inp["x"], True), _leaf(inp["lora_a"], True), _leaf(inp["lora_b"], True)
        W, b, s = inp["weight"], inp["bias"], inp["scale"]
        return Prepared(lambda: pyfastpeft.lora_linear(x, W, b, A, B, s, backend=backend), [x, A, B],
                        _grads_of(x=x, lora_a=A, lora_b=B))
    return prep


def peft_lora_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float) -> torch.nn.Module:
    """A real PEFT ``lora.Linear`` around an ``nn.Linear`` holding ``weight``/``bias``, with ``lora_a`` /
    ``lora_b`` copied in and ``lora_alpha`` chosen so that PEFT's ``scaling`` equals ``scale``.
    Built through ``get_peft_model`` on a one-layer module (a stable public API across PEFT versions)."""
    try:
        import peft
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Skip(f"peft not importable ({type(e).__name__}: {e})") from None
    N, K = weight.shape
    R = lora_a.shape[0]

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(K, N, bias=bias is not None, device=weight.device, dtype=weight.dtype)

    base = One()
    with torch.no_grad():
        base.proj.weight.copy_(weight)
        if bias is not None:
            base.proj.bias.copy_(bias)
    cfg = peft.LoraConfig(r=R, lora_alpha=scale * R, lora_dropout=0.0, target_modules=["proj"], bias="none")
    model = peft.get_peft_model(base, cfg)
    layer = model.base_model.model.proj
    if abs(layer.scaling["default"] - scale) > 1e-12:
        raise Skip(f"peft scaling {layer.scaling['default']} != {scale}")
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    layer.to(device=weight.device, dtype=weight.dtype)
    return layer


def prepare_peft(inp: dict, **_: Any) -> Prepared:
    layer = peft_lora_layer(inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["scale"])
    x = _leaf(inp["x"], True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return Prepared(lambda: layer(x), [x, A, B], _grads_of(x=x, lora_a=A, lora_b=B),
                    note=f"peft {_version('peft')}")


def _ref(x, weight, bias, lora_a, lora_b, scale):
    from pyfastpeft.reference import lora_linear_ref
    return lora_linear_ref(x, weight, bias, lora_a, lora_b, scale)


def prepare_ref_eager(inp: dict, **_: Any) -> Prepared:
    x, A, B = _leaf(inp["x"], True), _leaf(inp["lora_a"], True), _leaf(inp["lora_b"], True)
    W, b, s = inp["weight"], inp["bias"], inp["scale"]
    return Prepared(lambda: _ref(x, W, b, A, B, s), [x, A, B], _grads_of(x=x, lora_a=A, lora_b=B))


def prepare_ref_compile(inp: dict, *, device: torch.device, **_: Any) -> Prepared:
    """``torch.compile`` of the reference: inductor; on CPU, when inductor cannot compile, aot_eager."""
    from pyfastpeft.reference import lora_linear_ref
    x, A, B = _leaf(inp["x"], True), _leaf(inp["lora_a"], True), _leaf(inp["lora_b"], True)
    W, b, s = inp["weight"], inp["bias"], inp["scale"]
    backends = ["inductor"] + (["aot_eager"] if device.type == "cpu" else [])
    errors = []
    for cb in backends:
        try:
            torch._dynamo.reset()
            fn = torch.compile(lora_linear_ref, backend=cb, dynamic=False)
            y = fn(x, W, b, A, B, s)  # compile forward and backward now, outside any timer
            y.backward(torch.ones_like(y))
            x.grad = A.grad = B.grad = None
        except Exception as e:  # noqa: BLE001 - compiler failures are reported, not raised
            errors.append(f"{cb}: {type(e).__name__}: {str(e).strip().splitlines()[0][:100] if str(e).strip() else ''}")
            continue
        return Prepared(lambda: fn(x, W, b, A, B, s), [x, A, B], _grads_of(x=x, lora_a=A, lora_b=B),
                        note=f"torch.compile backend={cb}, donated_buffer=False" + (f" (after {'; '.join(errors)})" if errors else ""))
    raise Skip("torch.compile failed: " + " | ".join(errors))


def _no_donated_buffers():
    """AOTAutograd's donated buffers forbid ``backward(retain_graph=True)`` (the bwd mode); :func:`run`
    switches them off (where this torch has them) for the whole run when ``ref-compile`` is benchmarked."""
    try:
        import torch._functorch.config as cfg
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(cfg, "donated_buffer"):
        return contextlib.nullcontext()
    return cfg.patch(donated_buffer=False)


def provider_table(device: torch.device) -> dict[str, Callable[..., Prepared]]:
    """Every provider name -> its ``prepare``; ``pyfastpeft-<b>`` for each backend known to the library."""
    from pyfastpeft.core.backend import ORDER
    table: dict[str, Callable[..., Prepared]] = {"frozen": prepare_frozen}
    for b in ORDER:
        table[f"pyfastpeft-{b}"] = prepare_pyfastpeft(b)
    table.update({"peft": prepare_peft, "ref-eager": prepare_ref_eager, "ref-compile": prepare_ref_compile})
    return table


def default_providers(device: torch.device, quick: bool) -> list[str]:
    """All providers; a CPU quick run leaves out ``ref-compile`` (inductor's compile alone takes
    10-30 s per shape on a small CPU) unless asked for with ``--providers``."""
    names = list(provider_table(device))
    if quick and device.type == "cpu":
        names.remove("ref-compile")
    return names


def _unavailable_reason(provider: str, device: torch.device) -> Optional[str]:
    """Why a provider cannot run on ``device`` (None when it can), found without running it."""
    if not provider.startswith("pyfastpeft-"):
        return None
    backend = provider.split("-", 1)[1]
    import pyfastpeft
    here = list(pyfastpeft.available_backends(OP, device))
    if backend in here:
        return None
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "triton does not run on cpu (TRITON_INTERPRET=1 runs it in the interpreter: not a timing)"
    try:
        from pyfastpeft.tools.check import CHECKS, _skip_reason
        chk = next(c for c in CHECKS if c.op == OP)
        return _skip_reason(chk, backend, device, default_dtype(device))
    except Exception:  # noqa: BLE001
        return f"backend {backend!r} not available on {device.type}"


# ----------------------------------------------------------------------------------------------------
# correctness gate
# ----------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    y64: torch.Tensor
    g64: dict
    y_lo: Optional[torch.Tensor]
    g_lo: Optional[dict]
    gy: torch.Tensor


def reference(inp: dict, w: LinearWorkload, dtype: torch.dtype, seed: int = 1) -> Reference:
    """fp64 reference output and gradients (and, for fp16/bf16, the reference in that dtype)."""
    dev = inp["x"].device
    g = torch.Generator(device=dev).manual_seed(seed)
    gy = torch.randn(w.M, w.N, generator=g, device=dev, dtype=torch.float32).to(dtype)

    def run(dt: torch.dtype):
        x, A, B = (_leaf(inp[k].to(dt), True) for k in ("x", "lora_a", "lora_b"))
        W, b = inp["weight"].to(dt), inp["bias"].to(dt) if inp["bias"] is not None else None
        y = _ref(x, W, b, A, B, inp["scale"])
        y.backward(gy.to(dt))
        return y.detach(), {"x": x.grad, "lora_a": A.grad, "lora_b": B.grad}

    y64, g64 = run(torch.float64)
    y_lo = g_lo = None
    if dtype not in (torch.float32, torch.float64):
        y_lo, g_lo = run(dtype)
    return Reference(y64, g64, y_lo, g_lo, gy)


def gate(p: Prepared, ref: Reference, w: LinearWorkload) -> Optional[str]:
    """None when output and gradients pass :func:`pyfastpeft.testing.compare`; else what failed."""
    y = p.fn()
    bad = []
    v = testing.compare(y, ref.y64, ref.y_lo, factor=testing.FWD_FACTOR, reduction=w.K + w.R)
    if not v.ok:
        bad.append(f"out {v}")
    y.backward(ref.gy)
    red = {"x": w.N + w.R, "lora_a": max(w.M, w.N), "lora_b": max(w.M, w.K)}
    got = p.grads()
    for k, r64 in ref.g64.items():
        if got.get(k) is None:
            bad.append(f"d{k} missing")
            continue
        v = testing.compare(got[k], r64, None if ref.g_lo is None else ref.g_lo[k], factor=testing.GRAD_FACTOR,
                            reduction=red[k])
        if not v.ok:
            bad.append(f"d{k} {v}")
    for t in p.leaves:
        t.grad = None
    return "; ".join(bad) if bad else None


# ----------------------------------------------------------------------------------------------------
# timers
# ----------------------------------------------------------------------------------------------------
@dataclass
class Timed:
    call: Callable[[], Any]
    leaves: list[torch.Tensor]
    keep: Any = None  # the graph a bwd timing needs alive


def mode_callable(p: Prepared, mode: str, gy: torch.Tensor) -> Timed:
    if mode == "fwd":
        return Timed(p.fn, p.leaves)
    if mode == "bwd":
        y = p.fn()
        return Timed(lambda: y.backward(gy, retain_graph=True), p.leaves, keep=y)
    if mode == "fwd+bwd":
        return Timed(lambda: p.fn().backward(gy), p.leaves)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _reset(leaves: Iterable[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def time_cpu_interleaved(calls: dict[str, Timed], *, warmup: int = 2, budget_s: float = 1.0,
                         min_rounds: int = _timing.MIN_ROUNDS, max_rounds: int = 50) -> dict[str, Any]:
    """:func:`pyfastpeft.tools.timing.time_interleaved` over ``Timed`` calls (their leaves' gradients dropped
    before each call): ``{name: (median, p20, p80, per-round samples)}`` in ms per call, or
    ``{name: exception}`` for a provider whose call raised (it leaves the rotation)."""
    res = time_interleaved({n: t.call for n, t in calls.items()}, setup=lambda n: _reset(calls[n].leaves),
                           warmup=warmup, budget_s=budget_s, min_rounds=min_rounds, max_rounds=max_rounds, catch=True)
    return {n: q if isinstance(q, BaseException) else
            (q.median * 1e3, q.p20 * 1e3, q.p80 * 1e3, tuple(v * 1e3 for v in q.samples))
            for n, q in res.items()}


def time_cuda(t: Timed) -> tuple[float, float, float]:
    import triton.testing
    res = triton.testing.do_bench(t.call, grad_to_none=t.leaves, quantiles=list(QUANTILES))
    return tuple(float(v) for v in res)  # type: ignore[return-value]


def cuda_peak_mb(t: Timed) -> float:
    """Peak memory above what was allocated before one call, MiB."""
    _reset(t.leaves)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t.call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


# ----------------------------------------------------------------------------------------------------
# modeled columns (pyfastpeft.tools.perf)
# ----------------------------------------------------------------------------------------------------
def perf_model(w: LinearWorkload, providers: Sequence[str], *, saved_M: int = 64) -> tuple[dict, str]:
    """``{path: {"saved_bytes_per_token": b, "modeled_h100_ms": t}}`` for the code paths of ``providers``
    (frozen, pyfastpeft, peft, ref-eager), and a note saying what could not be counted.

    Saved bytes (``perf.saved_bytes``): bf16 meta tensors at the GPU shape (nothing computed); a path that
    cannot run on meta is counted on real CPU tensors with ``saved_M`` tokens (the count is linear in
    tokens). Modeled H100 fwd+bwd time: ``perf.count`` on meta tensors in bf16 at the GPU shape
    (``gpu_M`` tokens), then ``perf.roofline(device="h100")``; for pyfastpeft the launches the Triton
    path declares.
    """
    try:
        from pyfastpeft.tools import perf
    except Exception as e:  # noqa: BLE001
        return {}, f"modeled columns empty: pyfastpeft.tools.perf not importable ({type(e).__name__}: {e})"
    out: dict[str, dict] = {}
    notes: list[str] = []
    for kind in dict.fromkeys(_kind_label(p) for p in providers):
        code = {"frozen": "frozen", "peft": "peft", "ref-eager": "ref", "pyfastpeft": "pyfastpeft"}.get(kind)
        if code is None:
            continue
        out[kind] = {"saved_bytes_per_token": _saved_per_token(perf, code, w, saved_M, notes),
                     "modeled_h100_ms": _modeled_ms(perf, code, w, notes)}
        if code == "pyfastpeft":
            out[kind].update(_efficiency_columns(perf, w, notes))
    return out, "; ".join(dict.fromkeys(notes))


def _cublas_path_counts(perf: Any, w: LinearWorkload) -> Any:
    """The launches of LoRA's cuBLAS path (the torch backend on a GPU: rank-r GEMMs first, the base GEMM adding
    onto them as its C operand), forward and input-gradient backward, bf16 meta tensors at the GPU shape."""
    from pyfastpeft.lora import torch_impl

    m = torch.device("meta")
    e = lambda *s: torch.empty(*s, device=m, dtype=torch.bfloat16)  # noqa: E731
    x, W, A, B, dy, u = e(w.gpu_M, w.K), e(w.N, w.K), e(w.R, w.K), e(w.N, w.R), e(w.gpu_M, w.N), e(w.gpu_M, w.R)
    b = e(w.N)
    return (perf.count(lambda x: torch_impl.fwd(x, None, W, b, A, B, 2.0), x)
            + perf.count(lambda dy: torch_impl.bwd(dy, x, u, W, A, B, 2.0, 1), dy))


@contextlib.contextmanager
def triton_gemm(variant: str):
    """Count (or run) LoRA's ``triton`` backend as ``variant`` (``"vendor"`` or ``"fused"``) inside the block:
    sets ``PYFASTPEFT_TRITON_GEMM``, which also picks the launches its cost functions declare."""
    old = os.environ.get("PYFASTPEFT_TRITON_GEMM")
    os.environ["PYFASTPEFT_TRITON_GEMM"] = variant
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYFASTPEFT_TRITON_GEMM", None)
        else:
            os.environ["PYFASTPEFT_TRITON_GEMM"] = old


def triton_counts(perf: Any, w: LinearWorkload, variant: str) -> Any:
    """fwd+bwd launches of LoRA's ``triton`` backend as ``variant``, bf16 meta tensors at the GPU shape."""
    gw = LinearWorkload(w.model, w.gpu_M, w.K, w.N, w.R, w.gpu_M)
    with triton_gemm(variant):
        fn, args = _fn_for("pyfastpeft", _meta_inputs(gw, torch.bfloat16), backend="triton")
        return perf.count(fn, *args, mode="fwd+bwd")


def _efficiency_columns(perf: Any, w: LinearWorkload, notes: list) -> dict:
    """The ``fused`` Triton GEMM variant of LoRA's triton backend modeled with our GEMMs at 0.65 and 1.0 of
    cuBLAS's rate, the cuBLAS path's (torch backend) modeled time, and the break-even efficiency between the
    two (below it the cuBLAS path is faster). ``benchmarks/model_sensitivity.py`` also sets the fused variant
    against the default ``vendor`` one."""
    try:
        counts = triton_counts(perf, w, "fused")
        lo, hi = perf.EFFICIENCY_RANGE
        cublas_s = perf.roofline(_cublas_path_counts(perf, w)).time()
        return {"modeled_h100_ms_e065": perf.roofline(counts, triton_efficiency=lo).time() * 1e3,
                "modeled_h100_ms_e100": perf.roofline(counts, triton_efficiency=hi).time() * 1e3,
                "modeled_cublas_path_ms": cublas_s * 1e3,
                "break_even_efficiency": perf.break_even(counts, cublas_s)}
    except Exception as e:  # noqa: BLE001
        notes.append(f"efficiency range: {type(e).__name__}: {_line(e)}")
        return {}


def model_columns(provider: str, model: dict) -> dict:
    """The modeled values a row of ``provider`` carries: saved bytes for every provider of a counted code
    path (all ``pyfastpeft-*`` share one contract), modeled time only where the model describes that
    provider (for pyfastpeft: the Triton path, whose launches the library declares)."""
    m = model.get(_kind_label(provider), {})
    t = m.get("modeled_h100_ms")
    extra = {k: m.get(k) for k in ("modeled_h100_ms_e065", "modeled_h100_ms_e100", "break_even_efficiency")}
    if provider.startswith("pyfastpeft-") and provider != "pyfastpeft-triton":
        t = None
        extra = {k: None for k in extra}
        if provider == "pyfastpeft-torch":  # on a GPU: cuBLAS with the rank-r term as its C operand
            t = m.get("modeled_cublas_path_ms")
    return {"saved_bytes_per_token": m.get("saved_bytes_per_token"), "modeled_h100_ms": t, **extra}


def _fn_for(kind: str, inp: dict, *, backend: Optional[str] = None) -> tuple[Callable, tuple]:
    """(fn, args) computing one layer for ``perf``: W and bias are frozen ``nn.Parameter``s (so they
    are not counted as saved activations), A and B trainable parameters, x an activation."""
    P = torch.nn.Parameter
    x = inp["x"].detach().requires_grad_(True)
    A, B = P(inp["lora_a"].detach()), P(inp["lora_b"].detach())
    W = P(inp["weight"].detach(), requires_grad=False)
    b = None if inp["bias"] is None else P(inp["bias"].detach(), requires_grad=False)
    s = inp["scale"]
    if kind == "frozen":
        return (lambda x: F.linear(x, W, b)), (x,)
    if kind == "ref":
        return (lambda x, A, B: _ref(x, W, b, A, B, s)), (x, A, B)
    if kind == "pyfastpeft":
        import pyfastpeft
        return (lambda x, A, B: pyfastpeft.lora_linear(x, W, b, A, B, s, backend=backend)), (x, A, B)
    if kind == "peft":
        layer = peft_lora_layer(W.detach(), None if b is None else b.detach(), A.detach(), B.detach(), s)
        return layer, (x,)  # the module itself: perf swaps its parameters and excludes them
    raise ValueError(kind)


def _saved_per_token(perf: Any, kind: str, w: LinearWorkload, M: int, notes: list) -> Optional[float]:
    """Saved bytes / token: on meta tensors at the GPU shape (no compute); if the path cannot run on
    meta, on small real CPU tensors (``M`` tokens; the count is linear in tokens)."""
    errors = []
    for dev, m in (("meta", w.gpu_M), ("cpu", M)):
        try:
            sw = LinearWorkload(w.model, m, w.K, w.N, w.R, w.gpu_M)
            inp = _meta_inputs(sw, torch.bfloat16) if dev == "meta" else make_inputs(sw, torch.bfloat16,
                                                                                      torch.device("cpu"))
            fn, args = _fn_for(kind, inp, backend="torch" if kind == "pyfastpeft" and dev == "cpu" else None)
            return perf.saved_bytes(fn, *args).total_bytes / m
        except Exception as e:  # noqa: BLE001
            errors.append(f"{dev}: {type(e).__name__}: {_line(e)}")
    notes.append(f"saved bytes ({kind}): " + " | ".join(errors))
    return None


def _modeled_ms(perf: Any, kind: str, w: LinearWorkload, notes: list) -> Optional[float]:
    try:
        gw = LinearWorkload(w.model, w.gpu_M, w.K, w.N, w.R, w.gpu_M)
        inp = _meta_inputs(gw, torch.bfloat16)
        fn, args = _fn_for(kind, inp, backend="triton" if kind == "pyfastpeft" else None)
        counts = perf.count(fn, *args, mode="fwd+bwd")
        return perf.roofline(counts, device="h100").time() * 1e3
    except Exception as e:  # noqa: BLE001
        notes.append(f"modeled time ({kind}): {type(e).__name__}: {_line(e)}")
        return None


def _meta_inputs(w: LinearWorkload, dtype: torch.dtype) -> dict:
    m = torch.device("meta")
    return dict(x=torch.empty(w.M, w.K, device=m, dtype=dtype), weight=torch.empty(w.N, w.K, device=m, dtype=dtype),
                bias=torch.empty(w.N, device=m, dtype=dtype), lora_a=torch.empty(w.R, w.K, device=m, dtype=dtype),
                lora_b=torch.empty(w.N, w.R, device=m, dtype=dtype), scale=2.0)


def _line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else "")[:120]


# ----------------------------------------------------------------------------------------------------
# metadata, device names
# ----------------------------------------------------------------------------------------------------
def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def sanitize(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def device_name(device: torch.device) -> str:
    """``cpu-<model>`` or the GPU's name, as a file-name-safe slug."""
    if device.type == "cuda":
        return sanitize(torch.cuda.get_device_name(device))
    return "cpu-" + sanitize(cpu_name())


def git_revision() -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def pyfastpeft_version() -> Optional[str]:
    try:
        import pyfastpeft
        return getattr(pyfastpeft, "__version__", None)
    except Exception:  # noqa: BLE001
        return None


def metadata(device: torch.device, argv: Sequence[str]) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_v = None
    return {
        "device": str(device),
        "device_name": device_name(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_name": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda": torch.version.cuda,
        "peft": _version("peft"),
        "pyfastpeft": pyfastpeft_version(),
        "git_sha": git_revision(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "pyfastpeft " + " ".join(argv),
        "timer": "triton.testing.do_bench (quantiles 0.5/0.2/0.8, L2 flushed)" if device.type == "cuda"
        else "interleaved perf_counter rounds (median/p20/p80 of per-call times)",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }


# ----------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------
COLUMNS = ["op", "provider", "mode", "dtype", "M", "K", "N", "R", "extra_json", "ms_p50", "ms_p20", "ms_p80",
           "peak_mb", "tflops", "gbps", "gpu_name", "torch", "triton", "cuda", "pyfastpeft", "git_sha",
           "timestamp",
           # beyond STYLE's schema: which workload, the verdict, ratios, and the modeled columns
           "workload", "device_name", "status", "ratio_to_frozen", "ratio_to_peft", "saved_bytes_per_token",
           "modeled_h100_ms",
           # the honest model: the Triton path at both ends of the efficiency range, and where it breaks even
           "modeled_h100_ms_e065", "modeled_h100_ms_e100", "break_even_efficiency",
           # the spread rule (pyfastpeft.tools.timing): (p80 - p20) / median, and the flags it sets
           "spread", "noisy", "ratio_to_frozen_noisy", "ratio_to_peft_noisy",
           # CPU: interleaved rounds behind the timing, and the spread of the per-round (paired) ratios
           "rounds", "ratio_to_frozen_spread", "ratio_to_peft_spread"]


@dataclass
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    workloads: list[LinearWorkload]
    providers: list[str]
    modes: list[str]
    progress: bool = True
    budget_s: float = 1.0
    seed: int = 0
    argv: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _strict():
    old = os.environ.get("PYFASTPEFT_STRICT")
    os.environ["PYFASTPEFT_STRICT"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYFASTPEFT_STRICT", None)
        else:
            os.environ["PYFASTPEFT_STRICT"] = old


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except Exception:  # noqa: BLE001
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True, mininterval=0.2)


def run(cfg: BenchConfig) -> dict:
    """Run the benchmark; returns ``{"metadata", "rows", "models", "notes"}`` (not yet written)."""
    meta = metadata(cfg.device, cfg.argv)
    meta["dtype"] = DTYPE_NAMES.get(cfg.dtype, str(cfg.dtype))
    providers = provider_table(cfg.device)
    rows: list[dict] = []
    notes: list[str] = []
    dname = DTYPE_NAMES.get(cfg.dtype, str(cfg.dtype))
    base = {k: meta[k] for k in ("torch", "triton", "cuda", "pyfastpeft", "git_sha", "timestamp")}
    base["gpu_name"] = meta["gpu_name"] or meta["cpu_name"]
    base["device_name"] = meta["device_name"]
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    total = len(cfg.workloads) * len(cfg.providers) * len(cfg.modes)

    def row(w: LinearWorkload, prov: str, mode: str, status: str, extra: dict, q=None, peak=None) -> dict:
        r = dict(base, op=OP, provider=prov, mode=mode, dtype=dname, M=w.M, K=w.K, N=w.N, R=w.R,
                 workload=w.name, status=status, extra_json=json.dumps(extra, sort_keys=True),
                 ms_p50=None, ms_p20=None, ms_p80=None, peak_mb=peak, tflops=None, gbps=None,
                 ratio_to_frozen=None, ratio_to_peft=None, saved_bytes_per_token=None, modeled_h100_ms=None,
                 modeled_h100_ms_e065=None, modeled_h100_ms_e100=None, break_even_efficiency=None,
                 spread=None, noisy=None, ratio_to_frozen_noisy=None, ratio_to_peft_noisy=None,
                 rounds=None, ratio_to_frozen_spread=None, ratio_to_peft_spread=None)
        if q is not None:
            r["ms_p50"], r["ms_p20"], r["ms_p80"] = q[:3]
            if len(q) > 3:  # CPU: the per-round samples, for paired ratios (not written to the files)
                r["rounds"], r["_samples"] = len(q[3]), q[3]
            kind = "frozen" if prov == "frozen" else "lora"
            r["tflops"] = flops(w, kind, mode) / (q[0] * 1e-3) / 1e12
            r["gbps"] = min_bytes(w, kind, mode, elem) / (q[0] * 1e-3) / 1e9
        return r

    nodonate = _no_donated_buffers() if "ref-compile" in cfg.providers else contextlib.nullcontext()
    with _strict(), nodonate, _progress_bar(total, cfg.progress) as bar:
        for w in cfg.workloads:
            if bar is not None:
                bar.set_postfix_str(w.label, refresh=False)
            inp = make_inputs(w, cfg.dtype, cfg.device, cfg.seed)
            ref = reference(inp, w, cfg.dtype, cfg.seed + 1)
            model, note = perf_model(w, cfg.providers)
            for n in note.split("; ") if note else []:
                if n not in notes:
                    notes.append(n)
            ready: dict[str, Prepared] = {}
            extras: dict[str, dict] = {}
            wrows: list[dict] = []
            for prov in cfg.providers:
                why = _unavailable_reason(prov, cfg.device)
                extra: dict = {"workload": w.name, "gpu_M": w.gpu_M}
                try:
                    if why is not None:
                        raise Skip(why)
                    p = providers[prov](inp, device=cfg.device)
                    if p.note:
                        extra["note"] = p.note
                    if prov == "pyfastpeft-triton" and cfg.device.type == "cpu":
                        extra["note"] = "TRITON_INTERPRET=1: the interpreter's speed, not a kernel timing"
                    bad = None if prov == "frozen" else gate(p, ref, w)
                    status = f"FAILED correctness: {bad}"
                except Skip as e:
                    bad, status = str(e), f"skip: {e}"
                except Exception as e:  # noqa: BLE001 - a crashing provider is a failure row, not a crash
                    bad = f"{type(e).__name__}: {_line(e)}"
                    status = f"FAILED: {bad}"
                if bad is not None:
                    for mode in cfg.modes:
                        wrows.append(row(w, prov, mode, status, extra))
                    continue
                ready[prov], extras[prov] = p, extra
            for mode in cfg.modes:
                timed, res = {}, {}
                for n, p in ready.items():
                    try:
                        timed[n] = mode_callable(p, mode, ref.gy)  # bwd: runs the forward once
                    except Exception as e:  # noqa: BLE001
                        res[n] = (e, None)
                if cfg.device.type == "cuda":
                    for n, t in timed.items():
                        try:
                            res[n] = (time_cuda(t), cuda_peak_mb(t))
                        except Exception as e:  # noqa: BLE001
                            res[n] = (e, None)
                        if bar is not None:
                            bar.update(1)
                else:
                    qs = time_cpu_interleaved(timed, budget_s=cfg.budget_s)
                    res.update({n: (q, None) for n, q in qs.items()})
                    if bar is not None:
                        bar.update(len(timed))
                for n, (q, peak) in res.items():
                    if isinstance(q, BaseException):
                        wrows.append(row(w, n, mode, f"FAILED while timing: {type(q).__name__}: {_line(q)}",
                                         extras[n]))
                    else:
                        wrows.append(row(w, n, mode, "ok", extras[n], q, peak))
                if bar is not None:
                    bar.update(len(cfg.providers) - len(timed))
                del timed, res
            for r in wrows:
                r.update(model_columns(r["provider"], model))
            _ratios(wrows)
            rows.extend(wrows)
            del inp, ref, ready
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"metadata": meta, "rows": rows, "models": model_table(rows), "notes": notes}


def _ratios(rows: list[dict]) -> None:
    """Ratios to frozen and to peft of the same mode: on a CPU the median of the per-round ratios (both timed
    in the same interleaved rounds, so machine drift cancels) with its spread; else the ratio of medians."""
    by = {(r["provider"], r["mode"]): r for r in rows if r["ms_p50"] is not None}
    for r in rows:
        if r["ms_p50"] is None:
            continue
        for b in ("frozen", "peft"):
            other = by.get((b, r["mode"]))
            if other is None or not other["ms_p50"]:
                r[f"ratio_to_{b}"] = None
                continue
            paired = _timing.paired_ratio(r.get("_samples") or (), other.get("_samples") or ())
            if paired is not None:
                r[f"ratio_to_{b}"] = paired[0]
                r[f"ratio_to_{b}_spread"] = (paired[2] - paired[1]) / paired[0] if paired[0] > 0 else None
            else:
                r[f"ratio_to_{b}"] = r["ms_p50"] / other["ms_p50"]
    for r in rows:
        r.pop("_samples", None)
    annotate(rows)


# ----------------------------------------------------------------------------------------------------
# the spread rule (pyfastpeft.tools.timing): a row over 20 % is not a result, nor is a ratio that uses it
# ----------------------------------------------------------------------------------------------------
def _num(v: Any) -> Optional[float]:
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def row_spread(r: dict) -> Optional[float]:
    """``(ms_p80 - ms_p20) / ms_p50`` of a result row (None without a timing)."""
    return _timing.spread(_num(r.get("ms_p50")), _num(r.get("ms_p20")), _num(r.get("ms_p80")))


def row_noisy(r: dict) -> bool:
    """The row's spread exceeds :data:`pyfastpeft.tools.timing.SPREAD_LIMIT`, or it rests on fewer than
    :data:`pyfastpeft.tools.timing.MIN_ROUNDS` interleaved rounds (when the row says how many)."""
    s = row_spread(r)
    rounds = _num(r.get("rounds"))
    return (s is not None and s > _timing.SPREAD_LIMIT) or (rounds is not None and rounds < _timing.MIN_ROUNDS)


def annotate(rows: Sequence[dict]) -> Sequence[dict]:
    """Set ``spread``, ``noisy``, ``ratio_to_frozen_noisy`` and ``ratio_to_peft_noisy`` on every timed row, from
    its own timings and those of the frozen / peft row of the same workload and mode (recomputed, so rows
    read back from any results file get the same flags). Returns ``rows``."""
    base: dict[tuple, dict] = {}
    key = lambda r: (r.get("op"), r.get("workload"), r.get("M"), r.get("dtype"), r.get("mode"))  # noqa: E731
    for r in rows:
        if r.get("provider") in ("frozen", "peft") and _num(r.get("ms_p50")) is not None:
            base[(*key(r), r["provider"])] = r
    for r in rows:
        if _num(r.get("ms_p50")) is None:
            continue
        r["spread"] = row_spread(r)
        r["noisy"] = row_noisy(r)
        for b in ("frozen", "peft"):
            if _num(r.get(f"ratio_to_{b}")) is None:
                r[f"ratio_to_{b}_noisy"] = None
                continue
            other = base.get((*key(r), b))
            rs = _num(r.get(f"ratio_to_{b}_spread"))  # the paired ratio's own spread, where the row has one
            r[f"ratio_to_{b}_noisy"] = (r["noisy"] or (other is not None and row_noisy(other))
                                        or (rs is not None and rs > _timing.SPREAD_LIMIT))
    return rows


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------
#: Where ``pyfastpeft bench`` / ``demo`` / ``bench --report`` write unless ``--out`` names a folder: relative to the
#: working directory and git-ignored, so running the README's commands never rewrites the committed
#: ``benchmarks/results/`` files (pass ``--out benchmarks/results`` to update those on purpose).
DEFAULT_OUT_DIR = Path("pyfastpeft-results")
#: The committed results folder (read by ``bench --report`` by default; written only when ``--out`` names it).
COMMITTED_RESULTS_DIR = Path("benchmarks") / "results"


def results_dir(out: Optional[str | Path] = None) -> Path:
    """The folder results go to: ``out`` when given, else :data:`DEFAULT_OUT_DIR`."""
    return Path(out) if out else DEFAULT_OUT_DIR


def result_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """``{"json", "csv", "png"}`` paths :func:`write_results` writes for ``stem`` in ``out_dir``."""
    return {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "png")}


def write_results(result: dict, out_dir: Path, stem: str) -> dict[str, Optional[Path]]:
    """``<stem>.json`` (rows + metadata), ``<stem>.csv`` (COLUMNS) and ``<stem>.png`` (when matplotlib is
    installed). Returns the paths (PNG: None when not written; ``result["notes"]`` says why)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath, ppath = result_paths(out_dir, stem).values()
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1, default=str)
    write_csv(result["rows"], cpath)
    why = plot(result["rows"], ppath, title=f"{OP} on {result['metadata'].get('device_name')} "
                                           f"({result['metadata'].get('dtype')})")
    if why is not None:
        result.setdefault("notes", []).append(why)
        return {"json": jpath, "csv": cpath, "png": None}
    return {"json": jpath, "csv": cpath, "png": ppath}


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def load_rows(path: str | Path) -> tuple[list[dict], dict]:
    """Rows (numbers parsed) and metadata from a results JSON or CSV."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data["rows"], data.get("metadata", {})
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: _parse(v) for k, v in r.items()})
    meta = {"device_name": rows[0].get("device_name")} if rows else {}
    return rows, meta


def _parse(v: str) -> Any:
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


NOISY_HATCH = "///"  # a bar whose timing (or the frozen timing it is divided by) has spread > 20 %


def plot(rows: Sequence[dict], path: Path, title: str = "", mode: str = "fwd+bwd") -> Optional[str]:
    """Write :func:`figure` to ``path``. Returns None, or why no PNG was written."""
    from pyfastpeft.tools import figures

    return figures.save(figure(rows, title=title, mode=mode), path, dpi=110)


def figure(rows: Sequence[dict], title: str = "", mode: str = "fwd+bwd") -> Any:
    """The bench figure (headless, Agg), or a string saying why there is none. Panels, each with its own
    axis and a title saying which way is better (all lower-is-better):

    1. per workload, grouped bars of the measured ``mode`` median time / frozen per provider, whiskers from
       p20 to p80 (over the frozen median); a bar whose ratio uses a timing with spread > 20 % is hatched and
       faded, labelled ``(x)!``, and the legend says it is not a result;
    2. bytes saved for backward per token per code path (counted);
    3. the modeled H100 fwd+bwd time / frozen (when the rows carry it).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except Exception as e:  # noqa: BLE001
        return f"no PNG: matplotlib not importable ({type(e).__name__}: {e})"
    rows = annotate([dict(r) for r in rows])
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    timed = [r for r in rows if r.get("mode") == mode and r.get("ratio_to_frozen") is not None]
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    # saved bytes depend on the code path, not the backend: one bar for all pyfastpeft-* providers
    sb = [dict(r, provider=_kind_label(r["provider"])) for r in rows if r.get("saved_bytes_per_token") is not None]
    canon = ["frozen", "pyfastpeft", "peft", "ref-eager", "ref-compile"]
    sb_prov = sorted(dict.fromkeys(r["provider"] for r in sb), key=lambda p: canon.index(p) if p in canon else 99)
    width_in = max(7.0, 0.35 * len(workloads) * max(1, len(providers)) + 3)
    mt = [e for e in model_table(rows) if e.get("modeled_x_frozen") is not None]
    mt_prov = [p for p in PATHS if any(e["path"] == p for e in mt)]
    fig, axes = plt.subplots(3 if mt else 2, 1, figsize=(width_in, 14.0 if mt else 9.5))
    cmap = plt.get_cmap("tab10")
    colors = {p: cmap(i % 10) for i, p in enumerate(dict.fromkeys(providers + sb_prov + mt_prov))}
    ours = [p for p in providers if p.startswith("pyfastpeft-")]
    if ours and "pyfastpeft" in colors:
        colors["pyfastpeft"] = colors[ours[0]]  # the saved-bytes bar shares the first backend's colour

    def bars(ax, provs, value, ylabel, titletext, empty_msg, fmt, labels=None, flag=None, err=None):
        if not provs:
            ax.text(0.5, 0.5, empty_msg, ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return
        width = 0.8 / len(provs)
        top = 0.0
        any_flag = False
        for i, p in enumerate(provs):
            ys = [value(wl, p) for wl in workloads]
            xs = [j + (i - (len(provs) - 1) / 2) * width for j in range(len(workloads))]
            keep = [(x, y, wl) for x, y, wl in zip(xs, ys, workloads) if y is not None]
            if not keep:
                continue
            bad = [bool(flag(wl, p)) if flag else False for _, _, wl in keep]
            cont = ax.bar([x for x, _, _ in keep], [y for _, y, _ in keep], width, label=(labels or {}).get(p, p),
                          color=colors[p])
            for patch, b in zip(cont.patches, bad):
                if b:  # spread > 20 %: faded and hatched, never a plain bar
                    patch.set_hatch(NOISY_HATCH)
                    patch.set_alpha(0.35)
                    patch.set_edgecolor("dimgray")
            any_flag = any_flag or any(bad)
            lohi = [err(wl, p) for _, _, wl in keep] if err is not None else [None] * len(keep)
            if any(e is not None for e in lohi):
                yl = [max(y - (e[0] if e else y), 0.0) for (_, y, _), e in zip(keep, lohi)]
                yh = [max((e[1] if e else y) - y, 0.0) for (_, y, _), e in zip(keep, lohi)]
                ax.errorbar([x for x, _, _ in keep], [y for _, y, _ in keep], yerr=[yl, yh], fmt="none",
                            ecolor="black", elinewidth=0.8, capsize=2)
                top = max(top, max((e[1] for e in lohi if e), default=0.0))
            if len(workloads) * len(provs) <= 40:  # value labels above the bar, or above its whisker
                for (x, y, _), b, e in zip(keep, bad, lohi):
                    text = f"({format(y, fmt[1:])}){_timing.FLAG}" if b else format(y, fmt[1:])
                    ax.annotate(text, (x, max(y, e[1]) if e else y), xytext=(0, 2), textcoords="offset points",
                                ha="center", va="bottom", fontsize=7)
            top = max(top, max(y for _, y, _ in keep))
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, rotation=30 if len(workloads) > 1 else 0, ha="right" if len(workloads) > 1
                           else "center", fontsize=8)
        ax.set_xlabel("workload")
        ax.set_ylabel(ylabel)
        ax.set_title(titletext, fontsize=10)
        handles, names = ax.get_legend_handles_labels()
        if any_flag:
            handles.append(Patch(facecolor="lightgray", edgecolor="dimgray", hatch=NOISY_HATCH, label=_timing.LEGEND))
            names.append(_timing.LEGEND)
        ncol = min(4 if width_in < 9 else 6, len(handles))
        legend_rows = -(-len(handles) // max(1, ncol))
        ax.set_ylim(0, top * (1.2 + 0.12 * legend_rows) if top > 0 else 1.0)  # room for the legend
        ax.legend(handles, names, fontsize=8, ncol=ncol, loc="upper center")
        ax.grid(axis="y", alpha=0.3)

    tmap = {(r["workload"], r["provider"]): r for r in timed}
    fz = {r["workload"]: _num(r.get("ms_p50")) for r in timed if r["provider"] == "frozen"}

    def whisker(wl, p):
        r, base = tmap.get((wl, p)), fz.get(wl)
        lo, hi = (_num(r.get("ms_p20")), _num(r.get("ms_p80"))) if r else (None, None)
        return (lo / base, hi / base) if base and lo is not None and hi is not None else None

    bars(axes[0], providers, lambda wl, p: _num(tmap[(wl, p)]["ratio_to_frozen"]) if (wl, p) in tmap else None,
         f"{mode} time / frozen\n(measured median; whiskers p20-p80)",
         f"measured {mode} time / frozen layer: lower is better", f"no {mode} timings", "%.2f",
         flag=lambda wl, p: (tmap.get((wl, p)) or {}).get("ratio_to_frozen_noisy"), err=whisker)
    if providers:
        axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    smap = {(r["workload"], r["provider"]): r["saved_bytes_per_token"] for r in sb}
    bars(axes[1], sb_prov, lambda wl, p: smap.get((wl, p)), "bytes / token (counted, bf16)",
         "bytes saved for backward per token: lower is better",
         "no saved-bytes counts (pyfastpeft.tools.perf unavailable)", "%.0f")
    if mt:
        mmap = {(e["workload"], e["path"]): e["modeled_x_frozen"] for e in mt}
        bars(axes[2], mt_prov, lambda wl, p: mmap.get((wl, p)), "MODELED fwd+bwd / frozen\n(roofline, bf16, GPU shape)",
             "MODELED H100 fwd+bwd time / frozen layer (not a measurement): lower is better", "", "%.2f",
             labels={"pyfastpeft": "pyfastpeft (triton path)"})
        axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------
def _kind_label(provider: str) -> str:
    return "pyfastpeft" if provider.startswith("pyfastpeft-") else provider


PATHS = ("frozen", "pyfastpeft", "pyfastpeft-cublas", "peft", "ref-eager")
_MODEL_KEYS = ("saved_bytes_per_token", "modeled_h100_ms", "modeled_h100_ms_e065", "modeled_h100_ms_e100",
               "break_even_efficiency")


def _model_path(provider: str) -> str:
    """The modeled code path of a provider: the Triton path (``pyfastpeft``) or, for the torch backend, the
    cuBLAS path (``pyfastpeft-cublas``: what that backend runs on a GPU)."""
    return "pyfastpeft-cublas" if provider == "pyfastpeft-torch" else _kind_label(provider)


def model_table(rows: Sequence[dict]) -> list[dict]:
    """Per (workload, code path): counted saved bytes / token and modeled H100 fwd+bwd ms (pyfastpeft: the
    Triton path with our GEMMs at 0.75 of cuBLAS, also at 0.65 and 1.0, and its break-even efficiency
    against the cuBLAS path; pyfastpeft-cublas: the torch backend's path on a GPU), with the modeled ratios
    to frozen and to peft. Built from result rows (JSON or CSV)."""
    acc: dict[tuple[str, str], dict] = {}
    for r in rows:
        path = _model_path(r["provider"])
        if path not in PATHS:
            continue
        e = acc.setdefault((r["workload"], path), {"workload": r["workload"], "path": path,
                                                   **{k: None for k in _MODEL_KEYS}})
        for k in _MODEL_KEYS:
            if e[k] is None and r.get(k) not in (None, ""):
                e[k] = float(r[k])
    out = [e for e in acc.values() if e["saved_bytes_per_token"] is not None or e["modeled_h100_ms"] is not None]
    for e in out:
        for base in ("frozen", "peft"):
            b = acc.get((e["workload"], base), {}).get("modeled_h100_ms")
            for k, col in (("modeled_h100_ms", f"modeled_x_{base}"), ("modeled_h100_ms_e065", f"modeled_x_{base}_e065"),
                           ("modeled_h100_ms_e100", f"modeled_x_{base}_e100")):
                e[col] = e[k] / b if b and e[k] is not None else None
    order = {p: i for i, p in enumerate(PATHS)}
    wl_order = {w: i for i, w in enumerate(dict.fromkeys(r["workload"] for r in rows))}
    return sorted(out, key=lambda e: (wl_order[e["workload"]], order[e["path"]]))


def path_label(path: str) -> str:
    return {"pyfastpeft": "pyfastpeft (triton path)", "pyfastpeft-cublas": "pyfastpeft (cuBLAS path)"}.get(path, path)


def efficiency_range(e: dict, base: str = "frozen") -> str:
    """``"1.05–1.19"``: the modeled ratio with our Triton GEMMs at 1.0 and at 0.65 of cuBLAS ("" if none)."""
    lo, hi = e.get(f"modeled_x_{base}_e100"), e.get(f"modeled_x_{base}_e065")
    return "" if lo is None or hi is None else f"{lo:.2f}–{hi:.2f}"


def break_even_text(e: dict) -> str:
    be = e.get("break_even_efficiency")
    if e.get("modeled_h100_ms_e065") is None:
        return ""
    return "never" if be is None else f"{be:.2f}"


def model_summary(rows: Sequence[dict]) -> str:
    body = [[e["workload"], path_label(e["path"]), _f(e["saved_bytes_per_token"], ".0f"), _f(e["modeled_h100_ms"], ".4f"),
             _f(e["modeled_x_frozen"], ".2f"), efficiency_range(e), break_even_text(e), _f(e["modeled_x_peft"], ".2f")]
            for e in model_table(rows)]
    if not body:
        return ""
    return table(["workload", "code path", "saved B/token (counted)", "H100 fwd+bwd ms (MODEL)",
                  "model x frozen", "x frozen, Triton eff 1.0–0.65", "break-even eff vs cuBLAS path",
                  "model x peft"], body)


def _f(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def summary_table(rows: Sequence[dict]) -> str:
    """Timed rows per workload and mode (providers in run order): median ms with p20-p80 and the spread, a
    ``!`` on a row whose spread exceeds 20 % and ``(x)!`` on a ratio that uses such a row (footnote under
    the table); then one line per provider that has no timing (skipped or failed), whatever the number of
    modes."""
    rows = annotate([dict(r) for r in rows])
    body = []
    flagged = False
    for wl in dict.fromkeys(r["workload"] for r in rows):
        wr = [r for r in rows if r["workload"] == wl]
        for mode in dict.fromkeys(r["mode"] for r in wr):
            for r in wr:
                if r["mode"] != mode or r["ms_p50"] is None:
                    continue
                bad = bool(r.get("noisy"))
                flagged = flagged or bad or bool(r.get("ratio_to_frozen_noisy")) or bool(r.get("ratio_to_peft_noisy"))
                pad = "  "  # plain cells padded as wide as " !" / ")!", so the numbers stay aligned
                rf, rp = bool(r.get("ratio_to_frozen_noisy")), bool(r.get("ratio_to_peft_noisy"))
                body.append([wl, f"M{r['M']}", mode, r["provider"],
                             _f(r["ms_p50"], ".3f") + (f" {_timing.FLAG}" if bad else pad),
                             f"{_f(r['ms_p20'], '.3f')}-{_f(r['ms_p80'], '.3f')}",
                             _timing.spread_text(r.get("spread")) + ("" if bad else pad),
                             _timing.ratio_text(_num(r["ratio_to_frozen"]), rf) + ("" if rf else pad),
                             _timing.ratio_text(_num(r["ratio_to_peft"]), rp) + ("" if rp else pad), ""])
        seen = set()
        for r in wr:
            if r["ms_p50"] is None and r["provider"] not in seen:
                seen.add(r["provider"])
                body.append([wl, f"M{r['M']}", "-", r["provider"], "", "", "", "", "", r["status"][:110]])
    out = table(["workload", "M", "mode", "provider", "ms p50", "p20-p80", "spread", "x frozen", "x peft", "note"],
                body, align="<<<<>>>>><")
    return out + ("\n" + _timing.FOOTNOTE if flagged else "")
