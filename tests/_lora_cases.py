"""Shared LoRA cases and the run-and-compare helper for the op, CLI-free tests."""
from __future__ import annotations

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.reference import lora_linear_ref
from pyfastpeft.testing import GRAD_FACTOR, compare, lora_inputs


def case(M, K, N, R, dtype=torch.float32, *, lead=(), bias=True, noncontig=False, marks=()):
    name = f"M{M}-K{K}-N{N}-R{R}-{str(dtype)[6:]}" + (f"-lead{'x'.join(map(str, lead))}" if lead else "") + \
        ("-nobias" if not bias else "") + ("-noncontig" if noncontig else "")
    return pytest.param(dict(M=M, K=K, N=N, R=R, dtype=dtype, lead=lead, bias=bias, noncontig=noncontig),
                        id=name, marks=marks)


# Interpreter runs every program in numpy: shapes stay small (< 100 programs per launch).
CASES = [
    case(37, 120, 72, 3),
    case(37, 120, 72, 1),
    case(16, 64, 48, 8, bias=False),
    case(0, 64, 48, 8),
    case(5, 33, 17, 16, lead=(2, 3)),
    case(24, 40, 56, 4, noncontig=True),
    case(9, 64, 160, 128),
    case(37, 120, 72, 3, torch.float16),
    case(37, 120, 72, 3, torch.bfloat16),
    case(12, 48, 40, 8, torch.float16, lead=(3,), noncontig=True),
    case(37, 120, 72, 3, torch.float64),
]


def make(c, seed=0, device="cpu"):
    d = lora_inputs(c["M"], c["K"], c["N"], c["R"], dtype=c["dtype"], bias=c["bias"], lead=c["lead"], seed=seed,
                    device=device)
    if c["noncontig"]:  # same values, transposed storage: x.stride(-1) != 1
        d["x"] = d["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not d["x"].is_contiguous()
    return d


def run_and_compare(c, backend, *, dropout_p=0.0, seed=0, device="cpu"):
    """Forward + every gradient of ``pfp.lora_linear`` on ``backend`` vs the fp64 reference."""
    d = make(c, seed, device)
    x = d["x"].detach().requires_grad_()
    a = d["lora_a"].detach().requires_grad_()
    b = d["lora_b"].detach().requires_grad_()
    torch.manual_seed(seed + 1)
    y = pfp.lora_linear(x, d["weight"], d["bias"], a, b, d["scale"], dropout_p=dropout_p, backend=backend)
    mask = None
    if dropout_p > 0:  # replay the op's dropout mask: same seed, same shape, same RNG draw
        torch.manual_seed(seed + 1)
        mask = torch.nn.functional.dropout(torch.ones(x.reshape(-1, c["K"]).shape, dtype=x.dtype,
                                                      device=x.device), dropout_p).reshape(x.shape)
    assert torch.isfinite(y).all(), "non-finite output (NaN-poisoned element never written?)"
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b), gy, allow_unused=True)

    def ref(dt):
        t = {k: (v.detach().to(dt).requires_grad_(k in ("x", "lora_a", "lora_b")) if isinstance(v, torch.Tensor)
                 else v) for k, v in d.items()}
        out = lora_linear_ref(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"],
                              None if mask is None else mask.to(dt))
        return out, torch.autograd.grad(out, (t["x"], t["lora_a"], t["lora_b"]), gy.to(dt))

    y64, g64 = ref(torch.float64)
    lo = c["dtype"] in (torch.float16, torch.bfloat16)
    y_lo, g_lo = ref(c["dtype"]) if lo else (None, (None, None, None))
    M = max(y.numel() // c["N"], 1)
    red = {"y": c["K"] + c["R"], "dx": c["N"] + c["R"], "dA": M + c["N"], "dB": M + c["R"]}
    verdicts = {"y": compare(y, y64, y_lo, reduction=red["y"])}
    for name, got, want, want_lo in zip(("dx", "dA", "dB"), grads, g64, g_lo):
        assert got is not None, f"{name} is None"
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        verdicts[name] = compare(got, want, want_lo, factor=GRAD_FACTOR, reduction=red[name])
    return verdicts
