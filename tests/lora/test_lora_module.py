"""``pfp.nn.LoRALinear`` against PEFT's own ``lora.Linear`` (the oracle), merge, repr, state."""
import copy

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.testing import assert_rel_close

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = pfp.available_backends("lora_linear", DEVICE)


class Tiny(nn.Module):
    def __init__(self, K=48, N=40, bias=True):
        super().__init__()
        self.proj = nn.Linear(K, N, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _peft_pair(r=4, alpha=8, rslora=False, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = Tiny(bias=bias)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                           use_rslora=rslora, lora_dropout=dropout))
    layer = model.base_model.model.proj
    with torch.no_grad():  # PEFT inits B = 0; make the update visible
        layer.lora_B["default"].weight.normal_()
    return model, layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_peft_matches_peft_outputs_and_adapter_grads(backend, rslora, bias):
    model, peft_layer = _peft_pair(rslora=rslora, bias=bias)
    ours = pfp.nn.LoRALinear.from_peft(peft_layer)
    ours.backend = backend
    assert ours.scaling == pytest.approx(peft_layer.scaling["default"])
    x = torch.randn(3, 7, 48)
    g = torch.randn(3, 7, 40)
    y_peft = peft_layer(x)
    y_ours = ours(x)
    assert_rel_close("y", y_ours, y_peft)
    a_p, b_p = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    gp = torch.autograd.grad(y_peft, (a_p, b_p), g)
    go = torch.autograd.grad(y_ours, (ours.lora_A.weight, ours.lora_B.weight), g)
    for name, o, p in zip(("dA", "dB"), go, gp):
        assert_rel_close(name, o, p)


def test_from_linear_is_peft_init_and_trains_only_adapter():
    lin = nn.Linear(32, 24)
    layer = pfp.nn.LoRALinear.from_linear(lin, r=4, alpha=16, dropout=0.1)
    assert layer.scaling == 4.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0  # PEFT: B = 0 -> starts equal to the base layer
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    layer.eval()
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), lin(x))
    assert "r=4" in repr(layer) and "scaling=4" in repr(layer) and "backend=auto" in repr(layer)


def test_dropout_only_in_training_and_on_a_input():
    lin = nn.Linear(16, 16)
    layer = pfp.nn.LoRALinear.from_linear(lin, r=2, alpha=2, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(64, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    base = lin(x)  # the base path is never dropped out: the difference is rank-2
    assert torch.linalg.matrix_rank((y1 - base).double(), atol=1e-4) <= 2  # fp32 noise is ~1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_equals_unmerged(dtype):
    lin = nn.Linear(32, 24).to(dtype)
    layer = pfp.nn.LoRALinear.from_linear(lin, r=4, alpha=8).eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    merged = layer.merged()
    assert type(merged) is nn.Linear and merged.weight.dtype == dtype
    x = torch.randn(6, 32, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(merged(x), layer(x), **tol)
    assert torch.equal(layer.base_layer.weight, lin.weight)  # merging did not touch the base layer


def test_state_dict_round_trip():
    a = pfp.nn.LoRALinear.from_linear(nn.Linear(16, 8), r=2, alpha=4)
    b = pfp.nn.LoRALinear.from_linear(nn.Linear(16, 8), r=2, alpha=4)
    with torch.no_grad():
        a.lora_B.weight.normal_()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive int"),
    (dict(r=17), r"r=17 must be <= min\(in_features, out_features\)"),
    (dict(r=2, dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_construction(kwargs, match):
    r = kwargs.pop("r")
    with pytest.raises(ValueError, match=match):
        pfp.nn.LoRALinear.from_linear(nn.Linear(16, 32), r, 1.0, **kwargs)
    with pytest.raises(TypeError, match="nn.Linear"):
        pfp.nn.LoRALinear.from_linear(nn.Conv2d(3, 3, 1), 1, 1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        pfp.nn.LoRALinear(nn.Linear(16, 32), 2, 1.0, backend="fast")
