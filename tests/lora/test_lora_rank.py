"""The ``vendor`` variant of LoRA's ``triton`` backend (rank-r Triton kernels, then the cuBLAS GEMM adding onto
their output): forward and every gradient vs the fp64 reference, forced chunk splits, declared bytes vs the
interpreter's loads/stores, and how the variant is chosen (pinned, measured with a fake timer, explained)."""
from __future__ import annotations

import os

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.core import backend as B
from pyfastpeft.core import tune
from pyfastpeft.reference import lora_linear_ref
from pyfastpeft.testing import FWD_FACTOR, GRAD_FACTOR, compare, lora_inputs
from tests._lora_cases import CASES, run_and_compare

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="runs the Triton kernels (interpreter or GPU)")
triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ENV = "PYFASTPEFT_TRITON_GEMM"


@pytest.fixture
def vendor(monkeypatch):
    monkeypatch.setenv(ENV, "vendor")


def _rk():
    from pyfastpeft.triton_kernels.lora import lora_rank

    return lora_rank


# ------------------------------------------------------------------------------ public op, vendor pinned
KERNEL_CASES = [c for c in CASES if c.values[0]["dtype"] != torch.float64]


@pytest.mark.parametrize("c", KERNEL_CASES)
def test_vendor_matches_reference(c, vendor):
    for name, v in run_and_compare(c, "triton", device=DEVICE).items():
        assert v.ok, f"vendor {name}: {v}"
    assert "variant 'vendor'" in B.last_choice("lora_linear_fwd")
    assert "variant 'vendor'" in B.last_choice("lora_linear_bwd")


@pytest.mark.parametrize("c", [CASES[0], CASES[4], CASES[8]], ids=lambda c: f"M{c['M']}-lead{c['lead']}-{c['dtype']}")
def test_vendor_dropout_matches_reference(c, vendor):
    for name, v in run_and_compare(c, "triton", dropout_p=0.3, device=DEVICE).items():
        assert v.ok, f"vendor dropout {name}: {v}"


def test_vendor_grad_flags_mode0(vendor):
    """x without grad (dx_mode 0): only dA and dB, against the reference."""
    d = lora_inputs(37, 48, 40, 5)
    a, b = d["lora_a"].requires_grad_(), d["lora_b"].requires_grad_()
    y = pfp.lora_linear(d["x"], d["weight"], d["bias"], a, b, 1.5, backend="triton")
    gy = torch.randn_like(y)
    da, db = torch.autograd.grad(y, (a, b), gy)
    t = {k: v.detach().double() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
    a64, b64 = t["lora_a"].requires_grad_(), t["lora_b"].requires_grad_()
    want = torch.autograd.grad(lora_linear_ref(t["x"], t["weight"], t["bias"], a64, b64, 1.5), (a64, b64),
                               gy.double())
    for name, got, w, red in (("dA", da, want[0], 37 + 40), ("dB", db, want[1], 37 + 5)):
        v = compare(got, w, reduction=red)
        assert v.ok, f"{name}: {v}"


# ------------------------------------------------------------------------------ kernels, forced splits
def _ref(d, dy, scale, mask=None):
    """fp64 reference outputs and gradients (x, A, B) of ``lora_linear_ref``."""
    t = {k: v.detach().double().requires_grad_(k in ("x", "lora_a", "lora_b")) if isinstance(v, torch.Tensor)
         else v for k, v in d.items()}
    y = lora_linear_ref(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scale,
                        None if mask is None else mask.double())
    return (y.detach(),) + torch.autograd.grad(y, (t["x"], t["lora_a"], t["lora_b"]), dy.double())


@pytest.mark.parametrize("splits", [None, (2, 2), (3, 3), (1, 1)], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("R", [1, 5, 16])
@pytest.mark.parametrize("dx_mode", [0, 1, 2])
def test_kernels_forced_splits_fp32(R, dx_mode, splits):
    M, K, N = 37, 48, 40
    rk = _rk()
    d = lora_inputs(M, K, N, R)
    scale = 0.7
    mask = (torch.rand(M, K) > 0.3).float() / 0.7 if dx_mode == 2 else None
    xl = d["x"] if mask is None else d["x"] * mask
    y, u = rk.lora_fwd(d["x"], None if mask is None else xl, d["weight"], d["bias"], d["lora_a"], d["lora_b"], scale)
    dy = torch.randn(M, N)
    dx, dxl, da, db = rk.lora_bwd(dy, xl, u, d["weight"], d["lora_a"], d["lora_b"], scale, dx_mode, splits=splits)
    y64, gx64, ga64, gb64 = _ref(d, dy, scale, mask)
    assert compare(y, y64, reduction=K + R).ok
    assert compare(u, xl.double() @ d["lora_a"].double().T, reduction=K).ok
    assert compare(da, ga64, reduction=M + N).ok, compare(da, ga64, reduction=M + N)
    assert compare(db, gb64, reduction=M + R).ok, compare(db, gb64, reduction=M + R)
    if dx_mode == 0:
        assert dx.shape == dxl.shape == (0,) and dx is not dxl
    elif dx_mode == 1:
        assert dxl.shape == (0,)
        assert compare(dx, gx64, reduction=N + R).ok, compare(dx, gx64, reduction=N + R)
    else:  # dx = dy W apart; the full gradient through the mask is dx + dx_lora * mask
        _, base64, _, _ = _ref(d, dy, scale, torch.zeros(M, K))
        assert compare(dx, base64, reduction=N).ok
        assert compare(dx + dxl * mask, gx64, reduction=N + R).ok


def test_interpreter_default_split_is_more_than_one_chunk_each_way():
    from pyfastpeft.triton_kernels.lora import _lora_rank_cost as rc

    bm, bn = rc.INTERP_CONFIG["dy"][:2]
    mc, nc, rows, cols = rc.split_counts(37, 40, bm, bn, rc.INTERP_SMS, rc.DY_WEIGHTS)
    assert mc > 1 and nc > 1 and rows % bm == 0 and cols % bn == 0
    assert (mc - 1) * rows < 37 <= mc * rows and (nc - 1) * cols < 40 <= nc * cols  # no empty chunk


def test_split_policy_fills_the_gpu_with_small_partials():
    from pyfastpeft.triton_kernels.lora import _lora_rank_cost as rc

    bm, bn = rc.config("16", 16)["dy"][:2]
    for M, N in ((8192, 4096), (8192, 14336), (12608, 768), (100, 64)):
        mc, nc, rows, cols = rc.split_counts(M, N, bm, bn, 132, rc.DY_WEIGHTS)
        blocks = -(-M // bm) * -(-N // bn)
        assert mc * nc >= min(132, blocks)  # one full wave (or every block)
        partial = (mc * N + nc * M) * 16 * 4  # fp32 partials at r = 16
        if N >= 4096:  # Llama: small next to bf16 dy (ViT's narrow N = 768 needs ~11 M chunks: ~25 %)
            assert partial < 0.15 * M * N * 2, (M, N, mc, nc)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernels_rank128_low_precision(dtype):
    M, K, N, R = 20, 48, 40, 128
    rk = _rk()
    d = lora_inputs(M, K, N, R, dtype=dtype)
    y, u = rk.lora_fwd(d["x"], None, d["weight"], d["bias"], d["lora_a"], d["lora_b"], 0.5)
    dy = torch.randn(M, N, dtype=dtype)
    dx, _, da, db = rk.lora_bwd(dy, d["x"], u, d["weight"], d["lora_a"], d["lora_b"], 0.5, 1, splits=(2, 2))
    y64, gx64, ga64, gb64 = _ref(d, dy, 0.5)
    ylo, gxlo, galo, gblo = _lowp_ref(d, dy, 0.5)
    for name, got, want, lo, f in (("y", y, y64, ylo, FWD_FACTOR), ("dx", dx, gx64, gxlo, GRAD_FACTOR),
                                   ("dA", da, ga64, galo, GRAD_FACTOR), ("dB", db, gb64, gblo, GRAD_FACTOR)):
        v = compare(got, want, lo, factor=f)
        assert v.ok, f"{name}: {v}"


def _lowp_ref(d, dy, scale):
    """The reference run in the low dtype (PyTorch's own error at that precision)."""
    t = {k: v.detach().requires_grad_(k in ("x", "lora_a", "lora_b")) if isinstance(v, torch.Tensor) else v
         for k, v in d.items()}
    y = lora_linear_ref(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scale)
    return (y.detach(),) + torch.autograd.grad(y, (t["x"], t["lora_a"], t["lora_b"]), dy)


def test_empty_shapes():
    rk = _rk()
    d = lora_inputs(6, 16, 8, 3)
    # N = 0: y is (M, 0) but u is still x Aᵀ; dB is (0, R) and dA, dx are zeros plus nothing
    y, u = rk.lora_fwd(d["x"], None, d["weight"][:0], None, d["lora_a"], d["lora_b"][:0], 1.0)
    assert y.shape == (6, 0)
    torch.testing.assert_close(u, d["x"] @ d["lora_a"].T)
    dx, dxl, da, db = rk.lora_bwd(torch.randn(6, 0), d["x"], u, d["weight"][:0], d["lora_a"], d["lora_b"][:0], 1.0, 1)
    assert dx.shape == (6, 16) and not dx.any() and db.shape == (0, 3) and not da.any()
    # M = 0: every gradient of the weights is zero
    x0 = d["x"][:0]
    y, u = rk.lora_fwd(x0, None, d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.0)
    assert y.shape == (0, 8) and u.shape == (0, 3)
    for mode in (0, 1, 2):
        dx, dxl, da, db = rk.lora_bwd(torch.randn(0, 8), x0, u, d["weight"], d["lora_a"], d["lora_b"], 1.0, mode)
        assert da.shape == (3, 16) and db.shape == (8, 3) and not da.any() and not db.any()
        assert dx.shape == ((0, 16) if mode else (0,)) and dxl.shape == ((0, 16) if mode == 2 else (0,))


# ------------------------------------------------------------------------------ declared bytes
SHAPES = [(37, 48, 40, 5), (16, 64, 48, 16), (5, 33, 17, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M, K, N, R", SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_rank_fwd_declared_bytes(M, K, N, R, dtype, has_bias):
    from pyfastpeft.tools.triton_trace import trace_memory

    rk = _rk()
    d = lora_inputs(M, K, N, R, dtype=dtype, bias=has_bias)
    with trace_memory() as tr:
        rk.rank_fwd(d["x"], d["lora_a"], d["lora_b"], d["bias"], 2.0, N)
    c = rk.rank_fwd_cost(M, N, K, R, d["x"].element_size(), has_bias=has_bias)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


@pytest.mark.parametrize("splits", [None, (2, 2), (1, 3), (3, 1)], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("dx_mode", [0, 1])
@pytest.mark.parametrize("M, K, N, R", SHAPES)
def test_rank_bwd_declared_bytes(M, K, N, R, dx_mode, splits):
    from pyfastpeft.tools.triton_trace import trace_memory

    rk = _rk()
    d = lora_inputs(M, K, N, R)
    dy, u = torch.randn(M, N), torch.randn(M, R)
    bm, bn = rk.INTERP_CONFIG["dy"][:2]
    sp_dy = rk._split(M, N, bm, bn, dy.device, splits, rk.DY_WEIGHTS)
    with trace_memory() as tr:
        gp, dbp = rk.bwd_dy(dy, u, d["lora_b"], splits)
    c = rk.rank_bwd_dy_cost(M, N, R, 4, split=sp_dy, block_n=bn)
    assert gp.shape[0] == sp_dy[1] and dbp.shape[0] == sp_dy[0]
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
    bm, bk = rk.INTERP_CONFIG["x"][:2]
    sp_x = rk._split(M, K, bm, bk, dy.device, splits, rk.X_WEIGHTS)
    dx = torch.empty(M, K) if dx_mode else None
    with trace_memory() as tr:
        dap = rk.bwd_x(d["x"], gp, 2.0, d["lora_a"], dx, splits)
    c = rk.rank_bwd_x_cost(M, K, R, 4, split=sp_x, g_parts=gp.shape[0], dx=bool(dx_mode))
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
    with trace_memory() as tr:
        db, da = rk._reduce2(dbp, (N, R), 2.0, dap, (R, K), 1.0, torch.float32)
    c = rk.reduce_cost(4, (dbp.shape[0], N, R), (dap.shape[0], R, K))
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
    g = 2.0 * dy.double() @ d["lora_b"].double()
    assert compare(db, 2.0 * dy.double().T @ u.double(), reduction=M).ok
    assert compare(da, g.T @ d["x"].double(), reduction=M + N).ok
    if dx_mode:
        assert compare(dx, g @ d["lora_a"].double(), reduction=N + R).ok


# ------------------------------------------------------------------------------ cost model
def test_declared_costs_put_the_big_gemms_on_cublas(monkeypatch):
    from pyfastpeft.lora.lora_linear import _bwd_cost, _fwd_cost
    from pyfastpeft.tools import perf

    e = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    M, K, N, R = 8192, 4096, 4096, 16
    fwd = _fwd_cost((e(M, K), None, e(N, K), e(N), e(R, K), e(N, R), 2.0), {}, None)
    bwd = _bwd_cost((e(M, N), e(M, K), e(M, R), e(N, K), e(R, K), e(N, R), 2.0, 1), {}, None)
    names = [ln.name for ln in fwd + bwd]
    assert names == ["triton:lora_rank_fwd", "cublas:addmm(C=y)", "triton:lora_rank_bwd_dy", "triton:lora_rank_bwd_x",
                     "triton:lora_rank_reduce(dB,dA)", "cublas:addmm(C=dx)"]
    gemm = fwd[1]
    assert gemm.flops == 2 * M * N * K and gemm.bytes == (M * K + N * K + 2 * M * N) * 2  # C read + y write
    assert not perf.is_ours(gemm) and perf.is_ours(fwd[0])
    # the cuBLAS launches do not depend on our Triton GEMMs' efficiency; the rank-r ones are memory-bound
    for ln in fwd + bwd:
        t_lo, bound = perf.launch_time(ln, triton_efficiency=0.5)
        t_hi, _ = perf.launch_time(ln, triton_efficiency=1.0)
        assert t_lo == t_hi
        assert bound == ("compute" if ln.name.startswith("cublas:") else "memory")
    monkeypatch.setenv(ENV, "fused")  # the fused variant's launches when it is pinned
    fwd = _fwd_cost((e(M, K), None, e(N, K), e(N), e(R, K), e(N, R), 2.0), {}, None)
    assert [ln.name for ln in fwd] == ["triton:lora_fwd"]


# ------------------------------------------------------------------------------ choosing the variant
def test_pinning_and_bad_values(monkeypatch):
    from pyfastpeft.lora import lora_linear as ll

    d = lora_inputs(8, 16, 12, 2)
    args = (d["x"], d["weight"], None, d["lora_a"], d["lora_b"], 1.0)
    for v in ("vendor", "fused"):
        monkeypatch.setenv(ENV, v)
        pfp.lora_linear(*args, backend="triton")
        assert f"variant '{v}' (pinned by {ENV}={v})" in B.last_choice("lora_linear_fwd")
        dec = pfp.explain("lora_linear", *args, backend="triton")
        assert dec.variant == v and f"variant '{v}'" in str(dec)
    monkeypatch.setenv(ENV, "cublas")
    with pytest.raises(ValueError, match=f"{ENV} must be one of vendor, fused, auto"):
        pfp.lora_linear(*args, backend="triton")
    monkeypatch.delenv(ENV)
    assert ll.triton_gemm_setting() == "auto"
    assert ll.triton_variant("lora_linear_fwd", torch.device("cpu"), (), measure=True)[0] == "vendor"
    dec = pfp.explain("lora_linear", *args, backend="triton")
    assert dec.variant == "vendor" and "static default" in dec.variant_how


CUDA = torch.device("cuda")  # only a name here: the fake hooks stand in for the GPU


class FakeTimer:
    def __init__(self, times):
        self.times, self.calls = dict(times), []

    def __call__(self, fn):
        name = fn()
        self.calls.append(name)
        return self.times[name]


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    from pyfastpeft.lora import lora_linear as ll

    monkeypatch.setenv("PYFASTPEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PYFASTPEFT_TUNE", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(tune.hooks, "identity", lambda device: {"gpu": "Fake GPU", "cc": "9.0"})
    monkeypatch.setattr(tune.hooks, "capturing", lambda device: False)
    monkeypatch.setattr(tune.hooks, "measurable_device", lambda device: device.type == "cuda")
    # the variants report their own name instead of running kernels on a GPU
    fakes = {op: {v: (lambda v: lambda *a: v)(v) for v in ll.TRITON_VARIANTS} for op in ll._TRITON_IMPLS}
    monkeypatch.setattr(ll, "_TRITON_IMPLS", fakes)
    tune.clear_memory()
    yield ll
    tune.clear_memory()


@pytest.mark.parametrize("times, want", [(dict(vendor=1.0, fused=2.0), "vendor"), (dict(vendor=2.0, fused=1.0), "fused"),
                                         (dict(vendor=1.0, fused=1.0), "vendor")])
def test_variant_is_measured_once_and_remembered(fake_gpu, monkeypatch, times, want):
    ll = fake_gpu
    timer = FakeTimer(times)
    monkeypatch.setattr(tune.hooks, "timer", timer)
    x = torch.empty(100, 64)
    v, how = ll.triton_variant("lora_linear_fwd", CUDA, (x,), measure=True)
    assert v == want and "measured on Fake GPU" in how and sorted(timer.calls) == ["fused", "vendor"]
    v2, how2 = ll.triton_variant("lora_linear_fwd", CUDA, (torch.empty(120, 64),), measure=True)  # same bucket
    assert v2 == want and len(timer.calls) == 2
    tune.clear_memory()  # another process: the file answers, nothing timed
    v3, how3 = ll.triton_variant("lora_linear_fwd", CUDA, (x,), measure=False)
    assert v3 == want and "measured earlier on Fake GPU" in how3 and len(timer.calls) == 2
    # the op key keeps the variant decision apart from the backend decision of the same op
    assert tune.lookup("lora_linear_fwd", CUDA, (x,), ("vendor", "fused")) is None


def test_variant_static_default_without_measuring(fake_gpu, monkeypatch):
    ll = fake_gpu
    timer = FakeTimer(dict(vendor=2.0, fused=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    x = torch.empty(100, 64)
    v, how = ll.triton_variant("lora_linear_bwd", CUDA, (x,), measure=False)  # explain before the first call
    assert v == "vendor" and "not measured yet" in how
    monkeypatch.setattr(tune.hooks, "capturing", lambda device: True)
    v, how = ll.triton_variant("lora_linear_bwd", CUDA, (x,), measure=True)
    assert v == "vendor" and "static default" in how and timer.calls == []
    monkeypatch.setattr(tune.hooks, "capturing", lambda device: False)
    monkeypatch.setenv("PYFASTPEFT_TUNE", "0")
    v, how = ll.triton_variant("lora_linear_bwd", CUDA, (x,), measure=True)
    assert v == "vendor" and "PYFASTPEFT_TUNE=0" in how and timer.calls == []
    monkeypatch.delenv("PYFASTPEFT_TUNE")
    monkeypatch.setenv(ENV, "fused")  # pinned: never timed
    assert ll.triton_variant("lora_linear_bwd", CUDA, (x,), measure=True)[0] == "fused" and timer.calls == []
