"""The calibration ``fit_error`` of ``pfp.subtractive.fit`` / ``rank_modules`` is the real relative output difference
``‖Y − X̃F‖ / ‖Y‖`` of the fitted map on the calibration rows (no cancellation: the statistics formula
``‖Y‖² − 2⟨F, C⟩ + ⟨F, GF⟩`` reported ~3e-4, or 0, for modules whose real error is 1e-7), computed in the one pass
over the data; ``rank_modules`` breaks ties by name."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.nn import FilterBlock

sfp = pfp.subtractive
GRAM_BACKENDS = pfp.available_backends("gram_accumulate", "cpu")
REL = 1e-6  # fit_error vs the measured difference (measured: ~1e-8 on these cases)


@pytest.fixture
def solution(monkeypatch):
    """The fp64 map ``(W (N, K), b)`` the fit hands to the last FilterBlock built (before it is rounded to the
    block's dtype): what ``fit_error`` is the error of."""
    got = {}
    orig = FilterBlock.load_solution

    def spy(self, weight, bias=None, *, down=None, up=None, scale=None):
        W = torch.diag(scale) if self.diagonal else (up @ down if self.rank is not None else weight)
        got["W"] = W.detach().double().clone()
        got["b"] = None if bias is None else bias.detach().double().clone()
        return orig(self, weight, bias, down=down, up=up, scale=scale)
    monkeypatch.setattr(FilterBlock, "load_solution", spy)
    return got


def _rows(model, name, data):
    """The target's input and output rows (fp64 copies, taken before anything downstream can change them)."""
    xs, ys = [], []

    def hook(m, a, o):
        x, y = a[0].detach(), o.detach()
        if x.dim() == 4:
            x, y = x.movedim(1, -1), y.movedim(1, -1)
        xs.append(x.reshape(-1, x.shape[-1]).double().clone())
        ys.append(y.reshape(-1, y.shape[-1]).double().clone())
    h = model.get_submodule(name).register_forward_hook(hook)
    with torch.no_grad():
        for b in data:
            model(b)
    h.remove()
    return torch.cat(xs), torch.cat(ys)


def _measured(X, Y, sol) -> float:
    pred = X @ sol["W"].t() + (sol["b"] if sol["b"] is not None else 0)
    return ((Y - pred).norm() / Y.norm()).item()


def _linear_model(K=32, N=24, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Identity(), nn.Linear(K, N, dtype=dtype))


def _data(n_batches, rows, K=32, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, K, generator=g).to(dtype) for _ in range(n_batches)]


@pytest.mark.parametrize("rows, n_batches", [(256, 4), (7, 40), (5, 3)],
                         ids=["big-batches", "small-batches", "fewer-rows-than-2d"])
@pytest.mark.parametrize("ridge", [0.0, 1e-4], ids=["ridge0", "ridge-default"])
def test_exactly_linear_module_fit_error_is_the_real_difference(rows, n_batches, ridge, solution):
    """An nn.Linear on fp32 data: the fitted map reproduces it up to fp32 rounding (real difference ~2e-7 with
    ridge 0, ~1e-4 with the default ridge's shrinkage); fit_error is that difference to 1e-6 relative (before:
    3.5e-4, or 0.0, from the statistics). The held-out pass over the same rows agrees."""
    model = _linear_model()
    data = _data(n_batches, rows)
    X, Y = _rows(model, "1", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sfp.UnderdeterminedFitWarning)  # 15 rows < 33 features
        warnings.simplefilter("ignore", sfp.SingularFitWarning)  # ... so G is singular without ridge
        rep = sfp.fit(model, "1", data, ridge=ridge, heldout=data, backend="torch", progress=False)
    want = _measured(X, Y, solution)
    if ridge == 0 and rows * n_batches > 33:
        assert want < 1e-6  # an exact fit: fp32 rounding of the module's own output
    assert rep[0].fit_error == pytest.approx(want, rel=REL)
    assert rep[0].heldout_error == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("kw", [dict(method="pinv", ridge=0.0), dict(rank=5), dict(diagonal=True),
                                dict(bias=False, ridge=0.0), dict(ridge=1e-2)],
                         ids=["pinv", "rank5", "diagonal", "no-bias", "ridge1e-2"])
@pytest.mark.parametrize("module", ["linear", "mlp", "near-linear"])
def test_fit_error_is_the_real_difference_for_every_solve(module, kw, solution):
    torch.manual_seed(2)
    K = 16
    body = {"linear": nn.Linear(K, K), "mlp": nn.Sequential(nn.Linear(K, 40), nn.GELU(), nn.Linear(40, K)),
            "near-linear": NearLinear(K, 1e-4)}[module]
    model = nn.Sequential(nn.Linear(6, K), nn.Tanh(), body, nn.Linear(K, 3))
    data = [torch.randn(50, 6) for _ in range(4)]
    X, Y = _rows(model, "2", data)
    rep = sfp.fit(model, "2", data, heldout=data, backend="torch", progress=False, **kw)
    want = _measured(X, Y, solution)
    assert rep[0].fit_error == pytest.approx(want, rel=REL)
    assert rep[0].heldout_error == pytest.approx(want, rel=1e-9)


class NearLinear(nn.Module):
    def __init__(self, k, eps):
        super().__init__()
        self.lin, self.eps = nn.Linear(k, k), eps

    def forward(self, x):
        return self.lin(x) + self.eps * torch.tanh(3 * x)


def test_ill_conditioned_inputs_without_ridge(solution):
    """Inputs with a 1e4 spread of scales (G: 1e8) and ridge 0: the solve's fp32 statistics leave F noisy in the
    weak directions; the error of that F is still reported exactly (the rows' fp64 Gram, not the fp32 one)."""
    model = _linear_model(K=24, N=24)
    scales = torch.logspace(0, -4, 24)
    data = [x * scales for x in _data(4, 300, K=24)]
    X, Y = _rows(model, "1", data)
    rep = sfp.fit(model, "1", data, ridge=0.0, backend="torch", progress=False)
    assert rep[0].fit_error == pytest.approx(_measured(X, Y, solution), rel=REL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=lambda d: str(d)[6:])
def test_other_activation_dtypes(dtype, solution):
    model = _linear_model(K=16, N=16, dtype=dtype)
    data = _data(3, 60, K=16, dtype=dtype)
    X, Y = _rows(model, "1", data)
    rep = sfp.fit(model, "1", data, backend="torch", progress=False)
    assert rep[0].fit_error == pytest.approx(_measured(X, Y, solution), rel=REL)


def test_feature_maps_and_in_place_ops_after_the_module(solution):
    """1x1 conv on (B, C, H, W) maps (channels as features), followed by ReLU(inplace=True), which overwrites the
    module's output after the hook: the rows kept until F₀ exists are copies."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.ReLU(inplace=True))
    data = [torch.randn(1, 3, 2, 2) for _ in range(12)]  # 4 rows per batch, fewer than 2·d = 18
    X, Y = _rows(model, "1", data)
    rep = sfp.fit(model, "1", data, ridge=0.0, backend="torch", progress=False)
    assert rep[0].fit_error == pytest.approx(_measured(X, Y, solution), rel=REL)


def test_one_shot_iterator_one_pass(solution):
    """A generator is read once: everything, the fit error included, comes from that one pass."""
    model = _linear_model()
    data = _data(5, 40)
    X, Y = _rows(model, "1", data)
    rep = sfp.fit(model, "1", (b for b in data), ridge=0.0, backend="torch", progress=False)
    assert rep[0].rows == 200
    assert rep[0].fit_error == pytest.approx(_measured(X, Y, solution), rel=REL)


@pytest.mark.skipif("triton" not in GRAM_BACKENDS, reason="the Triton kernel runs on CPU only under TRITON_INTERPRET=1")
def test_triton_accumulation(solution):
    model = _linear_model(K=16, N=16)
    data = _data(3, 40, K=16)
    X, Y = _rows(model, "1", data)
    rep = sfp.fit(model, "1", data, ridge=0.0, backend="triton", progress=False)
    assert rep[0].fit_error == pytest.approx(_measured(X, Y, solution), rel=REL)


# ------------------------------------------------------------------------------------------ rank_modules
class Branches(nn.Module):
    """Modules fed the same input; ``twin_a`` and ``twin_b`` are identical (equal statistics, equal errors)."""

    def __init__(self, k=16):
        super().__init__()
        torch.manual_seed(4)
        self.pre = nn.Linear(6, k)
        self.twin_b = nn.Linear(k, k)
        self.twin_a = nn.Linear(k, k)
        self.twin_a.load_state_dict(self.twin_b.state_dict())
        self.near_3e5 = NearLinear(k, 3e-5)
        self.near_1e4 = NearLinear(k, 1e-4)
        self.near_1e5 = NearLinear(k, 1e-5)

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        return self.twin_a(h) + self.twin_b(h) + self.near_3e5(h) + self.near_1e4(h) + self.near_1e5(h)


def test_rank_modules_orders_near_linear_modules_by_their_real_error():
    """Real errors ~1e-6 (exactly linear: what fp32 statistics leave), ~5e-6, ~1.5e-5, ~5e-5: all far below the
    old ~3e-4 floor of the statistics formula, which ordered them by rounding noise. Ties (the two identical
    modules) go by name."""
    model = Branches()
    data = [torch.randn(64, 6) for _ in range(4)]
    names = ["near_1e4", "twin_b", "near_3e5", "twin_a", "near_1e5"]
    with pfp.use_backend("torch"):
        r = sfp.rank_modules(model, data, names, ridge=0.0, heldout=data, progress=False)
    assert [m.name for m in r] == ["twin_a", "twin_b", "near_1e5", "near_3e5", "near_1e4"]
    assert r[0].fit_error == r[1].fit_error and r[0].params_saved == r[1].params_saved
    for m in r:
        assert m.fit_error == pytest.approx(m.heldout_error, rel=REL), m.name


@pytest.mark.parametrize("order", [["twin_b", "twin_a"], ["twin_a", "twin_b"], [r"twin_\w"]])
def test_rank_modules_ties_broken_by_name(order):
    model = Branches()
    data = [torch.randn(64, 6) for _ in range(3)]
    with pfp.use_backend("torch"):
        r = sfp.rank_modules(model, data, order, ridge=0.0, progress=False)
        r_ho = sfp.rank_modules(model, data, order, ridge=0.0, heldout=data, progress=False)
    assert [m.name for m in r] == [m.name for m in r_ho] == ["twin_a", "twin_b"]
    assert r[0].error == r[1].error
