"""Test helpers shared by the test suite and ``pyfastpeft check``: inputs, the tolerance table, checks.

The tolerance policy, written down once (every number carries its reason):

* fp64 (fallback vs reference): ``rtol=1e-10, atol=1e-12`` -- same maths in another order; only rounding
  at 1e-16 per op, amplified by short reductions.
* fp32 (fallback and Triton under the interpreter vs fp64 reference): ``rtol=1e-5`` and
  ``atol = 1e-5 * sqrt(L) / 8 * rms(ref)``, L the reduction length (chained GEMMs add their lengths) --
  the round-off of a length-L dot product is about ``u * sqrt(L) * rms(result)`` (u = 6e-8 for fp32),
  so this allows ~20x that; rms(ref) makes it independent of the values' scale.
* fp16 / bf16, any backend: flash-attention's rule. Run the reference in the same low dtype; a backend
  may be at most ``2x`` (forward) or ``3x`` (gradients) as far from the fp64 reference as plain PyTorch
  at that precision is, plus a floor (fp16 ``1e-3``, bf16 ``1e-2``) for outputs where PyTorch happens to
  be nearly exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

FWD_FACTOR = 2.0  # flash-attention: a kernel may be 2x as wrong as PyTorch at the same precision (forward)
GRAD_FACTOR = 3.0  # ... and 3x for gradients (two more rounded GEMMs on the way)
LOWP_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2}  # absolute floor per dtype (flash-attention's)
FP64_TOL = dict(rtol=1e-10, atol=1e-12)  # fp64 vs fp64: reordering only


def fp32_tol(reduction: int, rms: float = 1.0) -> dict:
    """fp32 tolerance for a result of RMS ``rms`` whose reductions add up to ``reduction`` terms."""
    return dict(rtol=1e-5, atol=1e-5 * math.sqrt(max(reduction, 1)) / 8 * (rms if rms > 0 else 1.0))


@dataclass
class Verdict:
    ok: bool
    err: float  # max |out - ref64|
    budget: float  # what was allowed
    rule: str

    def __str__(self) -> str:
        return f"max err {self.err:.3e} {'<=' if self.ok else '>'} {self.budget:.3e} ({self.rule})"


def compare(out: torch.Tensor, ref64: torch.Tensor, ref_lo: Optional[torch.Tensor] = None, *,
            factor: float = FWD_FACTOR, reduction: int = 1, as_dtype: Optional[torch.dtype] = None) -> Verdict:
    """Judge ``out`` against the fp64 reference with the table above (``ref_lo``: the reference run in the
    inputs' dtype). ``as_dtype`` applies another dtype's rule: an fp32 result computed from fp16/bf16
    inputs (a threshold's gradient, a norm) is as accurate as those inputs, not as fp32."""
    if out.shape != ref64.shape:
        return Verdict(False, math.inf, 0.0, f"shape {tuple(out.shape)} != {tuple(ref64.shape)}")
    if out.numel() == 0:
        return Verdict(True, 0.0, 0.0, "empty")
    o, r = out.detach().double().cpu(), ref64.detach().double().cpu()
    if not torch.isfinite(o).all():
        return Verdict(False, math.inf, 0.0, "non-finite values in output")
    err = (o - r).abs().max().item()
    dtype = as_dtype or out.dtype
    if dtype in (torch.float64, torch.float32):
        tol = FP64_TOL if dtype == torch.float64 else fp32_tol(reduction, r.pow(2).mean().sqrt().item())
        allowed = tol["atol"] + tol["rtol"] * r.abs()
        worst = ((o - r).abs() / allowed).argmax()  # the element closest to (or past) its bound
        e, b = (o - r).abs().flatten()[worst].item(), allowed.flatten()[worst].item()
        rule = f"{str(dtype)[6:]} rtol {tol['rtol']:.0e} atol {tol['atol']:.1e}, at the worst element"
        return Verdict(e <= b, e, b, rule)
    if ref_lo is None:
        raise ValueError(f"compare: a {dtype} result needs ref_lo, the reference run in {dtype}")
    lo_err = (ref_lo.detach().double().cpu() - r).abs().max().item()
    floor = LOWP_FLOOR.get(dtype, 1e-3)
    budget = factor * lo_err + floor
    return Verdict(err <= budget, err, budget, f"{factor:g}x torch-{str(dtype)[6:]} error {lo_err:.2e} + {floor:g}")


def assert_close_to_ref(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lo: Optional[torch.Tensor] = None,
                        *, factor: float = FWD_FACTOR, reduction: int = 1) -> None:
    v = compare(out, ref64, ref_lo, factor=factor, reduction=reduction)
    assert v.ok, f"{name}: {v}"


def randn(*shape: int, dtype=torch.float32, device="cpu", scale: float = 1.0, generator=None) -> torch.Tensor:
    """Fresh random values, never zeros (a zero tensor hides transposition and masking bugs)."""
    return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(device=device, dtype=dtype)


def lora_inputs(M: int, K: int, N: int, R: int, *, dtype=torch.float32, device="cpu", bias: bool = True,
                lead: tuple[int, ...] = (), seed: int = 0) -> dict:
    """Random LoRA inputs (B is *not* zero, unlike PEFT's init, so the update is visible)."""
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, M, K) if lead else (M, K)
    return dict(
        x=randn(*shape, dtype=dtype, device=device, generator=g),
        weight=randn(N, K, dtype=dtype, device=device, scale=K ** -0.5, generator=g),
        bias=randn(N, dtype=dtype, device=device, generator=g) if bias else None,
        lora_a=randn(R, K, dtype=dtype, device=device, scale=K ** -0.5, generator=g),
        lora_b=randn(N, R, dtype=dtype, device=device, scale=R ** -0.5, generator=g),
        scale=2.0,
    )


PEER_REL = 1e-5  # fp32 parity with a peer implementation (PEFT): same maths, other summation order


def assert_rel_close(name: str, got: torch.Tensor, want: torch.Tensor, rel: float = PEER_REL) -> None:
    """Norm-wise relative error ``‖got − want‖ / ‖want‖ <= rel`` (for parity with peers' implementations,
    whose summation order differs from ours: elementwise checks then fail on near-zero elements)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.detach().double(), want.detach().double()
    err = (g - w).norm().item() / max(w.norm().item(), 1e-30)
    assert err <= rel, f"{name}: relative error {err:.3e} > {rel:.1e}"


# ----------------------------------------------------------------------------------------------------
# rows of `pyfastpeft check` (each family declares its own in pyfastpeft/<family>/checks.py)
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


# ----------------------------------------------------------------------------------------------------
# autocast: an op under torch.autocast against the fp64 reference
# ----------------------------------------------------------------------------------------------------
def check_autocast(call, ref, leaves: dict, grads: tuple, dtype: torch.dtype, *, device: str = "cpu",
                   reduction: Optional[dict] = None, seed: int = 0) -> dict:
    """Run ``call(**inputs)`` inside ``torch.autocast(device, dtype)`` with fp32 leaves (a model's fp32
    parameters and activations) and judge its output and the gradients of ``grads`` against
    ``ref(**inputs)`` on fp64 leaves without autocast.

    The low-precision rule applies with the autocast ``dtype``: the baseline is the reference itself run
    under the same autocast (what plain PyTorch gets at that precision), so a backend may be
    ``FWD_FACTOR`` / ``GRAD_FACTOR`` times as far from fp64 as that, plus the dtype's floor.
    ``leaves``: fp64 CPU tensors (or other values, passed as they are); ``reduction`` (``{"out": n, name:
    n}``) is only used when ``dtype`` is fp32. Returns ``{"out": Verdict, <grad name>: Verdict, ...,
    "dtype": output dtype}``; the upstream gradient is random (seeded).
    """
    g = torch.Generator().manual_seed(seed)

    def leaves_as(dt, grad):
        out = {}
        for k, v in leaves.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v = v.detach().to(device=device, dtype=dt)
                v.requires_grad_(grad and k in grads)
            out[k] = v
        return out

    def run(fn, dt, autocast, out_dtype=None):
        inp = leaves_as(dt, True)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            y = fn(**inp)
        if out_dtype is not None:  # the baseline returns what the op returns (nn.Linear: the autocast dtype)
            y = y.to(out_dtype)
        gy = up.to(device=device, dtype=y.dtype)
        gs = torch.autograd.grad(y, [inp[k] for k in grads], gy, allow_unused=True) if grads else ()
        return y, dict(zip(grads, gs))

    with torch.no_grad():
        y64 = ref(**leaves_as(torch.float64, False))
    up = randn(*y64.shape, dtype=torch.float64, generator=g)
    y_ours, g_ours = run(call, torch.float32, True)
    y_lo, g_lo = run(ref, torch.float32, True, out_dtype=y_ours.dtype)
    y_ref, g_ref = run(ref, torch.float64, False)
    red = reduction or {}
    verdicts = {"dtype": y_ours.dtype,
                "out": compare(y_ours, y_ref, y_lo, factor=FWD_FACTOR, reduction=red.get("out", 1), as_dtype=dtype)}
    for k in grads:
        if g_ref[k] is None:
            verdicts[k] = Verdict(g_ours[k] is None, 0.0, 0.0, "no gradient in the reference")
            continue
        if g_ours[k] is None:
            verdicts[k] = Verdict(False, math.inf, 0.0, "no gradient")
            continue
        verdicts[k] = compare(g_ours[k], g_ref[k], g_lo[k], factor=GRAD_FACTOR, reduction=red.get(k, 1),
                              as_dtype=dtype)
    return verdicts
