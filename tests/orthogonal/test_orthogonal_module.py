"""``pfp.nn.OFTLinear`` / ``pfp.nn.PSOFTLinear``: construction (identity at init, frozen base, SVD init),
merged ≡ unmerged, unmerge restores W, adapter_config rebuilds the same adapter, COFT projection,
state_dict round trip, low-precision bases, errors."""
import copy
import json

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.nn import OFTLinear, PSOFTLinear
from pyfastpeft.testing import compare


def _base(K=48, N=40, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N).to(dtype)


def _perturb(layer, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return layer


OFT_KW = [dict(block_size=8), dict(block_size=8, method="exact"), dict(block_size=16, block_share=True),
          dict(block_size=4, method="neumann", terms=7), dict(block_size=8, coft=True, eps=1e-3)]
PSOFT_KW = [dict(r=8, alpha=16), dict(r=8, alpha=8, method="neumann", eps=0.5), dict(r=6, alpha=3, vectors=False),
            dict(r=5, alpha=10, svd="lowrank", seed=3, init="pissa_init"), dict(r=4, alpha=4, vectors=[False, True])]


def _make(cls, kw, base):
    layer = cls.from_linear(base, **kw)
    layer.backend = "torch"  # the Triton Cayley kernel runs in the interpreter here: op tests cover it
    return layer


@pytest.mark.parametrize("cls,kw", [(OFTLinear, k) for k in OFT_KW] + [(PSOFTLinear, k) for k in PSOFT_KW],
                         ids=lambda v: v.__name__ if isinstance(v, type) else "-".join(map(str, v.values())))
def test_module_semantics(cls, kw):
    base = _base()
    w0 = base.weight.detach().clone()
    layer = _make(cls, kw, base)
    x = torch.randn(2, 7, 48)
    # identity at init; the base layer is kept and frozen; only the adapter trains
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)
    assert layer.base_layer is base and not any(p.requires_grad for p in base.parameters())
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("base_layer") for n in trainable)
    _perturb(layer)
    layer.eval()
    y = layer(x)
    assert not torch.allclose(y, base(x), atol=1e-4), "the perturbed adapter changes nothing"
    # merged ≡ unmerged; unmerge restores W; the base is not modified
    m = layer.merged()
    assert type(m) is nn.Linear
    v = compare(m(x), y.double(), reduction=48 * 2)
    assert v.ok, f"merged vs unmerged: {v}"
    torch.testing.assert_close(layer.unmerged(m).weight, w0, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=0)
    # adapter_config is JSON and rebuilds the same adapter on the same base (state dict copied)
    cfg = json.loads(json.dumps(layer.adapter_config()))
    fresh = _make(cls, cfg, copy.deepcopy(base))
    fresh.load_state_dict(layer.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    assert "backend=torch" in repr(layer)
    # gradients reach every trainable parameter and nothing else
    layer.train()
    layer(x).square().sum().backward()
    for n, p in layer.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_psoft_svd_init_and_factors():
    base = _base(K=32, N=24)
    layer = PSOFTLinear.from_linear(base, 8, 16)
    s = 16 / 8
    U, S, Vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    torch.testing.assert_close(layer.psoft_a, Vh[:8])
    torch.testing.assert_close(layer.psoft_b, U[:, :8] * (S[:8] / s))
    # psoft_init: A has orthonormal rows; s·B A is the rank-8 truncation of W
    torch.testing.assert_close(layer.psoft_a @ layer.psoft_a.t(), torch.eye(8), rtol=0, atol=1e-5)
    p = PSOFTLinear.from_linear(copy.deepcopy(base), 8, 16, init="pissa_init")
    torch.testing.assert_close(s * p.psoft_b @ p.psoft_a, s * layer.psoft_b @ layer.psoft_a, rtol=1e-5, atol=1e-5)
    # lowrank SVD with a seed is deterministic (a checkpoint without the factors rebuilds them)
    a1 = PSOFTLinear.from_linear(copy.deepcopy(base), 4, 4, svd="lowrank", seed=5).psoft_a
    a2 = PSOFTLinear.from_linear(copy.deepcopy(base), 4, 4, svd="lowrank", seed=5).psoft_a
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)


def test_oft_coft_projects_in_place():
    layer = _make(OFTLinear, dict(block_size=8, coft=True, eps=1e-3), _base(K=32, N=8))
    _perturb(layer, scale=1.0)
    layer(torch.randn(3, 32))
    G = 4
    norms = (2 * layer.oft_v.detach().double().pow(2).sum(1)).sqrt()  # ‖Q‖_F = √2 ‖v‖
    assert (norms <= 1e-3 / G ** 0.5 * (1 + 1e-6)).all(), norms


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base(dtype):
    """Half-precision bases: fp32 adapter parameters (solve in fp32), outputs in the base's dtype."""
    base = _base(dtype=dtype)
    for layer in (_make(OFTLinear, dict(block_size=16, method="exact"), base),
                  _make(PSOFTLinear, dict(r=8, alpha=8), base)):
        _perturb(layer)
        assert all(p.dtype == torch.float32 for p in layer.parameters() if p.requires_grad)
        x = torch.randn(5, 48, dtype=dtype)
        y = layer(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        y.float().sum().backward()
        ref = layer.merged()(x)
        assert (y.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()


def test_module_errors():
    with pytest.raises(ValueError, match="block_size must divide"):
        OFTLinear.from_linear(_base(K=30), 8)
    with pytest.raises(ValueError, match="method"):
        OFTLinear.from_linear(_base(), 8, method="svd")
    with pytest.raises(ValueError, match="terms"):
        OFTLinear.from_linear(_base(), 8, terms=0)
    with pytest.raises(ValueError, match="r must be"):
        PSOFTLinear.from_linear(_base(K=8, N=6), 7, 7)
    with pytest.raises(ValueError, match="init"):
        PSOFTLinear.from_linear(_base(), 4, 4, init="lora")
    with pytest.raises(ValueError, match="vectors"):
        PSOFTLinear.from_linear(_base(), 4, 4, vectors="yes")
    with pytest.raises(TypeError):
        OFTLinear.from_linear(nn.Conv2d(3, 3, 1), 3)


def test_inject_builds_orthogonal_layers():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    pfp.inject(model, "oft", target_modules=["0"], block_size=8)
    pfp.inject(model, "psoft", target_modules=["2"], r=4, alpha=4)
    assert isinstance(model[0], OFTLinear) and isinstance(model[2], PSOFTLinear)
