"""``pfp.nn.AtomConv2d`` / ``pfp.nn.AtomLinear``: construction (svd / lasso), zero init, every conv option, merge,
recursive atoms, adapter_config, bad input, and timm ResNet / ConvNeXt training with atoms injected."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.nn import AtomConv2d, AtomLinear
from pyfastpeft.atoms.modules import inject_conv_atoms
from pyfastpeft.atoms.reference import atom_conv2d_ref, atom_linear_ref, compose_atoms_ref

CONVS = [
    pytest.param(lambda: nn.Conv2d(5, 7, 3, padding=1), id="3x3"),
    pytest.param(lambda: nn.Conv2d(5, 7, 3, stride=2, bias=False), id="stride2-nobias"),
    pytest.param(lambda: nn.Conv2d(6, 4, (3, 2), padding="same", dilation=2, groups=2), id="same-dil-groups"),
    pytest.param(lambda: nn.Conv2d(6, 6, 7, padding=3, groups=6), id="depthwise7x7"),
    pytest.param(lambda: nn.Conv2d(5, 7, 4, padding="same"), id="same-even"),
    pytest.param(lambda: nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect"), id="reflect"),
]


@pytest.mark.parametrize("make", CONVS)
@pytest.mark.parametrize("sub_atoms", [0, 2])
def test_zero_init_equals_base_and_merge_matches(make, sub_atoms):
    base = make()
    layer = AtomConv2d.from_conv(base, 3, sub_atoms=sub_atoms)
    layer.backend = "torch"
    x = torch.randn(2, base.in_channels, 9, 8).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    y = layer(x)
    assert not torch.allclose(y, base(x))
    merged = layer.merged()
    assert type(merged) is nn.Conv2d and merged.padding_mode == base.padding_mode
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_only_atoms_train_and_base_is_frozen():
    layer = AtomConv2d.from_conv(nn.Conv2d(8, 8, 3), 4)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["atoms"]
    rec = AtomConv2d.from_conv(nn.Conv2d(8, 8, 3), 4, sub_atoms=3)
    assert sorted(n for n, p in rec.named_parameters() if p.requires_grad) == ["atoms_beta", "atoms_sub"]
    assert rec.atoms_beta.shape == (3, 4, 8) and rec.atoms_sub.shape == (3, 4, 3, 3)
    assert {"atom_coeff", "base_atoms"} <= set(rec.state_dict())
    assert "num_atoms=4" in repr(rec) and "sub_atoms=3" in repr(rec)


def test_recursive_gradients_match_reference_fp64():
    base = nn.Conv2d(6, 9, 3, padding=1, groups=3, dtype=torch.float64)
    layer = AtomConv2d.from_conv(base, 4, sub_atoms=3)
    layer.backend = "torch"
    with torch.no_grad():
        layer.atoms_sub.normal_()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.atoms_beta, layer.atoms_sub), g)
    beta = layer.atoms_beta.detach().clone().requires_grad_()
    sub = layer.atoms_sub.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yr = atom_conv2d_ref(xr, base.weight.detach(), base.bias.detach(), layer.atom_coeff,
                         compose_atoms_ref(beta, sub), 1, 1, 1, 3)
    want = torch.autograd.grad(yr, (xr, beta, sub), g)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_svd_is_exact_at_full_rank_and_deterministic():
    base = nn.Conv2d(6, 5, 3, dtype=torch.float64)
    a = AtomConv2d.from_conv(base, 9)
    b = AtomConv2d.from_conv(base, 9)
    rec = torch.einsum("oij,jpq->oipq", a.atom_coeff, a.base_atoms)
    torch.testing.assert_close(rec, base.weight.detach(), rtol=1e-10, atol=1e-12)
    assert torch.equal(a.atom_coeff, b.atom_coeff) and torch.equal(a.base_atoms, b.base_atoms)
    low = AtomConv2d.from_conv(base, 2)  # truncation keeps the top-2 subspace
    torch.testing.assert_close(low.base_atoms, a.base_atoms[:2])


def test_lasso_is_seeded_sparse_and_allows_overcomplete():
    base = nn.Conv2d(4, 4, 3)
    a = AtomConv2d.from_conv(base, 12, decomposition="lasso", seed=1)
    b = AtomConv2d.from_conv(base, 12, decomposition="lasso", seed=1)
    c = AtomConv2d.from_conv(base, 12, decomposition="lasso", seed=2)
    assert torch.equal(a.atom_coeff, b.atom_coeff) and not torch.equal(a.atom_coeff, c.atom_coeff)
    assert (a.atom_coeff == 0).float().mean() > 0.1  # LASSO codes are sparse
    w = base.weight.detach().double()
    rec = torch.einsum("oij,jpq->oipq", a.atom_coeff.double(), a.base_atoms.double())
    assert (rec - w).norm() / w.norm() < 0.5
    torch.testing.assert_close(a.base_atoms.double().flatten(1).norm(dim=1), torch.ones(12, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_atoms=0), "num_atoms"), (dict(num_atoms=10), "num_atoms"), (dict(num_atoms=2, sub_atoms=-1), "sub_atoms"),
    (dict(num_atoms=2, decomposition="pca"), "decomposition"),
])
def test_from_conv_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AtomConv2d.from_conv(nn.Conv2d(4, 4, 3), **kwargs)


def test_bad_base_layers():
    with pytest.raises(ValueError, match="conv"):
        AtomConv2d.from_conv(nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="linear"):
        AtomLinear.from_linear(nn.Conv2d(4, 4, 1), 2, block=2)
    with pytest.raises(ValueError, match=r"block=4 .*out_features=6.*in_features=8"):
        AtomLinear.from_linear(nn.Linear(8, 6), 2, block=4)
    with pytest.raises(ValueError, match="num_atoms"):
        AtomLinear.from_linear(nn.Linear(8, 8), 5, block=2)


def test_adapter_config_rebuilds_the_same_adapter():
    base = nn.Conv2d(6, 6, 3, padding=1)
    layer = AtomConv2d.from_conv(base, 4, sub_atoms=2, decomposition="lasso", seed=3)
    cfg = json.loads(json.dumps(layer.adapter_config()))
    again = AtomConv2d.from_conv(copy.deepcopy(base), **cfg)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    lin = AtomLinear.from_linear(nn.Linear(8, 12), 3, block=4)
    cfg = json.loads(json.dumps(lin.adapter_config()))
    assert AtomLinear.from_linear(copy.deepcopy(lin.base_layer), **cfg).atom_coeff.equal(lin.atom_coeff)


def test_atom_linear_module():
    base = nn.Linear(24, 16, dtype=torch.float64)
    layer = AtomLinear.from_linear(base, 5, block=4)
    layer.backend = "torch"
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        layer.atoms.normal_()
    y = layer(x)
    ref = atom_linear_ref(x, base.weight, base.bias, layer.atom_coeff, layer.atoms)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.atoms), g)
    want = torch.autograd.grad(ref, (x, layer.atoms), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(layer.merged()(x), y, rtol=1e-10, atol=1e-12)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["atoms"]


# --------------------------------------------------------------------------------------------- timm models
timm = pytest.importorskip("timm")


def _three_by_three_or_depthwise(name, m):
    return isinstance(m, nn.Conv2d) and (m.kernel_size == (3, 3) or (m.groups > 1 and m.groups == m.in_channels))


# timm zero-initialises each ResNet block's last BN scale and starts ConvNeXt layer scales at 1e-6 (no signal
# through the blocks at init); a pretrained model has neither, so the test builds them as trained models are.
@pytest.mark.parametrize("arch, px, kwargs", [("resnet18", 32, dict(zero_init_last=False)),
                                              ("convnext_atto", 32, dict(ls_init_value=1.0))],
                         ids=["resnet18", "convnext_atto"])
def test_timm_training_only_atoms_change(arch, px, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs)
    ref = copy.deepcopy(model).eval()
    names = inject_conv_atoms(model, 4, predicate=_three_by_three_or_depthwise)
    convs = [m for m in ref.modules() if _three_by_three_or_depthwise("", m)]
    assert len(names) == len(convs) > 0
    model.eval()  # BatchNorm statistics frozen, as in the paper's fine-tuning; atoms zero: same outputs
    x = torch.randn(2, 3, px, px)
    with pfp.use_backend("torch"):
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".atoms") for n in trainable)
    n_train = sum(p.numel() for p in trainable.values())
    assert n_train < 1e-3 * sum(p.numel() for p in ref.parameters())  # < 0.1 % of the model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(trainable.values(), lr=2e-2)
    target = torch.tensor([1, 3])
    losses = []
    with pfp.use_backend("torch"):
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.atoms" for n in names}, changed ^ {f"{n}.atoms" for n in names}


def test_timm_vit_linear_atoms_train_only_atoms():
    """AtomLinear (channel blocks) in a timm ViT's qkv / proj / fc1 / fc2: zero init equals the base model,
    a few steps lower the loss, and only the atoms change."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5).eval()
    ref = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in
             ("qkv", "proj", "fc1", "fc2")]
    for n in names:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, AtomLinear.from_linear(model.get_submodule(n), 4, block=16))
    x = torch.randn(2, 3, 32, 32)
    with pfp.use_backend("torch"):
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == len(names) == 8
        opt = torch.optim.Adam(params, lr=2e-2)
        losses = []
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 4]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    changed = {k for k, v in model.state_dict().items() if k.endswith(".atoms") and v.abs().sum() > 0}
    assert changed == {f"{n}.atoms" for n in names}


def test_autocast_bf16_with_fp32_atoms():
    layer = AtomConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), 4)
    layer.backend = "torch"
    with torch.no_grad():
        layer.atoms.normal_()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.atoms.grad.dtype == torch.float32
    assert torch.isfinite(layer.atoms.grad).all() and layer.atoms.grad.abs().sum() > 0
