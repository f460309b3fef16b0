"""Every available backend of ``pfp.lora_linear`` vs the fp64 reference: forward and every gradient."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft import BackendUnavailable
from pyfastpeft.testing import lora_inputs
from tests._lora_cases import CASES, make, run_and_compare

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = pfp.available_backends("lora_linear", DEVICE)


@pytest.fixture(autouse=True)
def _fused_triton(monkeypatch):
    """This file tests the ``fused`` variant of the triton backend (its fused Triton GEMMs);
    tests/lora/test_lora_rank.py runs the same cases on the default ``vendor`` variant."""
    monkeypatch.setenv("PYFASTPEFT_TRITON_GEMM", "fused")


def test_backends_present_on_this_machine():
    # The torch backend always runs; Triton runs here under the interpreter (conftest sets TRITON_INTERPRET).
    assert "torch" in BACKENDS
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in BACKENDS, pfp.format_backend_info()


# fp64 is a torch-backend dtype: kernels take fp32/fp16/bf16 (test_kernels_reject_fp64 checks they say so)
PAIRS = [pytest.param(c.values[0], b, id=f"{c.id}-{b}") for c in CASES for b in BACKENDS
         if b == "torch" or c.values[0]["dtype"] != torch.float64]


@pytest.mark.parametrize("c, backend", PAIRS)
def test_lora_linear_matches_reference(c, backend):
    for name, v in run_and_compare(c, backend, device=DEVICE).items():
        assert v.ok, f"{backend} {name}: {v}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [CASES[0], CASES[4]], ids=lambda c: f"M{c['M']}-lead{c['lead']}")
def test_lora_linear_dropout_matches_reference(c, backend):
    for name, v in run_and_compare(c, backend, dropout_p=0.3, device=DEVICE).items():
        assert v.ok, f"{backend} dropout {name}: {v}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_triton_rejects_rank_above_limit_when_forced(backend):
    d = lora_inputs(8, 16, 300, 200)
    if backend == "triton":
        with pytest.raises(BackendUnavailable, match="rank 200 > 128"):
            pfp.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.0, backend="triton")
    else:
        y = pfp.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.0, backend=backend)
        assert y.shape == (8, 300)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_kernels_reject_fp64(backend):
    d = lora_inputs(8, 16, 8, 2, dtype=torch.float64)
    with pytest.raises(BackendUnavailable, match="float64"):
        pfp.lora_linear(d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_backward_twice_is_stable(backend):
    d = lora_inputs(20, 40, 24, 4)
    a = d["lora_a"].requires_grad_()
    x = d["x"].requires_grad_()
    y = pfp.lora_linear(x, d["weight"], d["bias"], a, d["lora_b"], 1.5, backend=backend)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, a), g, retain_graph=True)
    second = torch.autograd.grad(y, (x, a), g)
    for f, s in zip(first, second):
        torch.testing.assert_close(f, s, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_grad_flags(backend):
    """x without grad: no dx GEMM; bias with grad gets dy.sum(0); frozen lora_b gets no grad."""
    d = lora_inputs(10, 24, 16, 2)
    bias = d["bias"].requires_grad_()
    a = d["lora_a"].requires_grad_()
    y = pfp.lora_linear(d["x"], d["weight"], bias, a, d["lora_b"], 2.0, backend=backend)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(bias.grad, g.sum(0))
    assert a.grad is not None and d["lora_b"].grad is None and d["x"].grad is None
    ref = 2.0 * (g @ d["lora_b"]).T @ d["x"]
    torch.testing.assert_close(a.grad, ref, rtol=1e-5, atol=1e-5)


def test_forced_backend_that_cannot_run_raises():
    d = lora_inputs(4, 8, 8, 2)
    with pytest.raises(BackendUnavailable, match="cuda"):
        pfp.lora_linear(d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        pfp.lora_linear(d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0, backend="cudnn")


def test_env_and_context_choose_backend(monkeypatch):
    d = lora_inputs(4, 8, 8, 2)
    args = (d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0)
    monkeypatch.setenv("PYFASTPEFT_BACKEND", "lora_linear=torch")
    pfp.lora_linear(*args)
    assert pfp.last_backend("lora_linear_fwd") == "torch"
    monkeypatch.setenv("PYFASTPEFT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="forced backend 'cuda'"):
        pfp.lora_linear(*args)
    with pfp.use_backend("torch"):  # the context wins over the environment
        pfp.lora_linear(*args)
    monkeypatch.setenv("PYFASTPEFT_BACKEND", "lora_linear=bogus")
    with pytest.raises(ValueError, match="PYFASTPEFT_BACKEND"):
        pfp.lora_linear(*args)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="auto fallback case needs triton on CPU")
def test_strict_mode_turns_argument_fallback_into_error(monkeypatch):
    d = lora_inputs(8, 16, 300, 200)  # rank 200: triton rejects it, torch takes it
    args = (d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0)
    y = pfp.lora_linear(*args)  # auto: falls back to torch
    assert pfp.last_backend("lora_linear_fwd") == "torch"
    assert y.shape == (8, 300)
    monkeypatch.setenv("PYFASTPEFT_STRICT", "1")
    with pytest.raises(BackendUnavailable, match="PYFASTPEFT_STRICT"):
        pfp.lora_linear(*args)
    dec = pfp.explain("lora_linear", *args)
    assert dec.chosen == "torch" and "rank 200" in str(dec)


def test_explain_and_backend_info():
    d = lora_inputs(4, 8, 8, 2)
    dec = pfp.explain(pfp.lora_linear, d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0)
    assert dec.chosen in BACKENDS
    assert "pyfastpeft._C" in str(dec)  # says why cuda was not chosen
    info = pfp.backend_info()
    assert set(info["ops"]["lora_linear_fwd"]) == {"cuda", "triton", "torch"}
    assert "torch" in pfp.format_backend_info()


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(4, 9)), r"x.shape\[-1\] must equal weight.shape\[1\]"),
    (dict(lora_a=torch.randn(2, 9)), r"lora_a must have shape \(r, 8\)"),
    (dict(lora_b=torch.randn(8, 3)), r"lora_b must have shape \(8, 2\)"),
    (dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(8, 0)), "rank >= 1"),
    (dict(bias=torch.randn(7)), r"bias must have shape \(8,\)"),
    (dict(weight=torch.randn(8, 8, dtype=torch.float64)), "weight dtype"),
    (dict(weight=torch.randn(8, 8, requires_grad=True)), "weight must be frozen"),
    (dict(scale=float("nan")), "scale must be a finite"),
    (dict(dropout_p=1.0), "dropout_p must be"),
    (dict(x=torch.randint(0, 3, (4, 8))), "x must be a floating tensor"),
    (dict(x=[1.0]), "x must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(bad, match):
    d = lora_inputs(4, 8, 8, 2)
    d["dropout_p"] = 0.0
    d.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        pfp.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["scale"],
                        dropout_p=d["dropout_p"])


def test_mixed_precision_adapter_weights_are_cast():
    """fp32 adapter weights on a bf16 model (PEFT's usual autocast_adapter_dtype): gradients stay fp32."""
    d = lora_inputs(6, 16, 8, 2, dtype=torch.bfloat16)
    a = d["lora_a"].float().requires_grad_()
    b = d["lora_b"].float().requires_grad_()
    y = pfp.lora_linear(d["x"], d["weight"], d["bias"], a, b, 1.0, backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_import_without_triton_and_without_extension():
    """``import pyfastpeft`` and the torch backend work with Triton hidden and no ``_C``."""
    code = textwrap.dedent("""
        import sys, importlib.machinery as m
        _find = m.PathFinder.find_spec  # the finder of installed packages: make it not see triton
        def find_spec(name, path=None, target=None):
            return None if name.split(".")[0] == "triton" else _find(name, path, target)
        m.PathFinder.find_spec = staticmethod(find_spec)
        import torch, pyfastpeft as pfp
        y = pfp.lora_linear(torch.randn(3, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)
        info = pfp.backend_info()
        assert "triton" not in sys.modules, "triton was imported"
        assert info["triton"] is None, info
        assert "triton" not in pfp.available_backends("lora_linear", "cpu")
        print("ok", tuple(y.shape), info["triton_status"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "1"  # even when asked to interpret, a missing triton is not an error
    env["PYFASTPEFT_DISABLE_CUDA_EXT"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok (3, 4)" in out.stdout


def test_lora_prefers_the_fused_triton_path():
    from pyfastpeft.core.backend import OpRegistry
    from pyfastpeft.lora.lora_linear import BWD, FWD

    assert FWD.order == BWD.order == ("triton", "cuda", "torch")
    assert list(pfp.backend_info()["ops"]["lora_linear_fwd"]) == ["triton", "cuda", "torch"]
    with pytest.raises(ValueError, match="permutation"):
        OpRegistry("bogus_fwd", order=("torch",))
