"""Ten training steps of a tiny MLP: pyfastpeft's LoRALinear vs PEFT's LoRA from the same start.

Losses and adapter weights must agree step for step (fp32; PEFT is the oracle), and the loss must fall.
"""
import copy

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.testing import assert_rel_close

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_ten_steps_match_peft_and_loss_falls():
    torch.manual_seed(0)
    base = MLP()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    ours = copy.deepcopy(base)
    for name in ("fc1", "fc2"):
        setattr(ours, name, pfp.nn.LoRALinear.from_peft(getattr(peft_model.base_model.model, name)))
    ours.requires_grad_(False)
    for m in (ours.fc1, ours.fc2):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    p_params = [p for p in peft_model.parameters() if p.requires_grad]
    o_params = [p for p in ours.parameters() if p.requires_grad]
    assert len(p_params) == len(o_params) == 4
    opt_p = torch.optim.AdamW(p_params, lr=3e-2)
    opt_o = torch.optim.AdamW(o_params, lr=3e-2)
    gen = torch.Generator().manual_seed(1)
    w_true = torch.randn(24, 8, generator=gen) * 0.3  # a low-rank-reachable shift of the base model's map
    losses = []
    for step in range(10):
        x = torch.randn(3, 11, 24, generator=gen)  # 3-D tokens, as in a transformer
        with torch.no_grad():
            target = base(x) + x @ w_true
        loss_p = torch.nn.functional.mse_loss(peft_model(x), target)
        loss_o = torch.nn.functional.mse_loss(ours(x), target)
        assert loss_o.item() == pytest.approx(loss_p.item(), rel=1e-5), f"step {step}"
        for opt, loss in ((opt_p, loss_p), (opt_o, loss_o)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss_o.item())
    for name in ("fc1", "fc2"):
        pl = getattr(peft_model.base_model.model, name)
        ol = getattr(ours, name)
        assert_rel_close(f"{name}.A", ol.lora_A.weight, pl.lora_A["default"].weight, rel=1e-4)
        assert_rel_close(f"{name}.B", ol.lora_B.weight, pl.lora_B["default"].weight, rel=1e-4)
    assert losses[-1] < 0.8 * losses[0], losses
