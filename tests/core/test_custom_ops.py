"""The torch.library contract of every primitive (opcheck) and torch.compile without graph breaks."""
import os

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.testing import lora_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = pfp.available_backends("lora_linear", DEVICE)


def _fwd_args(backend, dropout=False):
    d = lora_inputs(12, 24, 16, 4, device=DEVICE)
    xl = d["x"] * 2.0 if dropout else None
    return (d["x"], xl, d["weight"], d["bias"], d["lora_a"], d["lora_b"],
            d["scale"], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [False, True], ids=["x", "x_lora"])
def test_opcheck_lora_linear_fwd(backend, dropout):
    torch.library.opcheck(torch.ops.pyfastpeft.lora_linear_fwd.default, _fwd_args(backend, dropout))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dx_mode", [0, 1, 2])
def test_opcheck_lora_linear_bwd(backend, dx_mode):
    d = lora_inputs(12, 24, 16, 4, device=DEVICE)
    dy = torch.randn(12, 16, device=DEVICE)
    u = d["x"] @ d["lora_a"].T
    torch.library.opcheck(torch.ops.pyfastpeft.lora_linear_bwd.default,
                          (dy, d["x"], u, d["weight"], d["lora_a"], d["lora_b"], d["scale"], dx_mode, backend))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = pfp.nn.LoRALinear.from_linear(nn.Linear(32, 48), r=4, alpha=8)
        self.b = pfp.nn.LoRALinear.from_linear(nn.Linear(48, 16, bias=False), r=2, alpha=4)
        with torch.no_grad():
            self.a.lora_B.weight.normal_()
            self.b.lora_B.weight.normal_()

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_no_graph_break(backend):
    torch._dynamo.reset()
    model = TwoLayer().to(DEVICE).eval()
    model.a.backend = model.b.backend = backend
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    g = torch.randn(2, 5, 16, device=DEVICE)
    y_e = model(x)
    ge = torch.autograd.grad(y_e, [x, model.a.lora_A.weight, model.b.lora_B.weight], g)
    y_c = compiled(x)
    gc = torch.autograd.grad(y_c, [x, model.a.lora_A.weight, model.b.lora_B.weight], g)
    torch.testing.assert_close(y_c, y_e)
    for c, e in zip(gc, ge):
        torch.testing.assert_close(c, e)


def test_compile_with_dynamic_token_count():
    """Training changes M every step: one dynamic graph, no recompile per M."""
    torch._dynamo.reset()
    model = TwoLayer().to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for m in (3, 7, 11):
        x = torch.randn(m, 32, device=DEVICE)
        torch.testing.assert_close(compiled(x), model(x))


def test_compile_fullgraph_gated_no_graph_break():
    torch._dynamo.reset()
    model = nn.Sequential(pfp.nn.GatedLoRALinear.from_linear(nn.Linear(32, 48), r=4, alpha=8), nn.ReLU(),
                          pfp.nn.GatedLoRALinear.from_linear(nn.Linear(48, 16), r=2, alpha=4))
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
        model[2].lora_B.weight.normal_()
        model[0].tau.fill_(1.0)
    x = torch.randn(2, 5, 32, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    g = torch.randn(2, 5, 16)
    params = [x, model[0].tau, model[0].lora_A.weight, model[2].lora_B.weight]
    y_e = model(x)
    frac_e = model[0].selected_fraction
    ge = torch.autograd.grad(y_e, params, g)
    y_c = compiled(x)
    assert model[0].selected_fraction == frac_e  # the gate statistics survive compilation
    gc = torch.autograd.grad(y_c, params, g)
    torch.testing.assert_close(y_c, y_e)
    for c, e in zip(gc, ge):
        torch.testing.assert_close(c, e)
