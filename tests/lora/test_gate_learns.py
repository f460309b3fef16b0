"""The token-selective gate learns (docs/token_selective.md §2, §6, §7): the scale-free surrogate keeps the
threshold training, the budget ``target_fraction`` holds every step, and the gate finds the tokens that need
the update. Small CPU shapes on the torch backend; the kernels' budget path is checked against the fp64
reference like every other gated case."""
import copy
import math

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.reference import gated_lora_linear_ref
from pyfastpeft.testing import FWD_FACTOR, GRAD_FACTOR, compare, lora_inputs

BACKENDS = pfp.available_backends("gated_lora_linear", "cpu")


# ------------------------------------------------------------------------------------------ the surrogate
def _tau_grad_of_gate_loss(layer, x):
    layer.tau.grad = None
    layer(x)
    layer.gate_loss().backward()
    return float(layer.tau.grad)


@pytest.mark.parametrize("tau", [0.0, 0.25])
def test_gate_loss_moves_tau_when_every_ratio_is_far_above_it(tau):
    """The stall of the former absolute window: a grown adapter puts every ratio far above tau + 0.05."""
    torch.manual_seed(0)
    layer = pfp.nn.GatedLoRALinear.from_linear(nn.Linear(16, 16), r=4, alpha=8, tau_init=tau)
    layer.backend = "torch"
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=3.0)
    x = torch.randn(64, 16)
    layer(x)
    assert float(layer._ratio.min()) > tau + 0.05  # no token inside an absolute window of 0.05
    assert layer.selected_fraction == 1.0
    assert _tau_grad_of_gate_loss(layer, x) < 0  # gate_loss falls when tau rises


def test_surrogate_is_scale_free():
    """Scaling B (every ratio and update) and tau by c: the window's weights shrink by 1/c, the updates grow
    by c, so the task's tau gradient is the same (with an absolute window it would not be)."""
    d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in lora_inputs(40, 24, 32, 4, seed=3).items()}
    gy = torch.randn(40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for c in (1.0, 8.0):
        tau = torch.tensor(0.5 * c, dtype=torch.float64, requires_grad=True)
        y = pfp.gated_lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], c * d["lora_b"], d["scale"], tau,
                                  backend="torch")
        (g,) = torch.autograd.grad(y, tau, gy)
        grads.append(float(g))
    assert grads[0] != 0.0
    assert math.isclose(grads[0], grads[1], rel_tol=1e-9), grads


def test_no_tau_gradient_while_every_ratio_is_zero():
    """B = 0: every ratio is 0, the window is empty, tau waits (raising it would switch the update off)."""
    layer = pfp.nn.GatedLoRALinear.from_linear(nn.Linear(8, 8), r=2, alpha=4)
    x = torch.randn(16, 8)
    assert _tau_grad_of_gate_loss(layer, x) == 0.0
    assert float(layer.gate_loss().detach()) == 1.0


# ------------------------------------------------------------------------------------------------ budget
def _run_budget(d, tau, p, backend, gate_grad):
    x, a, b = (d[k].detach().clone().requires_grad_() for k in ("x", "lora_a", "lora_b"))
    t = torch.tensor(tau, requires_grad=True)
    y, sel, _ = pfp.gated_lora_linear(x, d["weight"], d["bias"], a, b, d["scale"], t, gate_grad=gate_grad,
                                      return_gate=True, backend=backend, target_fraction=p)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    D = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    xr, ar, br = (D[k].requires_grad_() for k in ("x", "lora_a", "lora_b"))
    tr = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    yr, selr, _ = gated_lora_linear_ref(xr, D["weight"], D["bias"], ar, br, D["scale"], tr, gate_grad=gate_grad,
                                        return_gate=True, target_fraction=p)
    got = (y,) + torch.autograd.grad(y, (x, a, b, t), gy.float())
    want = (yr,) + torch.autograd.grad(yr, (xr, ar, br, tr), gy)
    return got, want, sel, selr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_grad", ["threshold", "full"])
@pytest.mark.parametrize("p, tau", [(0.5, 0.0), (0.25, -1.0), (0.3, 10.0)], ids=["p0.5", "p0.25", "tau-above"])
def test_budget_matches_reference(backend, gate_grad, p, tau):
    M, K, N, R = 48, 40, 24, 4
    d = lora_inputs(M, K, N, R, seed=7)
    got, want, sel, selr = _run_budget(d, tau, p, backend, gate_grad)
    assert torch.equal(sel, selr), "selection differs from the reference"
    n = int(sel.sum())
    assert n == (0 if tau == 10.0 else round(p * M)), n  # the budget, or fewer when tau is above t_p
    red = {"y": K + R, "dx": N + R + K, "dA": M + N, "dB": M + R, "dtau": M * (N + R)}
    for i, name in enumerate(red):
        v = compare(got[i], want[i], factor=FWD_FACTOR if i == 0 else GRAD_FACTOR, reduction=red[name])
        assert v.ok, f"{name}: {v}"
    if tau != 10.0:
        assert float(got[4]) != 0.0  # tau trains straight through the budget's floor


@pytest.mark.parametrize("p", [0.5, 0.25])
def test_budget_holds_every_step_and_eval_is_per_token(p, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    teacher, plain = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        teacher[0].weight += 0.3 * torch.randn(32, 2) @ torch.randn(2, 32) / 32 ** 0.5
    pfp.inject(model, "gated_lora", target_modules=["0"], r=4, alpha=8, target_fraction=p, backend="torch")
    layer = model[0]
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    errors = []
    for step in range(25):
        x = torch.randn(100, 32, generator=g)
        loss = nn.functional.mse_loss(model(x), teacher(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step:  # step 0 has B = 0: every ratio ties at 0 and every token is selected (docs §6)
            errors.append(abs(layer.selected_fraction - p))
    assert max(errors) <= 0.02, errors
    assert max(errors) <= 1 / (2 * 100) + 1e-12  # round(p · M) tokens exactly
    # eval: the running threshold, one token's selection independent of the batch
    t_run = float(layer.tau_budget)
    assert t_run > 0
    model.eval()
    x = torch.randn(64, 32, generator=g)
    with torch.no_grad():
        y_all = model(x)
        sel_all = layer._selected.clone()
        y_part = model(x[:7])
    assert torch.equal(layer._selected, sel_all[:7])
    torch.testing.assert_close(y_part, y_all[:7], rtol=1e-6, atol=1e-6)
    # saved and loaded with the adapter
    pfp.save_adapter(model, tmp_path)
    fresh = pfp.load_adapter(plain, tmp_path)
    assert fresh[0].target_fraction == p and float(fresh[0].tau_budget) == t_run
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_all, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot merge"):
        layer.merged()


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, math.nan, True, "half"])
def test_bad_target_fraction(bad):
    d = lora_inputs(8, 8, 8, 2)
    with pytest.raises(ValueError, match="target_fraction must be None or a number in \\(0, 1\\]"):
        pfp.gated_lora_linear(d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0, torch.tensor(0.0),
                              target_fraction=bad)
    with pytest.raises(ValueError, match="target_fraction must be None or a number in \\(0, 1\\]"):
        pfp.nn.GatedLoRALinear.from_linear(nn.Linear(8, 8), r=2, alpha=4, target_fraction=bad)


def test_bad_tau_init_and_budget_without_gate():
    with pytest.raises(ValueError, match="tau_init must be a finite number"):
        pfp.nn.GatedLoRALinear.from_linear(nn.Linear(8, 8), r=2, alpha=4, tau_init=math.inf)
    d = lora_inputs(8, 8, 8, 2)
    with pytest.raises(ValueError, match="target_fraction needs a gate"):
        pfp.gated_lora_linear(d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0, None, target_fraction=0.5)
    with pytest.raises(ValueError, match="tau"):
        pfp.gated_lora_linear(d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0, torch.tensor(math.nan),
                              target_fraction=0.5)


# ------------------------------------------------------------------------------------- evidence: learning
def _regression(lam, steps, seed=0):
    """A 64→64 layer learns a rank-4 change of itself with AdamW (the issue's measurement, shortened)."""
    torch.manual_seed(seed)
    base = nn.Linear(64, 64)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        teacher.weight += 0.3 * torch.randn(64, 4) @ torch.randn(4, 64) / 8
    layer = pfp.nn.GatedLoRALinear.from_linear(copy.deepcopy(base), r=4, alpha=8)
    layer.backend = "torch"  # the tests run Triton interpreted: the kernels are checked above, at small shapes
    lora = [layer.lora_A.weight, layer.lora_B.weight]
    # AdamW moves tau by about its lr per step whatever lambda is: a larger lr for tau reaches the equilibrium
    # (where lambda matters) within the test's steps
    opt = torch.optim.AdamW([{"params": lora}, {"params": [layer.tau], "lr": 5e-2}], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    fr, ls = [], []
    for _ in range(steps):
        x = torch.randn(128, 64, generator=g)
        task = nn.functional.mse_loss(layer(x), teacher(x))
        opt.zero_grad()
        (task + lam * layer.gate_loss()).backward()
        opt.step()
        fr.append(layer.selected_fraction)
        ls.append(task.item())
    return sum(fr[-10:]) / 10, sum(ls[-10:]) / 10


def test_lambda_sweep_selected_fraction_falls_monotonically():
    results = [_regression(lam, 150) for lam in (0.0, 0.05, 0.5, 5.0)]
    fractions = [f for f, _ in results]
    assert fractions[0] >= 0.95, results  # no pressure: (almost) every token keeps the update
    assert all(a > b for a, b in zip(fractions, fractions[1:])), results
    assert fractions[-1] <= 0.05, results
    assert results[0][1] < results[-1][1], results  # skipping tokens costs task loss here: every token needs it


def test_gate_finds_the_tokens_that_need_the_update():
    """A teacher that changes the output of one token type only (tokens carrying a direction e): the gate,
    trained by the task loss alone, selects those tokens (precision and recall against the known subset)."""
    torch.manual_seed(0)
    K = N = 32
    base = nn.Linear(K, N)
    e = nn.functional.normalize(torch.randn(K), dim=0)
    delta = 0.5 * torch.outer(torch.randn(N), e)
    layer = pfp.nn.GatedLoRALinear.from_linear(copy.deepcopy(base), r=2, alpha=4)
    layer.backend = "torch"
    opt = torch.optim.AdamW([q for q in layer.parameters() if q.requires_grad], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)

    def batch(M):
        x = torch.randn(M, K, generator=g)
        is_a = torch.rand(M, generator=g) < 0.3
        x = x + 4.0 * is_a[:, None] * e
        with torch.no_grad():
            return x, base(x) + is_a[:, None] * (x @ delta.t()), is_a

    for _ in range(150):
        x, y, _ = batch(256)
        loss = nn.functional.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    x, y, is_a = batch(2048)
    with torch.no_grad():
        layer(x)
    sel = layer._selected
    precision = float((sel & is_a).sum() / sel.sum())
    recall = float((sel & is_a).sum() / is_a.sum())
    assert precision > 0.85 and recall > 0.85, (precision, recall)


def test_from_peft_gated_trains_from_the_first_step():
    """A trained PEFT LoRA adapter turned gated (tau = 0): every ratio is far above any absolute window, yet
    tau gets a gradient at the first step and the selection falls under gate_loss."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"]))
    with torch.no_grad():  # a "trained" adapter: B far from zero
        pm.base_model.model.fc.lora_B["default"].weight.normal_(std=1.0)
    x = torch.randn(128, 32)
    with torch.no_grad():
        want = pm(x)
    model = pfp.from_peft(pm, gated=True)
    layer = model.fc
    layer.backend = "torch"
    assert isinstance(layer, pfp.nn.GatedLoRALinear) and float(layer.tau) == 0.0
    opt = torch.optim.AdamW([layer.tau], lr=0.3)
    fractions = []
    for step in range(30):
        y = model(x)
        if step == 0:
            torch.testing.assert_close(y, want)  # same outputs as PEFT at tau = 0
            assert float(layer._ratio.min()) > 0.05
        opt.zero_grad()
        layer.gate_loss().backward()
        if step == 0:
            assert float(layer.tau.grad) < 0  # trains from the first step
        opt.step()
        fractions.append(layer.selected_fraction)
    assert fractions[0] == 1.0 and fractions[-1] < 0.9, fractions
