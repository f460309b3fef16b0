"""PEFT 0.21 OFT / PSOFT layers → ours: the same outputs and the same gradients of the adapter parameters
(fp32, norm-wise relative 1e-5) over PEFT's option combinations, including a PEFT checkpoint saved to disk,
loaded back and converted; OFT Conv2d converts to PEFT's merged conv; unsupported options raise."""
import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from pyfastpeft.nn import OFTLinear, PSOFTLinear  # noqa: E402
from pyfastpeft.testing import assert_rel_close  # noqa: E402

warnings.filterwarnings("ignore", message=".*")


class MLP(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(32, 48)
        self.act = nn.ReLU()
        self.down = nn.Linear(48, 24, bias=False)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _perturb_psoft(model, seed=1):
    """PEFT's init_weights=False gives random Q but vectors of 1: perturb the vectors too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vector_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _convert(peft_model):
    """Our layer for every PEFT OFT/PSOFT Linear (layer-level ``from_peft``), in a copy of the user's model."""
    model = copy.deepcopy(peft_model.base_model.model)
    pairs = []
    for name in ("up", "down"):
        pl = getattr(peft_model.base_model.model, name)  # the PEFT layer itself (its grads are compared)
        cls = OFTLinear if type(pl).__module__ == "peft.tuners.oft.layer" else PSOFTLinear
        ours = cls.from_peft(pl)
        ours.backend = "torch"  # the Triton Cayley kernel is covered by the op tests (interpreter is slow)
        setattr(model, name, ours)
        pairs.append((pl, ours))
    return model, pairs


def _grad_close(name, got, want):
    if want is None:  # PEFT's T=1 series is I: no graph to Q, no gradient; ours is an exact zero
        assert got is None or not got.any(), name
        return
    assert_rel_close(name, got, want)


def _compare(peft_model, seed=2):
    ours_model, pairs = _convert(peft_model)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed))
    gy = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(seed + 1))
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp = peft_model(xp)
    yo = ours_model(xo)
    assert_rel_close("y", yo, yp)
    yp.backward(gy)
    yo.backward(gy)
    assert_rel_close("dx", xo.grad, xp.grad)
    for (pl, ours), lname in zip(pairs, ("up", "down")):
        if isinstance(ours, OFTLinear):
            _grad_close(f"{lname}.oft_v.grad", ours.oft_v.grad, pl.oft_R["default"].weight.grad)
            assert_rel_close(f"{lname}.oft_v (after COFT)", ours.oft_v, pl.oft_R["default"].weight)
        else:
            R = pl.psoft_R["default"]
            _grad_close(f"{lname}.psoft_v.grad", ours.psoft_v.grad, R.weight.grad)
            for v in ("vector_a", "vector_b"):
                if getattr(R, v) is not None:
                    assert_rel_close(f"{lname}.{v}.grad", getattr(ours, v).grad, getattr(R, v).grad)
                else:
                    assert getattr(ours, v) is None
    return ours_model


# every Cayley variant PEFT offers, each with a block size and block_share (cycled: small and fast, while
# every value of every option appears, and each variant meets both block_share settings)
_OFT_METHODS = ((False, 5), (True, 1), (True, 2), (True, 3), (True, 4), (True, 5), (True, 8))
OFT_OPTIONS = [dict(oft_block_size=(4, 8, 16)[i % 3], use_cayley_neumann=neu, num_cayley_neumann_terms=t,
                    block_share=share)
               for i, ((neu, t), share) in enumerate(itertools.product(_OFT_METHODS, (False, True)))]
OFT_OPTIONS += [dict(oft_block_size=8, coft=True, eps=eps, use_cayley_neumann=neu)
                for eps in (6e-5, 0.5) for neu in (False, True)]
OFT_OPTIONS += [dict(r=4, oft_block_size=0, use_cayley_neumann=False)]  # r given instead of the block size


@pytest.mark.parametrize("opts", OFT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_oft_parity(opts):
    cfg = peft.OFTConfig(target_modules=["up", "down"], init_weights=False, **{"r": 0, **opts})
    _compare(peft.get_peft_model(MLP(), cfg))


_PSOFT_METHODS = ((False, 5, None), (False, 5, 0.5), (True, 1, None), (True, 3, None), (True, 5, None),
                  (True, 6, 0.3), (True, 8, 0.9))
_VECTORS = ((True, True), (False, False), (True, False), (False, True))
PSOFT_OPTIONS = [dict(use_cayley_neumann=neu, num_cayley_neumann_terms=t, cayley_neumann_eps=eps,
                      psoft_mag_a=_VECTORS[i % 4][0], psoft_mag_b=_VECTORS[i % 4][1])
                 for i, (neu, t, eps) in enumerate(_PSOFT_METHODS + _PSOFT_METHODS[::3])]
PSOFT_OPTIONS += [dict(ab_svd_init=init, psoft_svd=svd, random_seed=seed, psoft_svd_lowrank_niter=4)
                  for init in ("psoft_init", "pissa_init") for svd, seed in (("full", 0), ("lowrank", 7))]


@pytest.mark.parametrize("opts", PSOFT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_psoft_parity(opts):
    cfg = peft.PsoftConfig(target_modules=["up", "down"], r=8, psoft_alpha=12, init_weights=False, **opts)
    m = peft.get_peft_model(MLP(), cfg)
    _perturb_psoft(m)
    _compare(m)


@pytest.mark.parametrize("kind", ["oft", "psoft"])
def test_saved_checkpoint_roundtrip(kind, tmp_path):
    """Save a PEFT model, load it on a fresh base (PSOFT recomputes its factors from W), convert, compare."""
    if kind == "oft":
        cfg = peft.OFTConfig(target_modules=["up", "down"], r=0, oft_block_size=8, init_weights=False, coft=True,
                             eps=0.5, use_cayley_neumann=True, num_cayley_neumann_terms=6)
    else:
        cfg = peft.PsoftConfig(target_modules=["up", "down"], r=6, psoft_alpha=6, init_weights=False,
                               psoft_svd="lowrank", random_seed=3, use_cayley_neumann=True, cayley_neumann_eps=0.7)
    trained = peft.get_peft_model(MLP(), cfg)
    if kind == "psoft":
        _perturb_psoft(trained)
    trained.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(MLP(), str(tmp_path), is_trainable=True)
    ours = _compare(loaded)
    # and the loaded adapter equals the one that was saved
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert_rel_close("saved vs loaded", ours(x), trained(x))
    # our converted layers rebuild from their adapter_config on a fresh base (PSOFT: same SVD factors)
    for name in ("up", "down"):
        layer = getattr(ours, name)
        cls = type(layer)
        fresh = cls.from_linear(copy.deepcopy(layer.base_layer), **layer.adapter_config())
        for k, t in fresh.state_dict().items():
            if not k.startswith("base_layer.") and k not in ("oft_v", "psoft_v", "vector_a", "vector_b"):
                torch.testing.assert_close(t, layer.state_dict()[k], rtol=0, atol=0)


def test_model_level_from_peft_if_present():
    import pyfastpeft as pfp

    if not callable(getattr(pfp, "from_peft", None)):
        pytest.skip("pfp.from_peft is not in this install")
    cfg = peft.OFTConfig(target_modules=["up", "down"], r=0, oft_block_size=8, init_weights=False)
    m = peft.get_peft_model(MLP(), cfg)
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = m(x)
    ours = pfp.from_peft(copy.deepcopy(m))
    assert isinstance(ours.up, OFTLinear) and isinstance(ours.down, OFTLinear)
    with torch.no_grad():
        assert_rel_close("y", ours(x), want)


@pytest.mark.parametrize("neumann", [False, True])
def test_oft_conv2d_converts_to_peft_merged(neumann):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(4, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    cfg = peft.OFTConfig(target_modules=["conv"], r=0, oft_block_size=6, init_weights=False,
                         use_cayley_neumann=neumann)
    m = peft.get_peft_model(Net(), cfg)
    conv = OFTLinear.from_peft(m.base_model.model.conv)
    assert type(conv) is nn.Conv2d and not any(p.requires_grad for p in conv.parameters())
    x = torch.randn(2, 4, 8, 8)
    m.merge_adapter()
    with torch.no_grad():
        assert_rel_close("conv", conv(x), m(x))


def test_unsupported_peft_options_raise():
    m = peft.get_peft_model(MLP(), peft.OFTConfig(target_modules=["up"], r=0, oft_block_size=8, module_dropout=0.1))
    with pytest.raises(ValueError, match="module_dropout"):
        OFTLinear.from_peft(m.base_model.model.up)
    m = peft.get_peft_model(MLP(), peft.PsoftConfig(target_modules=["up"], r=4, psoft_orth=False))
    with pytest.raises(ValueError, match="psoft_orth"):
        PSOFTLinear.from_peft(m.base_model.model.up)
    m = peft.get_peft_model(MLP(), peft.PsoftConfig(target_modules=["up"], r=4, psoft_dropout=0.1))
    with pytest.raises(ValueError, match="psoft_dropout"):
        PSOFTLinear.from_peft(m.base_model.model.up)


def test_merged_peft_layer_raises():
    m = peft.get_peft_model(MLP(), peft.OFTConfig(target_modules=["up"], r=0, oft_block_size=8))
    m.merge_adapter()
    for name in (None, "default"):
        with pytest.raises(ValueError, match="merged"):
            OFTLinear.from_peft(m.base_model.model.up, adapter_name=name)
