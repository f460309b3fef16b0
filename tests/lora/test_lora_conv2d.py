"""``pfp.nn.LoRAConv2d`` (PEFT's LoRA ``Conv2d`` maths): forward and every gradient against an fp64 reference
(1×1, k×k, stride, dilation, groups, lora_bias), PEFT's merge, ``inject`` on convs, ``from_peft`` of PEFT's
LoRA Conv2d, and PEFT's adapter format both ways."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.testing import assert_close_to_ref, assert_rel_close

CASES = {  # Conv2d kwargs
    "1x1": dict(in_channels=8, out_channels=12, kernel_size=1),
    "3x3-stride2": dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1),
    "3x5-dilation": dict(in_channels=4, out_channels=8, kernel_size=(3, 5), padding=(2, 4), dilation=2, bias=False),
    "groups": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4),
}


def _layer(case, r=4, **kw):
    torch.manual_seed(0)
    layer = pfp.nn.LoRAConv2d.from_conv(nn.Conv2d(**CASES[case]), r, 8.0, **kw)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
        if layer.lora_B.bias is not None:
            layer.lora_B.bias.normal_(0, 0.3)
    return layer


def _ref64(layer, x):
    """fp64: base conv + scale · 1×1 grouped conv of the k×k conv (written out, not the module)."""
    b, A, B = layer.base_layer, layer.lora_A.weight.double(), layer.lora_B.weight.double()
    geo = dict(stride=b.stride, padding=b.padding, dilation=b.dilation)
    bias = None if b.bias is None else b.bias.double()
    bB = None if layer.lora_B.bias is None else layer.lora_B.bias.double()
    y = F.conv2d(x, b.weight.double(), bias, groups=b.groups, **geo)
    return y + layer.scaling * F.conv2d(F.conv2d(x, A, **geo), B, bB, groups=b.groups)


@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_against_fp64(case, lora_bias):
    layer = _layer(case, lora_bias=lora_bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, CASES[case]["in_channels"], 9, 11, generator=g, requires_grad=True)
    y = layer(x)
    dy = torch.randn(y.shape, generator=g)
    leaves = {"x": x, "lora_A": layer.lora_A.weight, "lora_B": layer.lora_B.weight}
    if lora_bias:
        leaves["lora_B.bias"] = layer.lora_B.bias
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    x64 = x.detach().double().requires_grad_(True)
    twin = copy.deepcopy(layer).double()  # the same values in fp64; _ref64 does not call the module
    ref_leaves = [x64, twin.lora_A.weight, twin.lora_B.weight] + ([twin.lora_B.bias] if lora_bias else [])
    ref = _ref64(twin, x64)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    K = CASES[case]["in_channels"] * layer.lora_A.weight[0, 0].numel()
    assert_close_to_ref("output", y, ref, reduction=K + layer.r)
    for (name, _), got, want in zip(leaves.items(), grads, ref_grads):
        assert_close_to_ref(f"grad {name}", got, want, reduction=K + layer.r + y[0, 0].numel())
    assert all(p.grad is None and not p.requires_grad for p in layer.base_layer.parameters())


@pytest.mark.parametrize("case", ["1x1", "3x3-stride2", "3x5-dilation"])
def test_merge_equals_the_layer(case):
    layer = _layer(case, lora_bias=True).eval()
    x = torch.randn(2, CASES[case]["in_channels"], 9, 11, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_rel_close("merged", layer.merged()(x), layer(x))


def test_grouped_merge_refuses_and_bad_arguments():
    with pytest.raises(ValueError, match="cannot merge LoRA into a grouped conv"):
        _layer("groups").merged()
    with pytest.raises(ValueError, match="r=3 must be divisible by the conv's groups=4"):
        pfp.nn.LoRAConv2d(nn.Conv2d(8, 8, 3, groups=4), 3, 8)
    with pytest.raises(ValueError, match="backend must be None or 'torch'"):
        pfp.nn.LoRAConv2d(nn.Conv2d(8, 8, 3), 2, 8, backend="triton")


class _Net(nn.Module):
    def __init__(self, dilation=1):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=dilation, dilation=dilation)
        self.pw = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.dw(self.pw(torch.relu(self.stem(x)))).mean((2, 3)))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _perturb(model):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_inject_targets_convs_and_all_linear_does_not():
    model = pfp.inject(_Net(), "lora", target_modules=["stem", "pw", "dw"], r=4, alpha=8)
    assert all(isinstance(getattr(model, n), pfp.nn.LoRAConv2d) for n in ("stem", "pw", "dw"))
    # "all-linear" keeps PEFT's meaning: nn.Linear layers only (here the head, which it skips), never convs
    with pytest.raises(ValueError, match="no nn.Linear layer outside its output head"):
        pfp.inject(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)), "lora", target_modules="all-linear", r=2,
                   alpha=4)


def test_peft_conv_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["stem", "pw", "dw"], lora_bias=True)
    pm = peft.get_peft_model(_Net(), cfg)
    _perturb(pm)
    with torch.no_grad():
        want = pm(X)
    pm.save_pretrained(tmp_path / "peft")
    # PEFT saved -> we load (no PEFT model)
    ours = pfp.load_adapter(_Net(), tmp_path / "peft")
    assert isinstance(ours.dw, pfp.nn.LoRAConv2d)
    with torch.no_grad():
        assert_rel_close("load_adapter vs PEFT", ours(X), want)
    # ours saved -> PEFT loads
    pfp.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_Net(), tmp_path / "ours")
    with torch.no_grad():
        assert_rel_close("PEFT vs ours", back(X), want)
    # from_peft: identical outputs
    conv = pfp.from_peft(pm)
    with torch.no_grad():
        assert_rel_close("from_peft", conv(X), want)


def test_dilated_conv_stays_in_our_format(tmp_path):
    model = pfp.inject(_Net(dilation=2), "lora", target_modules=["stem"], r=4, alpha=8)
    _perturb(model)
    with pytest.raises(ValueError, match="PEFT's LoRA Conv2d has no dilation"):
        pfp.save_adapter(model, tmp_path)
    pfp.save_adapter(model, tmp_path, format="pyfastpeft")
    fresh = pfp.load_adapter(_Net(dilation=2), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_psoft_has_peft_defaults():
    peft = pytest.importorskip("peft")
    import dataclasses

    d = {f.name: f.default for f in dataclasses.fields(peft.PsoftConfig)}
    layer = pfp.nn.PSOFTLinear(nn.Linear(64, 48))
    assert (layer.r, layer.alpha) == (d["r"], d["psoft_alpha"])
    assert (layer.method == "neumann", layer.terms, layer.eps) == \
        (d["use_cayley_neumann"], d["num_cayley_neumann_terms"], d["cayley_neumann_eps"])
    assert (layer.mag_a, layer.mag_b, layer.svd, layer.init, layer.seed, layer.niter) == \
        (d["psoft_mag_a"], d["psoft_mag_b"], d["psoft_svd"], d["ab_svd_init"], d["random_seed"],
         d["psoft_svd_lowrank_niter"])
