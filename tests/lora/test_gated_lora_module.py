"""``pfp.nn.GatedLoRALinear``: PEFT parity with every token selected, merge rules, gate_loss, training."""
import copy

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.testing import assert_rel_close

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


def test_all_selected_equals_peft_lora():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    pl = model.base_model.model[0]
    with torch.no_grad():
        pl.lora_B["default"].weight.normal_()
    ours = pfp.nn.GatedLoRALinear.from_peft(pl)  # tau = 0: every token selected
    assert float(ours.tau.detach()) == 0.0
    x = torch.randn(3, 7, 48)
    g = torch.randn(3, 7, 40)
    yp, yo = pl(x), ours(x)
    assert_rel_close("y", yo, yp)
    assert ours.selected_fraction == 1.0
    gp = torch.autograd.grad(yp, (pl.lora_A["default"].weight, pl.lora_B["default"].weight), g)
    go = torch.autograd.grad(yo, (ours.lora_A.weight, ours.lora_B.weight), g)
    for name, o, p in zip(("dA", "dB"), go, gp):
        assert_rel_close(name, o, p)


def test_merge_only_when_every_token_is_selected():
    layer = pfp.nn.GatedLoRALinear.from_linear(nn.Linear(16, 12), r=2, alpha=4).eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer.merged()(x), layer(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.tau.fill_(0.3)
    with pytest.raises(ValueError, match="cannot merge a gated LoRA layer with tau=0.3"):
        layer.merged()


def test_gate_loss_raises_tau_and_lowers_selection():
    torch.manual_seed(0)
    model = nn.Sequential(pfp.nn.GatedLoRALinear.from_linear(nn.Linear(32, 32), r=4, alpha=8),
                          nn.ReLU(), pfp.nn.GatedLoRALinear.from_linear(nn.Linear(32, 8), r=2, alpha=4))
    with pytest.raises(ValueError, match="no GatedLoRALinear"):
        pfp.gate_loss(nn.Linear(2, 2))
    for m in model:
        if isinstance(m, pfp.nn.GatedLoRALinear):
            with torch.no_grad():
                m.lora_B.weight.normal_(std=0.3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    x = torch.randn(256, 32)
    fractions = []
    for _ in range(60):
        model(x)
        loss = pfp.gate_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        fractions.append(model[0].selected_fraction)
    assert float(model[0].tau.detach()) > 0.0
    assert fractions[-1] < 0.7 < fractions[0], fractions
    assert "tau=" in repr(model[0]) and "gate_grad=threshold" in repr(model[0])


def test_training_with_task_and_gate_loss():
    """A small regression: the task loss falls while gate_loss pushes tau up and the selection down."""
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 8))
    target_model = copy.deepcopy(base)
    with torch.no_grad():  # the task: a rank-2 change of the first layer
        target_model[0].weight += 0.5 * torch.randn(64, 2) @ torch.randn(2, 24) / 24 ** 0.5
    model = copy.deepcopy(base).requires_grad_(False)
    model[0] = pfp.nn.GatedLoRALinear.from_linear(model[0], r=4, alpha=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, fracs = [], []
    for step in range(60):
        x = torch.randn(128, 24)
        task = nn.functional.mse_loss(model(x), target_model(x))
        loss = task + 0.02 * pfp.gate_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(task.item())
        fracs.append(model[0].selected_fraction)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert float(model[0].tau.detach()) > 0
