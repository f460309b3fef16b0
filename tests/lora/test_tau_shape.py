"""``GatedLoRALinear.tau`` is a 1-element tensor (shape ``(1,)``) so that FSDP2 can shard it; the functional op
takes ``()`` and ``(1,)`` alike, and adapter files / state dicts saved with a 0-dim ``tau`` still load."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyfastpeft as pfp
from pyfastpeft.surgery import WEIGHTS_NAME
from tests._tiny_models import inject_case, perturb_adapters, tiny_llama


def test_layer_tau_has_one_dimension():
    layer = pfp.nn.GatedLoRALinear(torch.nn.Linear(16, 8), r=2, alpha=4, tau_init=0.125)
    assert layer.tau.shape == (1,) and float(layer.tau.detach()) == 0.125
    assert layer.gate_loss().shape == ()  # before any forward: a 0-dim zero that still reaches tau
    layer(torch.randn(5, 16))
    assert layer.gate_loss().shape == ()


def test_op_takes_0d_and_1d_tau_alike():
    torch.manual_seed(0)
    x, w, b = torch.randn(12, 16), torch.randn(8, 16), torch.randn(8)
    a, bb = torch.randn(3, 16) * 0.3, torch.randn(8, 3) * 0.3
    dy = torch.randn(12, 8)
    results = []
    for shape in [(), (1,)]:
        tau = torch.full(shape, 0.3, requires_grad=True)
        xx, aa = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
        y, sel, _ = pfp.gated_lora_linear(xx, w, b, aa, bb, 2.0, tau, gate_width=0.5, return_gate=True,
                                          backend="torch")
        y.backward(dy)
        assert tau.grad.shape == tau.shape
        results.append((y, sel, xx.grad, aa.grad, tau.grad.reshape(())))
    assert 0 < int(results[0][1].sum()) < 12  # some tokens selected, some not: the gate is exercised
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(2,), (1, 1)])
def test_op_rejects_tau_of_other_shapes(shape):
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"tau must be a floating tensor of shape \(\) or \(1,\)"):
        pfp.gated_lora_linear(x, w, None, torch.randn(2, 16), torch.randn(8, 2), 1.0, torch.zeros(shape))


def test_adapter_file_with_0d_tau_still_loads(tmp_path):
    model = inject_case("llama", "gated_lora", tau_init=0.0)
    perturb_adapters(model)
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, pfp.nn.GatedLoRALinear)):
            m.tau.fill_(-0.25 * (i + 1))  # a trained, distinct value per layer
    pfp.save_adapter(model, tmp_path)
    f = tmp_path / WEIGHTS_NAME
    old = {k: (v.reshape(()) if k.endswith(".tau") else v) for k, v in load_file(str(f)).items()}
    assert sum(v.dim() == 0 for v in old.values()) == 6  # 3 targets x 2 layers, written as older releases did
    save_file(old, str(f))
    fresh = pfp.load_adapter(tiny_llama(), tmp_path)
    want = {n: m.tau.detach() for n, m in model.named_modules() if isinstance(m, pfp.nn.GatedLoRALinear)}
    got = {n: m.tau.detach() for n, m in fresh.named_modules() if isinstance(m, pfp.nn.GatedLoRALinear)}
    assert set(got) == set(want)
    for n in want:
        assert got[n].shape == (1,) and torch.equal(got[n], want[n]), n


def test_state_dict_with_0d_tau_still_loads():
    layer = pfp.nn.GatedLoRALinear(torch.nn.Linear(16, 8), r=2, alpha=4)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    sd["tau"] = torch.tensor(-0.5)
    layer.load_state_dict(sd)
    assert layer.tau.shape == (1,) and float(layer.tau.detach()) == -0.5
