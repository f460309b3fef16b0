"""``pfp.lora_linear`` / ``pfp.gated_lora_linear`` (and ``LoRALinear`` / ``GatedLoRALinear``) under
``torch.autocast``, with non-finite inputs, and with arguments of other dtypes, on every backend.

* Autocast: each op x backend x {bf16, fp16}, output and every gradient (x, bias, lora_a, lora_b, tau)
  against the fp64 reference with ``pyfastpeft.testing.check_autocast`` (fp32 leaves; the baseline is the
  reference itself under the same autocast, i.e. what PEFT's layers compute there); the output dtype is the
  autocast dtype, as ``nn.Linear``'s; the backward runs under the forward's autocast state.
* Non-finite inputs: a NaN / inf row of x gives the same NaN mask on every backend (and in the reference); a
  NaN ratio is never selected; a non-finite ``tau`` or ``scale`` raises a ValueError naming it.
* Dtypes: a mismatch either works (cast to the compute dtype) or raises a ValueError naming the argument.

CPU backends: ``torch`` and ``triton`` (Triton's interpreter, ``TRITON_INTERPRET=1`` from conftest). The
CUDA checks at the end carry the ``gpu`` (and ``cuda_ext``) marks, as ``test_cuda_ext.py``.
"""
import math

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.lora import twin as lora_twin
from pyfastpeft.lora.gate import gram
from pyfastpeft.reference import gated_lora_linear_ref, lora_linear_ref
from pyfastpeft.testing import check_autocast, randn

OPS = ("lora_linear", "gated_lora_linear")
LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
SCALE = 2.0
GATE_WIDTH = 0.5  # wide: several tokens of each case inside the τ surrogate's window
# τ sits in a gap of the fp64 ratios at least this far (relative) from both neighbours. The ratios of the
# backends under bf16 autocast are measured within 0.75 % (about two bf16 ulps) of fp64, so a 3.1 % margin
# (eight ulps) leaves no token within rounding of τ: every backend and the baseline select as fp64 does.
TAU_MARGIN = 8 * 2.0 ** -8


def _backends(op, device="cpu"):
    return pfp.available_backends(op, device)


OP_BACKENDS = [pytest.param(op, b, id=f"{op}-{b}") for op in OPS for b in _backends(op)]


def test_cpu_backends_include_triton_under_the_interpreter():
    import os

    for op in OPS:
        assert "torch" in _backends(op)
        if os.environ.get("TRITON_INTERPRET") == "1":
            assert "triton" in _backends(op), pfp.format_backend_info()


# ------------------------------------------------------------------------------------------------ cases
# (M, K, N, R, lead, bias, noncontig, seed): odd sizes, a 3-D x without bias, a transposed x with R = 16.
# The seeds give each case a gap in the middle half of its ratios wider than TAU_MARGIN (asserted).
CASES = [
    pytest.param((37, 120, 72, 3, (), True, False, 2), id="37x120->72-r3"),
    pytest.param((12, 48, 40, 4, (2,), False, False, 0), id="3D-2x12x48->40-r4-nobias"),
    pytest.param((33, 64, 48, 16, (), True, True, 0), id="noncontig-33x64->48-r16"),
]


def _leaves(case) -> dict:
    """fp64 CPU leaves (x stored transposed for a non-contiguous case: ``_x`` makes the view)."""
    M, K, N, R, lead, bias, nc, seed = case
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=randn(*((K, M) if nc else (*lead, M, K)), dtype=torch.float64, generator=g),
        weight=randn(N, K, dtype=torch.float64, scale=K ** -0.5, generator=g),
        bias=randn(N, dtype=torch.float64, generator=g) if bias else None,
        lora_a=randn(R, K, dtype=torch.float64, scale=K ** -0.5, generator=g),
        lora_b=randn(N, R, dtype=torch.float64, scale=R ** -0.5, generator=g),
        nc=nc,
    )


def _x(x, nc):
    return x.t() if nc else x


def _ratios64(lv) -> torch.Tensor:
    with torch.no_grad():
        _, _, r = gated_lora_linear_ref(_x(lv["x"], lv["nc"]), lv["weight"], lv["bias"], lv["lora_a"],
                                        lv["lora_b"], SCALE, torch.tensor(0.0, dtype=torch.float64),
                                        return_gate=True)
    return r.flatten()


def _gap_tau(ratio: torch.Tensor) -> tuple[float, float]:
    """τ in the gap of the middle half of the sorted fp64 ratios whose nearer side is relatively widest:
    some tokens selected, some not, none within rounding. Returns ``(tau, relative margin)``."""
    r = ratio.sort().values
    lo, hi = r.numel() // 4, 3 * r.numel() // 4
    best = max(((float((r[k + 1] - r[k]) / (r[k] + r[k + 1])), float((r[k] + r[k + 1]) / 2))
                for k in range(lo, hi)))
    return best[1], best[0]


def _with_tau(lv) -> dict:
    tau, margin = _gap_tau(_ratios64(lv))
    assert margin >= TAU_MARGIN, f"no gap wider than {TAU_MARGIN:.3f} (best {margin:.3f}): choose another seed"
    return dict(lv, tau=torch.tensor(tau, dtype=torch.float64))


def _call(op, backend):
    if op == "lora_linear":
        def call(x, weight, bias, lora_a, lora_b, nc, **_):
            return pfp.lora_linear(_x(x, nc), weight, bias, lora_a, lora_b, SCALE, backend=backend)
    else:
        def call(x, weight, bias, lora_a, lora_b, nc, tau, **_):
            return pfp.gated_lora_linear(_x(x, nc), weight, bias, lora_a, lora_b, SCALE, tau, gate_width=GATE_WIDTH,
                                         backend=backend)
    return call


def _ref(op):
    if op == "lora_linear":
        def ref(x, weight, bias, lora_a, lora_b, nc, **_):
            return lora_linear_ref(_x(x, nc), weight, bias, lora_a, lora_b, SCALE)
    else:
        def ref(x, weight, bias, lora_a, lora_b, nc, tau, **_):
            return gated_lora_linear_ref(_x(x, nc), weight, bias, lora_a, lora_b, SCALE, tau, gate_width=GATE_WIDTH)
    return ref


def _grads(op, lv) -> tuple:
    g = ("x", "lora_a", "lora_b") + (("bias",) if lv["bias"] is not None else ())
    return g + (("tau",) if op == "gated_lora_linear" else ())


def _autocast_verdicts(op, backend, case, dtype, device="cpu"):
    lv = _leaves(case)
    if op == "gated_lora_linear":
        lv = _with_tau(lv)
    return lv, check_autocast(_call(op, backend), _ref(op), lv, _grads(op, lv), dtype, device=device)


# ------------------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("op, backend", OP_BACKENDS)
def test_autocast_matches_reference(op, backend, case, dtype):
    """Output and every gradient within the low-precision rule of the autocast dtype; output in that dtype."""
    lv, v = _autocast_verdicts(op, backend, case, dtype)
    assert v["dtype"] == dtype, f"output dtype {v['dtype']}, nn.Linear gives {dtype} under autocast"
    for name in ("out",) + _grads(op, lv):
        assert v[name].ok, f"{op} {backend} {name}: {v[name]}"


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", _backends("gated_lora_linear"))
def test_autocast_gate_selects_as_fp64(backend, case, dtype):
    """Under autocast the gate (fp32) selects exactly the fp64 reference's tokens (τ far from every ratio),
    and the ratios come back fp32 within a few 16-bit ulps."""
    lv = _with_tau(_leaves(case))
    f = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in lv.items()}
    with torch.autocast("cpu", dtype=dtype):
        y, sel, ratio = pfp.gated_lora_linear(_x(f["x"], f["nc"]), f["weight"], f["bias"], f["lora_a"], f["lora_b"],
                                              SCALE, f["tau"], return_gate=True, backend=backend)
    r64 = _ratios64(lv)
    assert y.dtype == dtype and ratio.dtype == torch.float32 and sel.dtype == torch.bool
    assert torch.equal(sel, r64 >= lv["tau"]), "selection differs from fp64"
    assert 0 < int(sel.sum()) < sel.numel()
    assert float(((ratio.double() - r64).abs() / r64).max()) < TAU_MARGIN / 2


@pytest.mark.parametrize("op, backend", OP_BACKENDS)
def test_autocast_passes_fp64_through_and_casts_any_weight_dtype(op, backend):
    """As nn.Linear: fp64 x is not cast by autocast; an fp16 frozen weight and fp64 adapters are cast to the
    autocast dtype (the dtype check of ``weight`` applies outside autocast only)."""
    lv = _leaves(CASES[0].values[0])
    f = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in lv.items()}
    extra = (torch.tensor(0.5),) if op == "gated_lora_linear" else ()
    fn = getattr(pfp, op)
    a = lv["lora_a"].clone().requires_grad_()  # fp64 adapter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(f["x"], f["weight"].half(), f["bias"], a, f["lora_b"], SCALE, *extra, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float64 and torch.isfinite(a.grad).all()
    if backend == "torch":  # fp64 is a torch-backend dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y64 = fn(lv["x"], lv["weight"], lv["bias"], lv["lora_a"], lv["lora_b"], SCALE,
                     *(t.double() for t in extra), backend=backend)
        assert y64.dtype == torch.float64


@pytest.mark.parametrize("gate_grad", ["threshold", "full"])
@pytest.mark.parametrize("op, backend", OP_BACKENDS)
def test_backward_runs_under_the_forwards_autocast_state(op, backend, gate_grad):
    """Gradients do not depend on where ``backward()`` is called: inside or outside an autocast region, for a
    forward run under autocast and for one run without it (the fp32 pieces of the "full" gate gradient
    stay fp32 either way)."""
    if op == "lora_linear" and gate_grad == "full":
        pytest.skip("gate_grad is a gated-LoRA option")
    d, _ = _poisoned("nan")  # its clean x: small, and τ at the median ratio (tokens in the window)
    lv = dict(d, tau=_ref_out("gated_lora_linear", d, d["x"], torch.tensor(0.0))[2].median().float(), nc=False)
    kw = dict(gate_width=GATE_WIDTH, gate_grad=gate_grad) if op == "gated_lora_linear" else {}

    def grads(forward_autocast, backward_autocast):
        t = {k: (v.detach().float().clone().requires_grad_(k in ("x", "lora_a", "lora_b", "tau", "bias"))
                 if isinstance(v, torch.Tensor) else v) for k, v in lv.items()}
        extra = (t["tau"],) if op == "gated_lora_linear" else ()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_autocast):
            y = getattr(pfp, op)(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE, *extra,
                                 backend=backend, **kw)
        leaves = [t[k] for k in ("x", "lora_a", "lora_b", "bias") + (("tau",) if extra else ())]
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
        with torch.autocast("cpu", dtype=torch.float16, enabled=backward_autocast):
            return y.dtype, torch.autograd.grad(y, leaves, gy)

    for fwd in (True, False):
        dt_out, outside = grads(fwd, False)
        dt_in, inside = grads(fwd, True)
        assert dt_out == dt_in == (torch.bfloat16 if fwd else torch.float32)
        for a, b in zip(outside, inside):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("gated", [False, True], ids=["LoRALinear", "GatedLoRALinear"])
def test_compile_fullgraph_under_autocast(gated):
    """autocast inside a ``torch.compile(fullgraph=True)`` region: no graph break (the autocast state recorded
    for the backward is traced), the same bf16 output and fp32 gradients as eager."""
    torch.manual_seed(0)
    cls = pfp.nn.GatedLoRALinear if gated else pfp.nn.LoRALinear
    layer = cls.from_linear(nn.Linear(16, 12), r=2, alpha=4)
    layer.backend = "torch"
    with torch.no_grad():
        layer.lora_B.weight.normal_()

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    x = torch.randn(5, 16, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y_e, y_c = f(x), compiled(x)
    assert y_e.dtype == y_c.dtype == torch.bfloat16
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    g = torch.randn_like(y_e)
    params = [x, layer.lora_A.weight, layer.lora_B.weight] + ([layer.tau] if gated else [])
    for a, b in zip(torch.autograd.grad(y_e, params, g), torch.autograd.grad(y_c, params, g)):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_gram_is_fp32_under_autocast():
    b = torch.randn(40, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = gram(b)
        g16 = gram(b.bfloat16())
    assert g.dtype == g16.dtype == torch.float32
    torch.testing.assert_close(g, b.T @ b)
    torch.testing.assert_close(g16, b.bfloat16().float().T @ b.bfloat16().float())


# ------------------------------------------------------------------------------------------------ modules
def _module_call(layer):
    def call(x, weight, bias, lora_a, lora_b, tau=None, **_):
        params = {"base_layer.weight": weight, "lora_A.weight": lora_a, "lora_B.weight": lora_b}
        if bias is not None:
            params["base_layer.bias"] = bias
        if tau is not None:
            params["tau"] = tau
        return torch.func.functional_call(layer, params, (x,))
    return call


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("gated", [False, True], ids=["LoRALinear", "GatedLoRALinear"])
@pytest.mark.parametrize("backend", sorted(set(_backends("lora_linear")) & set(_backends("gated_lora_linear"))))
def test_modules_under_autocast_match_reference(backend, gated, dtype):
    """A layer on an fp32 ``nn.Linear`` inside autocast: output in the autocast dtype, output and the adapter
    (and τ) gradients against fp64 with the low-precision rule."""
    case = CASES[1].values[0]  # 3-D x, as in a transformer
    lv = _leaves(case)
    M, K, N, R = case[:4]
    base = nn.Linear(K, N, bias=True)
    lv["bias"] = randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    cls = pfp.nn.GatedLoRALinear if gated else pfp.nn.LoRALinear
    kw = dict(gate_width=GATE_WIDTH) if gated else {}
    layer = cls(base, R, alpha=SCALE * R, backend=backend, **kw)  # scaling = alpha / r = SCALE
    layer.eval()
    grads = ("x", "lora_a", "lora_b")
    if gated:
        lv = _with_tau(lv)
        grads += ("tau",)
    v = check_autocast(_module_call(layer), _ref("gated_lora_linear" if gated else "lora_linear"), lv, grads, dtype)
    assert v["dtype"] == dtype
    for name in ("out",) + grads:
        assert v[name].ok, f"{cls.__name__} {backend} {name}: {v[name]}"


@pytest.mark.parametrize("backend", sorted(set(_backends("lora_linear")) & set(_backends("gated_lora_linear"))))
def test_tiny_training_step_under_autocast(backend):
    """fp32 model, forward and loss under bf16 autocast, backward outside it, AdamW on fp32 parameters: the
    layers return bf16 (as nn.Linear there), every trainable parameter gets a finite fp32 gradient, the
    loss falls, and τ moves with ``gate_loss``."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(24, 32), nn.Linear(32, 8)
    l1 = pfp.nn.LoRALinear.from_linear(lin1, r=4, alpha=8)
    l2 = pfp.nn.GatedLoRALinear.from_linear(lin2, r=4, alpha=8, gate_width=0.5)
    l1.backend = l2.backend = backend
    with torch.no_grad():  # make the adapters and the gate active from the first step
        l1.lora_B.weight.normal_(0, 0.1)
        l2.lora_B.weight.normal_(0, 0.1)
    model = nn.Sequential(l1, nn.GELU(), l2)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 5 and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=3e-2)
    gen = torch.Generator().manual_seed(1)
    w_true = torch.randn(24, 8, generator=gen) * 0.3
    with torch.no_grad():  # τ in the middle of the first batch's ratios: some tokens skipped
        x0 = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(2))
        l1.eval(), l2.eval()
        model(x0)
        l2.tau.fill_(float(l2._ratio.median()))
    losses, taus = [], []
    x = torch.randn(3, 11, 24, generator=gen)  # one batch: the loss of an optimiser on it must fall
    for step in range(10):
        with torch.no_grad():
            target = lin2(torch.nn.functional.gelu(lin1(x))) + x @ w_true
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = l1(x)
            y = l2(torch.nn.functional.gelu(h))
            assert h.dtype == y.dtype == torch.bfloat16
            loss = torch.nn.functional.mse_loss(y.float(), target) + 0.01 * pfp.gate_loss(model)
        opt.zero_grad()
        loss.backward()
        for p in params:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert float(l2.tau.grad) != 0.0
        opt.step()
        losses.append(loss.item())
        taus.append(float(l2.tau.detach()))
        assert 0.0 < l2.selected_fraction <= 1.0
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert taus[-1] != taus[0]


@pytest.mark.parametrize("backend", sorted(set(_backends("lora_linear"))))
def test_module_under_autocast_returns_peft_dtypes(backend):
    """The same adapter in PEFT's ``lora.Linear`` and in ``LoRALinear.from_peft``, both under bf16 autocast:
    the same output dtype and the same gradient dtypes."""
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(16, 12))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    peft_layer = model.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
    ours = pfp.nn.LoRALinear.from_peft(peft_layer)
    ours.backend = backend
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_p, y_o = peft_layer(x), ours(x)
    assert y_o.dtype == y_p.dtype == torch.bfloat16
    torch.testing.assert_close(y_o.float(), y_p.float(), rtol=2e-2, atol=2e-2)
    gp = torch.autograd.grad(y_p.float().sum(), peft_layer.lora_A["default"].weight)[0]
    go = torch.autograd.grad(y_o.float().sum(), ours.lora_A.weight)[0]
    assert go.dtype == gp.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ non-finite x
NAN_ROWS = (3, 11)  # token rows of x that get a non-finite element (columns 5 and 0)


def _poisoned(kind, dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    M, K, N, R = 20, 32, 24, 4
    d = dict(x=randn(M, K, generator=g), weight=randn(N, K, scale=K ** -0.5, generator=g),
             bias=randn(N, generator=g), lora_a=randn(R, K, scale=K ** -0.5, generator=g),
             lora_b=randn(N, R, scale=R ** -0.5, generator=g))
    d = {k: v.to(dtype) for k, v in d.items()}
    bad = d["x"].clone()
    val = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    bad[NAN_ROWS[0], 5] = val
    bad[NAN_ROWS[1], 0] = val
    return d, bad


def _op_out(op, backend, d, x, tau=None):
    if op == "lora_linear":
        return pfp.lora_linear(x, d["weight"], d["bias"], d["lora_a"], d["lora_b"], SCALE, backend=backend), None, None
    return pfp.gated_lora_linear(x, d["weight"], d["bias"], d["lora_a"], d["lora_b"], SCALE, tau, return_gate=True,
                                 backend=backend)


def _ref_out(op, d, x, tau=None):
    D = {k: v.double() for k, v in d.items()}
    if op == "lora_linear":
        return lora_linear_ref(x.double(), D["weight"], D["bias"], D["lora_a"], D["lora_b"], SCALE), None, None
    return gated_lora_linear_ref(x.double(), D["weight"], D["bias"], D["lora_a"], D["lora_b"], SCALE, tau.double(),
                                 return_gate=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("tau_at", [None, 0.0, "median"], ids=["lora", "gated-tau0", "gated-median"])
def test_non_finite_rows_of_x_propagate_alike(tau_at, kind, dtype):
    """A non-finite element in token row i of x: the same NaN mask of y on every backend, row i non-finite
    (all NaN for a NaN), every other row as without it; for gated LoRA row i is not selected and its ratio
    is NaN on every backend (also at τ = 0, where a NaN-dropping max would select it)."""
    op = "lora_linear" if tau_at is None else "gated_lora_linear"
    d, bad = _poisoned(kind, dtype)
    tau = None
    if tau_at is not None:
        r = _ref_out(op, d, d["x"], torch.tensor(0.0))[2]
        tau = torch.tensor(float(r.median()) if tau_at == "median" else tau_at)
    ref, ref_sel, ref_ratio = _ref_out(op, d, bad, tau)
    others = [i for i in range(bad.shape[0]) if i not in NAN_ROWS]
    masks = {}
    for backend in _backends(op):
        y, sel, ratio = _op_out(op, backend, d, bad, tau)
        y_clean, sel_clean, ratio_clean = _op_out(op, backend, d, d["x"], tau)
        masks[backend] = torch.isnan(y)
        assert (~torch.isfinite(y[list(NAN_ROWS)])).any(dim=1).all(), f"{backend}: poisoned row finite"
        assert torch.equal(torch.isfinite(y), torch.isfinite(ref)), f"{backend}: finite mask differs from the reference"
        if kind == "nan":
            assert torch.isnan(y[list(NAN_ROWS)]).all(), f"{backend}: a NaN row of x must give a NaN row of y"
        assert torch.isfinite(y[others]).all(), f"{backend}: a non-finite row leaked into other rows"
        torch.testing.assert_close(y[others], y_clean[others], rtol=0, atol=0)
        if sel is not None:
            assert not sel[list(NAN_ROWS)].any(), f"{backend}: a token with a NaN ratio was selected"
            assert torch.isnan(ratio[list(NAN_ROWS)]).all(), f"{backend}: ratio of a non-finite row not NaN"
            assert torch.equal(sel[others], sel_clean[others]) and torch.equal(ratio[others], ratio_clean[others])
            assert not ref_sel[list(NAN_ROWS)].any() and torch.isnan(ref_ratio[list(NAN_ROWS)]).all()
    first = next(iter(masks.values()))
    for backend, m in masks.items():
        assert torch.equal(m, first), f"NaN mask of {backend} differs from {next(iter(masks))}"
    if kind == "nan" or op == "lora_linear":
        # the reference has the same NaN mask (for an inf, gated LoRA's reference adds 0 · m_i to unselected
        # rows through its straight-through surrogate: NaN where the kernels keep h_i's inf)
        assert torch.equal(torch.isnan(ref), first), "NaN mask differs from the reference"


@pytest.mark.parametrize("op", OPS)
def test_non_finite_x_under_autocast_propagates_alike(op):
    """The same under bf16 autocast (fp32 x with a NaN row)."""
    d, bad = _poisoned("nan")
    tau = torch.tensor(0.0) if op == "gated_lora_linear" else None
    masks = []
    for backend in _backends(op):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, sel, _ = _op_out(op, backend, d, bad, tau)
        assert y.dtype == torch.bfloat16
        masks.append(torch.isnan(y))
        assert masks[-1][list(NAN_ROWS)].all() and not masks[-1].sum() > len(NAN_ROWS) * y.shape[1]
        if sel is not None:
            assert not sel[list(NAN_ROWS)].any() and sel.sum() == y.shape[0] - len(NAN_ROWS)
    assert all(torch.equal(m, masks[0]) for m in masks)


def _gate_drops_nan(u, gram_, hsq, tau, scale):
    """A gate stand-in with fmaxf's NaN rule (the max returns the other operand): a NaN row gets ratio 0."""
    uf = u.float()
    q = scale * scale * ((uf @ gram_) * uf).sum(1)
    ratio = torch.fmax(q, torch.zeros_like(q)).sqrt() / torch.fmax(hsq.sum(0).sqrt(), torch.full_like(q, 1e-6))
    sel = ratio >= torch.fmax(tau, torch.zeros_like(tau))
    rows = torch.nonzero(sel).flatten()
    index = torch.full((u.shape[0],), -7, dtype=torch.int32)
    index[: rows.numel()] = rows.int()
    return ratio, sel, index, torch.tensor([rows.numel()], dtype=torch.int32)


def test_gate_twin_check_rejects_a_gate_that_drops_nan():
    """The first-use check of the CUDA gate kernel (run here with a torch stand-in) fails a kernel that turns
    a NaN ratio into 0 (``fmaxf``), so it falls back instead of selecting NaN tokens."""
    assert lora_twin.check_gated_gate(torch.device("cpu"), op=_gate_drops_nan) == math.inf


# ------------------------------------------------------------------------------------------------ scalars
BAD_NUMBERS = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "0-d tensor"])
@pytest.mark.parametrize("value", BAD_NUMBERS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", [None, "torch", "triton"], ids=["auto", "torch", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_non_finite_scale_raises_naming_it(op, backend, value, as_tensor):
    d, _ = _poisoned("nan")
    scale = torch.tensor(value) if as_tensor else value
    extra = (torch.tensor(0.1),) if op == "gated_lora_linear" else ()
    with pytest.raises(ValueError, match="scale must be a finite real number"):
        getattr(pfp, op)(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], scale, *extra, backend=backend)


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", [None, "torch", "triton"], ids=["auto", "torch", "triton"])
def test_non_finite_tau_raises_naming_it(backend, value):
    d, _ = _poisoned("nan")
    for gate_grad in ("threshold", "full"):
        with pytest.raises(ValueError, match="tau must be finite"):
            pfp.gated_lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], SCALE,
                                  torch.tensor(value, requires_grad=True), gate_grad=gate_grad, backend=backend)


@pytest.mark.parametrize("bad, match", [
    (True, "scale must be a finite real number"),
    ("2.0", "scale must be a finite real number"),
    (torch.tensor([1.0, 2.0]), "scale must be a number or a 0-d tensor"),
    (torch.tensor(True), "scale must be a real number"),
])
def test_bad_scale_kinds_raise_naming_it(bad, match):
    d, _ = _poisoned("nan")
    for fn, extra in ((pfp.lora_linear, ()), (pfp.gated_lora_linear, (torch.tensor(0.1),))):
        with pytest.raises(ValueError, match=match):
            fn(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], bad, *extra)


@pytest.mark.parametrize("op, backend", OP_BACKENDS)
def test_scale_as_0d_tensor_is_a_number(op, backend):
    """A 0-d tensor scale (any floating dtype, with or without grad) gives exactly the Python number's result,
    also under autocast and in a module (``layer.scaling`` as a tensor)."""
    d, _ = _poisoned("nan")
    extra = (torch.tensor(0.5),) if op == "gated_lora_linear" else ()
    fn = getattr(pfp, op)
    want = fn(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.5, *extra, backend=backend)
    for s in (torch.tensor(1.5), torch.tensor(1.5, dtype=torch.float64), torch.tensor(1.5, requires_grad=True),
              torch.tensor([1.5])):
        got = fn(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], s, *extra, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = fn(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], torch.tensor(1.5), *extra, backend=backend)
        b = fn(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.5, *extra, backend=backend)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    layer = pfp.nn.LoRALinear.from_linear(nn.Linear(32, 24), r=2, alpha=3)
    layer.backend = backend if op == "lora_linear" else None
    x = torch.randn(4, 32)
    y_num = layer(x)
    layer.scaling = torch.tensor(layer.scaling)
    torch.testing.assert_close(layer(x), y_num, rtol=0, atol=0)


def test_dropout_p_as_0d_tensor_and_bad_values_name_it():
    """``dropout_p`` takes a number or a 0-d tensor (0 gives exactly the no-dropout result); NaN, a value out
    of [0, 1), a bool or a vector raise ValueError naming it."""
    d, _ = _poisoned("nan")
    args = (d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.5)
    torch.testing.assert_close(pfp.lora_linear(*args, dropout_p=torch.tensor(0.0)), pfp.lora_linear(*args),
                               rtol=0, atol=0)
    for bad in (float("nan"), 1.0, -0.1, True, torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError, match="dropout_p"):
            pfp.lora_linear(*args, dropout_p=bad)


# ------------------------------------------------------------------------------------------------ dtypes
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
ARGS = ("weight", "bias", "lora_a", "lora_b", "tau")


@pytest.mark.parametrize("xname", ["fp32", "bf16"])
@pytest.mark.parametrize("op, backend", OP_BACKENDS)
def test_dtype_mismatch_works_or_names_the_argument(op, backend, xname):
    """Outside autocast, each of weight, bias, lora_a, lora_b, tau in every other floating dtype than x:
    ``weight`` raises a ValueError naming it; the others are cast to x's dtype (τ to fp32 for the gate) and
    give exactly the all-matching result, with gradients in their own dtypes. Never an error from inside a
    kernel or torch op."""
    xdt = DT[xname]
    for arg in ARGS:
        if arg == "tau" and op != "gated_lora_linear":
            continue
        for oname, odt in DT.items():
            if odt == xdt:
                continue
            d, _ = _poisoned("nan", xdt)
            d["tau"] = torch.tensor(0.5)  # fp32, as a module's parameter; 0.5 is exact in every dtype
            usual = d[arg].dtype
            d[arg] = d[arg].to(odt)
            base = dict(d, **{arg: d[arg].to(usual)})  # the same (rounded) values in the usual dtype
            leaves = {k: d[k].detach().requires_grad_(k != "weight") for k in d}
            extra = lambda t: (t["tau"],) if op == "gated_lora_linear" else ()  # noqa: E731
            call = lambda t: getattr(pfp, op)(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],  # noqa: E731
                                               SCALE, *extra(t), backend=backend)
            if arg == "weight":
                with pytest.raises(ValueError, match="weight dtype"):
                    call(leaves)
                continue
            y = call(leaves)
            want = call({k: v.detach().requires_grad_(k != "weight") for k, v in base.items()})
            assert y.dtype == xdt, (arg, oname)
            torch.testing.assert_close(y, want, rtol=0, atol=0, msg=f"{arg} {oname}")
            y.float().sum().backward()
            assert leaves[arg].grad is not None and leaves[arg].grad.dtype == odt, (arg, oname)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("arg", ARGS)
def test_non_floating_arguments_are_named(op, arg):
    if arg == "tau" and op != "gated_lora_linear":
        pytest.skip("lora_linear has no tau")
    d, _ = _poisoned("nan")
    d["tau"] = torch.tensor(0.5)
    d[arg] = d[arg].to(torch.int32)
    extra = (d["tau"],) if op == "gated_lora_linear" else ()
    with pytest.raises(ValueError, match=arg):
        getattr(pfp, op)(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], SCALE, *extra)


# ------------------------------------------------------------------------------------------------ CUDA
GPU_BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.cuda_ext)]


def _need(op, backend):
    if backend not in _backends(op, "cuda"):
        pytest.skip(f"{op}: backend {backend} unavailable on cuda: {pfp.format_backend_info()}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_cuda_autocast_matches_reference(op, backend, case, dtype):
    """On a GPU: every backend (cuBLAS + pyfastpeft._C for ``cuda``, whose Gram BᵀB stays fp32 under autocast)
    inside ``torch.autocast("cuda", dtype)``, output and every gradient against fp64."""
    _need(op, backend)
    lv, v = _autocast_verdicts(op, backend, case, dtype, device="cuda")
    assert v["dtype"] == dtype
    for name in ("out",) + _grads(op, lv):
        assert v[name].ok, f"{op} {backend} {name}: {v[name]}"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("tau_at", [None, 0.0], ids=["lora", "gated-tau0"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_cuda_non_finite_rows_propagate_alike(tau_at, kind, autocast):
    """On a GPU: the NaN masks of y, the selection and the NaN ratios agree across torch, triton and cuda
    (the CUDA gate kernel propagates NaN through its maxima: ``nan_max`` in csrc/lora/gated.cu)."""
    op = "lora_linear" if tau_at is None else "gated_lora_linear"
    d, bad = _poisoned(kind)
    d, bad = {k: v.cuda() for k, v in d.items()}, bad.cuda()
    tau = None if tau_at is None else torch.tensor(tau_at, device="cuda")
    outs = {}
    for backend in _backends(op, "cuda"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            outs[backend] = _op_out(op, backend, d, bad, tau)
    assert len(outs) >= 2, pfp.format_backend_info()
    first = next(iter(outs.values()))
    others = [i for i in range(bad.shape[0]) if i not in NAN_ROWS]
    for backend, (y, sel, ratio) in outs.items():
        assert torch.equal(torch.isnan(y), torch.isnan(first[0])), backend
        assert torch.isfinite(y[others]).all(), backend
        if sel is not None:
            assert not sel[list(NAN_ROWS)].any() and torch.isnan(ratio[list(NAN_ROWS)]).all(), backend
            assert torch.equal(sel, first[1]), backend


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_cuda_dtype_mismatch_and_non_finite_scalars(op, backend):
    """On a GPU: the argument rules of the CPU tests (cast or a ValueError naming the argument; non-finite
    scale / tau rejected before dispatch)."""
    _need(op, backend)
    d, _ = _poisoned("nan")
    d = {k: v.cuda() for k, v in d.items()}
    tau = torch.tensor(0.5, device="cuda")
    extra = (tau,) if op == "gated_lora_linear" else ()
    fn = getattr(pfp, op)
    want = fn(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], SCALE, *extra, backend=backend)
    for arg in ("bias", "lora_a", "lora_b"):
        for odt in (torch.float16, torch.bfloat16, torch.float64):
            e = dict(d, **{arg: d[arg].to(odt)})
            got = fn(e["x"], e["weight"], e["bias"], e["lora_a"], e["lora_b"], SCALE, *extra, backend=backend)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight dtype"):
        fn(d["x"], d["weight"].half(), d["bias"], d["lora_a"], d["lora_b"], SCALE, *extra, backend=backend)
    for bad in BAD_NUMBERS:
        with pytest.raises(ValueError, match="scale must be a finite"):
            fn(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], torch.tensor(bad, device="cuda"), *extra,
               backend=backend)
        if extra:
            with pytest.raises(ValueError, match="tau must be finite"):
                fn(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], SCALE, torch.tensor(bad, device="cuda"),
                   backend=backend)
