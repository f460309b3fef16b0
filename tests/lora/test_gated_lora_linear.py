"""``pfp.gated_lora_linear`` (TS-PEFT) vs the fp64 reference: outputs, selection and every gradient
(x, A, B, tau) in both gate_grad modes, over the spec's edge cases."""
import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft import BackendUnavailable
from pyfastpeft.reference import gated_lora_linear_ref
from pyfastpeft.testing import FWD_FACTOR, GRAD_FACTOR, compare, lora_inputs

BACKENDS = pfp.available_backends("gated_lora_linear", "cpu")


def _median_tau(d, q=0.5):
    """A tau at the q-quantile of the tokens' ratios: some selected, some not, some inside the window."""
    D = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    _, _, ratio = gated_lora_linear_ref(D["x"], D["weight"], D["bias"], D["lora_a"], D["lora_b"], D["scale"],
                                        torch.tensor(0.0, dtype=torch.float64), return_gate=True)
    r = ratio.flatten().sort().values
    if r.numel() < 2:
        return 0.1
    k = min(max(int(q * r.numel()), 1), r.numel() - 1)
    return float((r[k - 1] + r[k]) / 2)  # between two tokens: no tie that fp32 rounding could flip


def _run(d, tau, backend, *, gate_grad="threshold", gate_width=None, dtype=torch.float32, dropout_p=0.0):
    gate_width = gate_width or 0.05
    t = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    x, a, b = (t[k].detach().requires_grad_() for k in ("x", "lora_a", "lora_b"))
    tau_t = torch.tensor(tau, requires_grad=True)
    torch.manual_seed(7)
    y, sel, ratio = pfp.gated_lora_linear(x, t["weight"], t["bias"], a, b, t["scale"], tau_t, gate_width=gate_width,
                                          gate_grad=gate_grad, dropout_p=dropout_p, return_gate=True,
                                          backend=backend)
    mask = None
    if dropout_p:
        torch.manual_seed(7)
        # same strides as the op's input: dropout draws in memory order, so a non-contiguous x needs a
        # mask of the same layout to replay the same draw
        mask = torch.nn.functional.dropout(torch.ones_like(x.detach().reshape(-1, x.shape[-1])),
                                           dropout_p).reshape(x.shape)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = (y,) + torch.autograd.grad(y, (x, a, b, tau_t), gy.to(y.dtype))

    def ref(dt):
        r = {k: (v.detach().to(dt) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
        xr, ar, br = (r[k].requires_grad_() for k in ("x", "lora_a", "lora_b"))
        tr = torch.tensor(tau, dtype=torch.float64 if dt == torch.float64 else torch.float32, requires_grad=True)
        out, s, rat = gated_lora_linear_ref(xr, r["weight"], r["bias"], ar, br, r["scale"], tr,
                                            gate_width=gate_width, gate_grad=gate_grad,
                                            dropout_mask=None if mask is None else mask.to(dt), return_gate=True)
        return (out,) + torch.autograd.grad(out, (xr, ar, br, tr), gy.to(dt)), s, rat

    want, sel64, ratio64 = ref(torch.float64)
    lo = dtype in (torch.float16, torch.bfloat16)
    want_lo = ref(dtype)[0] if lo else (None,) * 5
    return got, want, want_lo, (sel, ratio), (sel64, ratio64)


def _check(got, want, want_lo, M, K, N, R, dtype=None):
    names = ("y", "dx", "dA", "dB", "dtau")
    red = {"y": K + R, "dx": N + R + K, "dA": M + N, "dB": M + R, "dtau": M * (N + R)}
    for i, name in enumerate(names):
        assert torch.isfinite(got[i]).all(), f"{name} not finite"
        # dtau is fp32 (tau's dtype) but computed from fp16/bf16 activations: judged by their rule
        v = compare(got[i], want[i], want_lo[i], factor=FWD_FACTOR if i == 0 else GRAD_FACTOR, reduction=red[name],
                    as_dtype=dtype if name == "dtau" else None)
        assert v.ok, f"{name}: {v}"


CASES = [
    pytest.param(37, 120, 72, 3, (), True, id="M37-K120-N72-R3"),
    pytest.param(24, 40, 56, 1, (), False, id="M24-R1-nobias"),
    pytest.param(5, 33, 17, 8, (2, 3), True, id="3D-lead2x3"),
    pytest.param(16, 64, 160, 128, (), True, id="R128"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_grad", ["threshold", "full"])
@pytest.mark.parametrize("M, K, N, R, lead, bias", CASES)
def test_gated_matches_reference(M, K, N, R, lead, bias, gate_grad, backend):
    d = lora_inputs(M, K, N, R, bias=bias, lead=lead, seed=M + R)
    tau = _median_tau(d)
    # a wide window so that many tokens receive the surrogate gradient
    got, want, want_lo, (sel, ratio), (sel64, ratio64) = _run(d, tau, backend, gate_grad=gate_grad, gate_width=0.5)
    assert 0 < int(sel64.sum()) < sel64.numel(), "the case must mix selected and skipped tokens"
    assert torch.equal(sel.reshape(sel64.shape), sel64), "selection differs from the reference"
    torch.testing.assert_close(ratio.reshape(ratio64.shape).double(), ratio64.double(), rtol=1e-5, atol=1e-6)
    _check(got, want, want_lo, M * max(1, int(torch.tensor(lead).prod())) if lead else M, K, N, R)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_grad", ["threshold", "full"])
def test_gated_dropout_noncontig(backend, gate_grad):
    d = lora_inputs(24, 40, 32, 4, seed=5)
    d["x"] = d["x"].t().contiguous().t()
    got, want, want_lo, _, _ = _run(d, _median_tau(d), backend, gate_grad=gate_grad, gate_width=0.5,
                                    dropout_p=0.25)
    _check(got, want, want_lo, 24, 40, 32, 4)


def _gap_tau(d):
    """tau in the widest gap between consecutive token ratios (middle half of the tokens), so that fp16/bf16
    rounding of r_i cannot flip a token's selection against the fp64 reference."""
    D = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    _, _, ratio = gated_lora_linear_ref(D["x"], D["weight"], D["bias"], D["lora_a"], D["lora_b"], D["scale"],
                                        torch.tensor(0.0, dtype=torch.float64), return_gate=True)
    r = ratio.sort().values
    lo, hi = r.numel() // 4, 3 * r.numel() // 4
    k = lo + int((r[lo + 1:hi + 1] - r[lo:hi]).argmax())
    return float((r[k] + r[k + 1]) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_grad", ["threshold", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gated_low_precision(backend, dtype, gate_grad):
    d = lora_inputs(37, 120, 72, 3, seed=11)
    got, want, want_lo, (sel, _), (sel64, _) = _run(d, _gap_tau(d), backend, dtype=dtype, gate_grad=gate_grad,
                                                    gate_width=0.5)
    assert torch.equal(sel, sel64), "selection differs from the fp64 reference"
    assert got[0].dtype == dtype
    _check(got, want, want_lo, 37, 120, 72, 3, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_token_selected_and_all_selected(backend):
    d = lora_inputs(20, 32, 24, 4, seed=2)
    base = d["x"] @ d["weight"].T + d["bias"]
    y, sel, _ = pfp.gated_lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["scale"],
                                      torch.tensor(1e6), return_gate=True, backend=backend)
    assert not sel.any()
    torch.testing.assert_close(y, base)
    dense = pfp.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["scale"])
    for tau in (0.0, -3.0):  # tau is clamped at 0: every token selected (r_i >= 0 always)
        y, sel, _ = pfp.gated_lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["scale"],
                                          torch.tensor(tau), return_gate=True, backend=backend)
        assert sel.all()
        torch.testing.assert_close(y, dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_at_threshold_selects(backend):
    d = lora_inputs(9, 16, 12, 2, seed=4)
    _, _, ratio = pfp.gated_lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["scale"],
                                        torch.tensor(0.0), return_gate=True, backend=backend)
    tau = ratio[4].clone()  # exactly one token's ratio
    _, sel, _ = pfp.gated_lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["scale"], tau,
                                      return_gate=True, backend=backend)
    assert bool(sel[4]), "r_i == tau must select the token"
    assert torch.equal(sel, ratio >= tau)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    d = lora_inputs(0, 16, 12, 2)
    tau = torch.tensor(0.1, requires_grad=True)
    a = d["lora_a"].requires_grad_()
    y, sel, ratio = pfp.gated_lora_linear(d["x"], d["weight"], d["bias"], a, d["lora_b"], 1.0, tau,
                                          return_gate=True, backend=backend)
    assert y.shape == (0, 12) and sel.shape == (0,) and ratio.shape == (0,)
    y.sum().backward()
    assert float(tau.grad) == 0.0 and torch.count_nonzero(a.grad) == 0


def test_tau_none_is_dense_lora():
    d = lora_inputs(10, 16, 12, 2)
    y, sel, ratio = pfp.gated_lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 2.0, None,
                                          return_gate=True)
    torch.testing.assert_close(y, pfp.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 2.0))
    assert sel.all() and sel.shape == (10,) and ratio.dtype == torch.float32


def test_forced_cuda_on_cpu_tensors_raises():
    """The cuda backend (csrc/lora/gated.cu, GPU tests in tests/lora/test_cuda_ext.py) never runs on CPU."""
    d = lora_inputs(4, 8, 8, 2)
    with pytest.raises(BackendUnavailable, match="cuda"):
        pfp.gated_lora_linear(d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0, torch.tensor(0.1),
                              backend="cuda")


@pytest.mark.parametrize("kw, match", [
    (dict(tau=torch.tensor([0.1, 0.2])), r"tau must be a floating tensor of shape \(\) or \(1,\)"),
    (dict(tau=torch.tensor(1)), r"tau must be a floating tensor of shape \(\) or \(1,\)"),
    (dict(tau=0.1), r"tau must be a floating tensor of shape \(\) or \(1,\)"),
    (dict(gate_width=0.0), "gate_width must be a number > 0"),
    (dict(gate_grad="soft"), "gate_grad must be one of"),
])
def test_bad_gate_arguments(kw, match):
    d = lora_inputs(4, 8, 8, 2)
    args = dict(tau=torch.tensor(0.1), gate_width=0.05, gate_grad="threshold")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        pfp.gated_lora_linear(d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0, args["tau"],
                              gate_width=args["gate_width"], gate_grad=args["gate_grad"])


def test_nothing_of_size_m_by_n_is_saved():
    M, K, N, R = 64, 24, 40, 4
    d = lora_inputs(M, K, N, R)
    a, b = torch.nn.Parameter(d["lora_a"]), torch.nn.Parameter(d["lora_b"])
    w = torch.nn.Parameter(d["weight"], requires_grad=False)
    tau = torch.nn.Parameter(torch.tensor(0.2))
    x = d["x"].requires_grad_()
    for mode in ("threshold", "full"):
        sb = pfp.perf.saved_bytes(lambda x: pfp.gated_lora_linear(x, w, None, a, b, 2.0, tau, gate_grad=mode), x)
        shapes = [tuple(t.shape) for t in sb.tensors]
        assert (M, N) not in shapes, shapes
        # x, u, ratio (fp32), selected (bool) and the threshold the forward used (one fp32 scalar)
        assert sb.total_bytes == 4 * (M * K + M * R + M) + M + 4, shapes


def test_opcheck_primitives():
    d = lora_inputs(12, 24, 16, 4)
    tau = torch.tensor(0.3)
    args = (d["x"], None, d["weight"], d["bias"], d["lora_a"], d["lora_b"], 2.0, tau, "torch")
    torch.library.opcheck(torch.ops.pyfastpeft.gated_lora_linear_fwd.default, args)
    y, u, ratio, sel, thr = torch.ops.pyfastpeft.gated_lora_linear_fwd(*args)
    assert torch.equal(thr, tau)  # max(tau, 0) without a budget
    torch.library.opcheck(torch.ops.pyfastpeft.gated_lora_linear_fwd.default, args + (0.5,))
    for full in (False, True):
        for mode in (0, 1, 2):
            torch.library.opcheck(torch.ops.pyfastpeft.gated_lora_linear_bwd.default,
                                  (torch.randn_like(y), d["x"], d["x"], u, ratio, sel, d["weight"], d["lora_a"],
                                   d["lora_b"], 2.0, thr, 0.5, full, mode, "torch"))
