"""PSOFT on the LoRA primitives (``y, u = lora_linear_fwd(x, W, bias, A, B' = s·B(R' − I))``, backward with
``A`` frozen): at PSOFT ranks r in {4, 32, 256} (K = N = 272, so r = 256 stays cheap) on every LoRA backend
here (the Triton LoRA kernels under the interpreter take r <= 128; r = 256 runs LoRA's torch path, and a
forced ``triton`` raises), fp32 / fp16 / bf16 and fp64 on torch, exact and Neumann (with and without the eps
rescale), vectors on and off, odd M, 3-D and non-contiguous x: forward and every gradient against the fp64
reference and against PEFT's own ``psoft.Linear``; saved activations no more than LoRA's (``u`` only)."""
import warnings

import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.core.backend import BackendUnavailable
from pyfastpeft.orthogonal.reference import cayley_ref, psoft_linear_ref
from pyfastpeft.testing import FP64_TOL, FWD_FACTOR, GRAD_FACTOR, assert_rel_close, compare, randn

BACKENDS = pfp.available_backends("psoft_linear", "cpu")  # LoRA's backends: PSOFT runs on its primitives
K = N = 272
RANKS = (4, 32, 256)
# (method kwargs, (vector_a, vector_b)): every method meets vectors on and off across the ranks
METHODS = [(dict(method="exact"), (True, True)),
           (dict(method="neumann", terms=5), (False, False)),
           (dict(method="neumann", terms=4, eps=0.5), (True, False))]


def _triton_takes(backend, r, dtype=torch.float32):
    return backend != "triton" or (r <= 128 and dtype != torch.float64)


def _leaves(r, vec, lead, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=randn(*lead, M, K, dtype=torch.float64, generator=g),
        weight=randn(N, K, dtype=torch.float64, scale=K ** -0.5, generator=g),
        bias=randn(N, dtype=torch.float64, generator=g),
        psoft_a=randn(r, K, dtype=torch.float64, scale=K ** -0.5, generator=g),
        psoft_b=randn(N, r, dtype=torch.float64, scale=r ** -0.5, generator=g),
        # ‖Q‖₂ ≈ 0.6 at every r: the Neumann series converges, the eps = 0.5 rescale is hit
        psoft_v=randn(r * (r - 1) // 2, dtype=torch.float64, scale=0.3 * r ** -0.5, generator=g),
        vector_a=(1 + randn(r, dtype=torch.float64, scale=0.1, generator=g)) if vec[0] else None,
        vector_b=(1 + randn(r, dtype=torch.float64, scale=0.1, generator=g)) if vec[1] else None,
    )


def _run(L, fn, dtype, param_dtype, gy, kw, noncontig=False, **extra):
    x = L["x"].to(dtype)
    if noncontig:  # the same values through a transposed (non-contiguous) view
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not x.is_contiguous()
    x.requires_grad_()
    b = L["bias"].to(dtype).requires_grad_()
    leaves = [x, L["psoft_v"].to(param_dtype).requires_grad_()]
    va = None if L["vector_a"] is None else L["vector_a"].to(param_dtype).requires_grad_()
    vb = None if L["vector_b"] is None else L["vector_b"].to(param_dtype).requires_grad_()
    y = fn(x, L["weight"].to(dtype), b, L["psoft_a"].to(dtype), L["psoft_b"].to(dtype), leaves[1], va, vb, 1.5,
           **kw, **extra)
    want = leaves + [t for t in (va, vb) if t is not None] + [b]
    return [y] + list(torch.autograd.grad(y, want, gy.to(y.dtype)))


def _names(vec):
    return ["y", "dx", "dpsoft_v"] + (["dvector_a"] if vec[0] else []) + (["dvector_b"] if vec[1] else []) + ["dbias"]


def _red(M, r):
    return {"y": K + 2 * r, "dx": N + 2 * r, "dpsoft_v": M * r + N, "dvector_a": M * r + N,
            "dvector_b": M * r + N, "dbias": M}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mv", METHODS, ids=lambda m: "-".join(str(v) for v in m[0].values()))
@pytest.mark.parametrize("r", RANKS)
def test_psoft_ranks_vs_reference(backend, mv, r):
    """fp32, odd M, 3-D non-contiguous x: y and every gradient vs the fp64 reference."""
    kw, vec = mv
    lead, M = (2,), 9  # 18 tokens in all
    L = _leaves(r, vec, lead, M)
    gy = randn(*lead, M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if not _triton_takes(backend, r):
        with pytest.raises(BackendUnavailable, match="triton"):
            _run(L, pfp.psoft_linear, torch.float32, torch.float32, gy, kw, backend=backend)
        return
    got = _run(L, pfp.psoft_linear, torch.float32, torch.float32, gy, kw, noncontig=True, backend=backend)
    want = _run(L, psoft_linear_ref, torch.float64, torch.float64, gy, kw)
    red = _red(M * len(lead) * 2, r)
    for name, g, w in zip(_names(vec), got, want):
        v = compare(g, w, factor=FWD_FACTOR if name == "y" else GRAD_FACTOR, reduction=red[name])
        assert v.ok, f"r={r} {name}: {v}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", (4, 32))
def test_psoft_half_inputs(backend, dtype, r):
    """fp16/bf16 x and frozen factors, fp32 adapter parameters: within 2x (y) / 3x (gradients) of plain
    PyTorch's own error at that precision (flash-attention's rule, ``pyfastpeft.testing``)."""
    kw, vec = METHODS[0]
    L = _leaves(r, vec, (), 33)
    gy = randn(33, N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = _run(L, pfp.psoft_linear, dtype, torch.float32, gy, kw, backend=backend)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    want = _run(L, psoft_linear_ref, torch.float64, torch.float64, gy, kw)

    def ref_lo(x, w, bias, a, b, v, va, vb, s, **_):  # R' in fp32 (ours and PEFT's solve), the rest in dtype
        R = cayley_ref(v.reshape(1, -1), a.shape[0], convention="plus")[0]
        R = vb[:, None] * R * va[None, :]
        u = x @ a.t()
        return x @ w.t() + bias + s * ((u @ R.to(x.dtype).t() - u) @ b.t())

    want_lo = _run(L, ref_lo, dtype, torch.float32, gy, kw)
    for i, name in enumerate(_names(vec)):
        v = compare(got[i], want[i], want_lo[i], factor=FWD_FACTOR if i == 0 else GRAD_FACTOR,
                    as_dtype=dtype if name.startswith(("dpsoft", "dvector")) else None)
        assert v.ok, f"{dtype} r={r} {name}: {v}"


@pytest.mark.parametrize("mv", METHODS, ids=lambda m: "-".join(str(v) for v in m[0].values()))
@pytest.mark.parametrize("r", RANKS)
def test_psoft_fp64_torch(mv, r):
    """fp64 everywhere on the torch backend (LoRA's torch path): the fp64 reference's values, to reordering."""
    kw, vec = mv
    L = _leaves(r, vec, (), 17)
    gy = randn(17, N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = _run(L, pfp.psoft_linear, torch.float64, torch.float64, gy, kw, noncontig=True, backend="torch")
    want = _run(L, psoft_linear_ref, torch.float64, torch.float64, gy, kw)
    for name, g, w in zip(_names(vec), got, want):
        assert g.dtype == torch.float64
        err = (g - w).abs().max().item()
        assert torch.allclose(g, w, rtol=FP64_TOL["rtol"] * 100, atol=FP64_TOL["atol"] * 100), (name, err)
    if "triton" in BACKENDS:
        with pytest.raises(BackendUnavailable, match="triton"):
            _run(L, pfp.psoft_linear, torch.float64, torch.float64, gy, kw, backend="triton")


# ------------------------------------------------------------------------------------------------ vs PEFT
peft_cases = [(r, i) for r in RANKS for i in range(len(METHODS))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r,mi", peft_cases, ids=[f"r{r}-{['exact', 'neumann', 'neumann-eps'][i]}"
                                                    for r, i in peft_cases])
def test_psoft_vs_peft(backend, r, mi):
    """PEFT's own ``psoft.Linear`` on the same weights: outputs, dx and the adapter gradients, fp32,
    norm-wise relative 1e-5 (``PEER_REL``)."""
    peft = pytest.importorskip("peft")
    warnings.filterwarnings("ignore")
    kw, vec = METHODS[mi]
    opts = dict(use_cayley_neumann=kw["method"] == "neumann", num_cayley_neumann_terms=kw.get("terms", 5),
                cayley_neumann_eps=kw.get("eps"), psoft_mag_a=vec[0], psoft_mag_b=vec[1])
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    cfg = peft.PsoftConfig(target_modules=["0"], r=r, psoft_alpha=2 * r, init_weights=False, **opts)
    pl = peft.get_peft_model(nn.Sequential(base), cfg).base_model.model[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        R = pl.psoft_R["default"]
        R.weight.copy_(0.3 * r ** -0.5 * torch.randn(R.weight.shape, generator=g))
        for v in ("vector_a", "vector_b"):
            if getattr(R, v) is not None:
                getattr(R, v).add_(0.1 * torch.randn(getattr(R, v).shape, generator=g))
    ours = pfp.nn.PSOFTLinear.from_peft(pl)
    ours.backend = backend
    x = torch.randn(3, 7, K, generator=g)
    gy = torch.randn(3, 7, N, generator=g)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp = pl(xp)
    if not _triton_takes(backend, r):
        with pytest.raises(BackendUnavailable, match="triton"):
            ours(xo)
        return
    yo = ours(xo)
    assert_rel_close("y", yo, yp)
    yp.backward(gy)
    yo.backward(gy)
    assert_rel_close("dx", xo.grad, xp.grad)
    assert_rel_close("psoft_v.grad", ours.psoft_v.grad, R.weight.grad)
    for v in ("vector_a", "vector_b"):
        if getattr(R, v) is not None:
            assert_rel_close(f"{v}.grad", getattr(ours, v).grad, getattr(R, v).grad)
        else:
            assert getattr(ours, v) is None


# ------------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("r", RANKS)
def test_psoft_saves_no_more_than_lora(r):
    """Per token, PSOFT saves exactly u (r values in the compute dtype) and LoRA saves x and u: PSOFT <= LoRA.
    Measured with ``pfp.perf.saved_bytes`` (the autograd graph's saved storages), bf16."""
    L = _leaves(r, (True, True), (), 8)
    w, a, b = (L[k].to(torch.bfloat16) for k in ("weight", "psoft_a", "psoft_b"))
    v = L["psoft_v"].float().requires_grad_()
    va, vb = L["vector_a"].float().requires_grad_(), L["vector_b"].float().requires_grad_()
    la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()

    def per_token(fn):
        s = [pfp.perf.saved_bytes(fn, torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)).total_bytes
             for M in (16, 48)]
        return (s[1] - s[0]) / 32

    psoft = per_token(lambda x: pfp.psoft_linear(x, w, None, a, b, v, va, vb, 1.5, backend="torch"))
    lora = per_token(lambda x: pfp.lora_linear(x, w, None, la, lb, 1.5, backend="torch"))
    assert psoft == r * 2, psoft  # u only, bf16
    assert lora == (K + r) * 2, lora  # x and u
    assert psoft <= lora


def test_explain_shows_the_lora_backend():
    """``pfp.explain("psoft_linear", ...)`` is the LoRA forward primitive's decision at the same shapes."""
    for r in (32, 256):
        L = _leaves(r, (False, False), (), 5)
        args = [L[k].float() for k in ("x", "weight", "bias", "psoft_a", "psoft_b", "psoft_v")]
        dec = pfp.explain("psoft_linear", *args, None, None, 1.5)
        assert dec.op == "lora_linear_fwd"
        assert dec.chosen in BACKENDS
        if "triton" in BACKENDS and r > 128:
            assert dec.chosen != "triton"
            assert any(name == "triton" and "128" in why for name, why in dec.rows), dec.rows


def test_lora_bwd_without_x_lora_matches_full():
    """The LoRA backward with an empty x_lora (A frozen) returns the same dx and dB as the full backward on
    every backend, and an empty dA."""
    g = torch.Generator().manual_seed(0)
    M, r = 13, 8
    x, w = randn(M, K, generator=g), randn(N, K, scale=K ** -0.5, generator=g)
    a, b = randn(r, K, scale=K ** -0.5, generator=g), randn(N, r, generator=g)
    dy, u = randn(M, N, generator=g), x @ a.t()
    for be in BACKENDS:
        full = torch.ops.pyfastpeft.lora_linear_bwd(dy, x, u, w, a, b, 0.7, 1, be)
        for mode in (0, 1):
            part = torch.ops.pyfastpeft.lora_linear_bwd(dy, torch.empty(0), u, w, a, b, 0.7, mode, be)
            assert part[2].shape == (0,) and part[1].shape == (0,)
            torch.testing.assert_close(part[3], full[3], rtol=0, atol=0)
            if mode:
                torch.testing.assert_close(part[0], full[0], rtol=0, atol=0)
            else:
                assert part[0].shape == (0,)
