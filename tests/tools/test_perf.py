"""Tests of pyfastpeft.tools.perf: exact FLOP/byte/launch counts, saved-activation bytes, the roofline model.

Shapes are small and all expected numbers are computed by hand in the test (fp32 = 4 B, bf16 = 2 B).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfastpeft.tools import perf
from pyfastpeft.tools.perf import Counts, Launch

M, K, N, R = 64, 32, 16, 4


def _ops(counts, phase):
    return [(o.name, o.flops, o.bytes) for o in counts.ops if o.phase == phase]


# --------------------------------------------------------------------------------------------------
# count
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_count_linear_fwd(dtype):
    s = torch.empty((), dtype=dtype).element_size()
    x = torch.randn(M, K, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype)
    c = perf.count(F.linear, x, w, b)
    # one addmm: 2*M*K*N FLOPs; reads x, W, bias, writes y (the t() view is free)
    assert _ops(c, "fwd") == [("aten.addmm", 2 * M * K * N, (M * K + N * K + N + M * N) * s)]
    assert c.launches == 1 and c.bwd.launches == 0
    assert c.ops[0].dtype == dtype and c.ops[0].tensor_core


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_count_linear_fwd_bwd(dtype):
    s = torch.empty((), dtype=dtype).element_size()
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, dtype=dtype, requires_grad=True)
    b = torch.randn(N, dtype=dtype, requires_grad=True)
    c = perf.count(F.linear, x, w, b, mode="fwd+bwd")
    gemm = 2 * M * K * N
    assert _ops(c, "fwd") == [("aten.addmm", gemm, (M * K + N * K + N + M * N) * s)]
    bwd = sorted(_ops(c, "bwd"))
    assert bwd == sorted([
        ("aten.mm", gemm, (M * N + N * K + M * K) * s),  # dX = dY @ W
        ("aten.mm", gemm, (M * N + M * K + N * K) * s),  # dW = dY^T @ X
        ("aten.sum", M * N, (M * N + N) * s),  # db = sum_m dY (a reduction: numel of its input)
    ])
    t = c.totals()
    assert t["fwd"]["launches"] == 1 and t["bwd"]["launches"] == 3 and t["total"]["launches"] == 4
    assert t["total"]["flops"] == 3 * gemm + M * N
    # the same through the backward=True shorthand, and "bwd" keeps only the backward
    assert perf.count(F.linear, x, w, b, backward=True).flops == c.flops
    only_bwd = perf.count(F.linear, x, w, b, mode="bwd")
    assert only_bwd.fwd.launches == 0 and only_bwd.flops == c.bwd.flops


def test_count_frozen_linear_module_has_no_weight_grad_gemm():
    lin = nn.Linear(K, N, bias=False)
    lin.weight.requires_grad_(False)
    x = torch.randn(2, M // 2, K, requires_grad=True)  # 3-D input: matmul folds it to one (M, K) GEMM
    c = perf.count(lin, x, mode="fwd+bwd")
    gemm = 2 * M * K * N
    assert _ops(c, "fwd") == [("aten.mm", gemm, (M * K + N * K + M * N) * 4)]
    # backward: only dX = dY @ W; no dW GEMM because the weight is frozen
    assert _ops(c, "bwd") == [("aten.mm", gemm, (M * N + N * K + M * K) * 4)]
    # the module itself is untouched: still real CPU parameters, no .grad
    assert lin.weight.device.type == "cpu" and lin.weight.grad is None
    assert x.grad is None


def test_count_on_real_tensors_matches_meta():
    x = torch.randn(M, K, requires_grad=True)
    w = nn.Parameter(torch.randn(N, K))
    on_meta = perf.count(F.linear, x, w, backward=True)
    on_cpu = perf.count(F.linear, x, w, backward=True, device=None)
    assert [(o.name, o.phase, o.flops, o.bytes) for o in on_cpu.ops] == \
        [(o.name, o.phase, o.flops, o.bytes) for o in on_meta.ops]
    assert x.grad is None and w.grad is None  # counting runs on fresh leaves: no side effects


def test_count_trainable_module_adds_weight_grad():
    lin = nn.Linear(K, N, bias=False)
    c = perf.count(lin, torch.randn(M, K), backward=True)  # x does not require grad: only dW
    assert [o.name for o in c.bwd.ops] == ["aten.mm"]
    assert c.bwd.flops == 2 * M * K * N


def test_count_pointwise_reduction_views_and_dedup():
    x = torch.randn(8, 16)

    def f(t):
        u = t.view(128).view(16, 8).t()  # views: free, not listed
        return (u * u).sum()  # mul(x, x) reads x once; sum reads 128 elements

    c = perf.count(f, x)
    assert _ops(c, "fwd") == [("aten.mul", 128, 128 * 4 + 128 * 4), ("aten.sum", 128, 128 * 4 + 4)]
    assert [o.kind for o in c.ops] == ["pointwise", "reduction"]


def test_count_broadcast_input_counts_once():
    x, b = torch.randn(M, N), torch.randn(N)
    c = perf.count(torch.add, x, b.expand(M, N))  # stride-0 rows: N elements in memory
    assert _ops(c, "fwd") == [("aten.add", M * N, (M * N + N + M * N) * 4)]


def test_count_lora_composition_meta_no_memory():
    # Llama-size shapes on the meta device: no memory is allocated, counting is instant
    Mb, Kb, Nb, Rb = 8192, 4096, 4096, 16
    x = torch.empty(Mb, Kb, dtype=torch.bfloat16, device="meta", requires_grad=True)

    class LoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(Kb, Nb, bias=False, device="meta", dtype=torch.bfloat16)
            self.base.weight.requires_grad_(False)
            self.A = nn.Parameter(torch.empty(Rb, Kb, device="meta", dtype=torch.bfloat16))
            self.B = nn.Parameter(torch.empty(Nb, Rb, device="meta", dtype=torch.bfloat16))

        def forward(self, t):
            return self.base(t) + (t @ self.A.T) @ self.B.T

    c = perf.count(LoRA(), x, mode="fwd+bwd")
    base = 2 * Mb * Kb * Nb
    lora = 2 * Mb * Kb * Rb + 2 * Mb * Rb * Nb
    assert sum(o.flops for o in c.fwd.ops if o.kind == "matmul") == base + lora
    # backward: dX through the base GEMM, plus 2 GEMMs per LoRA factor (dA, dB) and dX through them
    assert sum(o.flops for o in c.bwd.ops if o.kind == "matmul") == base + 2 * lora


def test_counts_add_and_str():
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    c = perf.count(F.linear, x, w, backward=True)
    both = c + c
    assert both.flops == 2 * c.flops and both.launches == 2 * c.launches
    assert sum([c, c]).bytes == 2 * c.bytes
    text = str(c)
    assert "aten.mm" in text and "TOTAL" in text and "bwd" in text
    assert "fwd" in repr(c)


def test_count_rejects_bad_mode_and_no_grad_outputs():
    with pytest.raises(ValueError, match="mode"):
        perf.count(torch.neg, torch.randn(3), mode="forward")
    with pytest.raises(ValueError, match="requires grad"):
        perf.count(torch.neg, torch.randn(3), backward=True)


# --------------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pfptest::perf_scale2", mutates_args=())
def _scale2(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_scale2.register_fake
def _(x):
    return torch.empty_like(x)


def _scale2_bwd(ctx, g):
    return _scale2(g)


_scale2.register_autograd(_scale2_bwd)


@torch.library.custom_op("pfptest::perf_unregistered", mutates_args=())
def _unregistered(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_unregistered.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.fixture
def scale2_cost():
    def cost(args, kwargs, out):
        x = args[0]
        # one launch reading x and writing out; a second, fake "epilogue" launch to check lists work
        return [Launch("pfptest.scale2", x.numel(), x.numel() * x.element_size() * 2, x.dtype),
                Launch("pfptest.scale2_epilogue", 0, 8, x.dtype)]

    perf.register_cost("pfptest::perf_scale2", cost)
    yield cost
    perf.unregister_cost("pfptest::perf_scale2")


def test_custom_op_uses_registered_cost(scale2_cost):
    x = torch.randn(5, 7, requires_grad=True)
    c = perf.count(lambda t: _scale2(t), x, mode="fwd+bwd")
    assert _ops(c, "fwd") == [("pfptest.scale2", 35, 280), ("pfptest.scale2_epilogue", 0, 8)]
    # backward calls the same custom op on the upstream gradient (contiguous randn_like: 35 elements)
    assert _ops(c, "bwd") == [("pfptest.scale2", 35, 280), ("pfptest.scale2_epilogue", 0, 8)]
    # the fake impl's internal empty_like is not counted; the phase is set by count()
    assert all(o.phase == "bwd" for o in c.bwd.ops)


def test_custom_op_qualname_forms(scale2_cost):
    perf.unregister_cost("pfptest::perf_scale2")
    perf.register_cost("torch.ops.pfptest.perf_scale2.default", scale2_cost)
    assert perf.count(_scale2, torch.randn(4)).launches == 2


def test_unregistered_custom_op_raises_with_its_name():
    with pytest.raises(NotImplementedError, match="pfptest::perf_unregistered"):
        perf.count(_unregistered, torch.randn(4))


# --------------------------------------------------------------------------------------------------
# saved_bytes
# --------------------------------------------------------------------------------------------------


def test_saved_bytes_frozen_linear_saves_no_activation():
    lin = nn.Linear(K, N)
    lin.weight.requires_grad_(False)
    x = torch.randn(M, K, requires_grad=True)
    sb = perf.saved_bytes(lin, x)
    # addmm saves mat2 (= W.t(), a view of the frozen parameter) to compute dX = dY @ W; it does not save
    # x (self) because no gradient of W is needed, and the bias gradient needs nothing saved. W is a
    # parameter, so the activation bytes are exactly 0.
    assert sb.total_bytes == 0
    assert sb.excluded == 1


def test_saved_bytes_trainable_linear_saves_input():
    lin = nn.Linear(K, N)
    x = torch.randn(M, K)  # input without grad: x is still saved, for dW = dY^T @ x
    sb = perf.saved_bytes(lin, x)
    assert sb.total_bytes == M * K * 4
    assert sb.tensors[0].shape == (M, K) and sb.tensors[0].saved_by == ["AddmmBackward0"]


@pytest.mark.parametrize("x_shape", [(M, K), (2, M // 2, K)], ids=["2d", "3d"])
def test_saved_bytes_lora_composition(x_shape):
    W = nn.Parameter(torch.randn(N, K), requires_grad=False)
    A = nn.Parameter(torch.randn(R, K))
    B = nn.Parameter(torch.randn(N, R))
    x = torch.randn(*x_shape, requires_grad=True)

    def lora(t):
        return F.linear(t, W) + (t @ A.T) @ B.T

    sb = perf.saved_bytes(lora, x)
    # saved: x (by x @ A.T, for dA) and h = x @ A.T (by h @ B.T, for dB). W.t(), A.T and B.T are views of
    # parameters and excluded. For 3-D x the saved (M, K) view shares x's storage: counted once.
    assert sb.total_bytes == M * K * 4 + M * R * 4
    assert sorted(t.bytes for t in sb.tensors) == [M * R * 4, M * K * 4]
    assert sb.excluded == 3
    assert sb.per_token(M) == (K + R) * 4
    assert "MmBackward0" in str(sb)


def test_saved_bytes_dedupes_storage():
    x = torch.randn(M, K, requires_grad=True)
    sb = perf.saved_bytes(lambda t: t * t, x)  # mul saves self and other: the same storage twice
    assert sb.total_bytes == M * K * 4
    assert len(sb.tensors) == 1 and sb.tensors[0].times_saved == 2


def test_saved_bytes_custom_function_and_meta():
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return 2 * t

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    x = torch.empty(M, K, device="meta", requires_grad=True)
    sb = perf.saved_bytes(Twice.apply, x)
    assert sb.total_bytes == M * K * 4
    assert sb.tensors[0].saved_by == ["TwiceBackward"]


def test_saved_bytes_excludes_module_buffers():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.randn(K))

        def forward(self, t):
            return t * self.scale  # mul saves both: t (for d scale? no grad) and scale (for dt)

    x = torch.randn(M, K, requires_grad=True)
    sb = perf.saved_bytes(Scaled(), x)
    # MulBackward0 saves `other` (the buffer) to compute dx; it saves `self` only if scale needed grad.
    assert sb.total_bytes == 0 and sb.excluded == 1


# --------------------------------------------------------------------------------------------------
# roofline
# --------------------------------------------------------------------------------------------------


def test_roofline_by_hand():
    d = perf.DEVICES["h100"]
    assert (d["tensor_flops"], d["simt_flops"], d["bandwidth"], d["launch_s"]) == (790e12, 60e12, 3.0e12, 2e-6)
    # a bf16 GEMM of M = 8192, K = N = 4096 on the meta device
    Mb, Kb, Nb = 8192, 4096, 4096
    x = torch.empty(Mb, Kb, dtype=torch.bfloat16, device="meta")
    w = torch.empty(Nb, Kb, dtype=torch.bfloat16, device="meta")
    c = perf.count(F.linear, x, w)
    flops = 2 * Mb * Kb * Nb
    nbytes = (Mb * Kb + Nb * Kb + Mb * Nb) * 2
    rl = perf.roofline(c)
    t = max(flops / 790e12, nbytes / 3.0e12) + 2e-6  # compute-bound: 348 us + 2 us
    assert math.isclose(rl.total_s, t, rel_tol=1e-12)
    assert math.isclose(rl.total_s, 349.89e-6, rel_tol=1e-3)
    assert rl.launches[0][2] == "compute"
    assert "modeled H100 (roofline)" in repr(rl) and "modeled H100 (roofline)" in str(rl)


def test_roofline_dtype_rule_and_phases():
    # fp32 GEMM uses the 60 TFLOP/s peak; a bf16 pointwise op also uses 60 TFLOP/s
    c = Counts([
        Launch("gemm32", 60_000_000, 0, torch.float32, tensor_core=True, phase="fwd"),
        Launch("ew16", 60_000_000, 0, torch.bfloat16, tensor_core=False, phase="bwd"),
        Launch("gemm16", 790_000_000, 0, torch.bfloat16, tensor_core=True, phase="bwd"),
        Launch("copy", 0, 3_000_000, torch.float32, phase="bwd"),
    ])
    rl = perf.roofline(c)
    assert math.isclose(rl.fwd_s, 1e-6 + 2e-6)
    assert math.isclose(rl.bwd_s, (1e-6 + 2e-6) + (1e-6 + 2e-6) + (1e-6 + 2e-6))
    assert math.isclose(rl.total_s, 4 * 3e-6)
    with pytest.raises(KeyError):
        perf.roofline(c, device="a100")


def test_public_access_through_package():
    import pyfastpeft as pfp

    assert pfp.perf.count is perf.count


def test_in_place_gemms_are_counted_as_gemms():
    """``addmm_`` (the base GEMM adding onto its C operand) has a GEMM's FLOPs and runs on tensor cores."""
    m = torch.device("meta")
    y, x, w = (torch.empty(*s, device=m, dtype=torch.bfloat16) for s in ((64, 48), (64, 32), (48, 32)))
    (ln,) = perf.count(lambda y, x: y.addmm_(x, w.t()), y, x).ops
    assert ln.flops == 2 * 64 * 48 * 32 and ln.tensor_core and ln.kind == "matmul"


@pytest.mark.parametrize("bias", [False, True])
def test_lora_torch_path_adds_the_base_gemm_onto_the_rank_r_term(bias):
    """The torch LoRA path writes the rank-r term first and the base GEMM (the only launch with its FLOPs)
    runs last, adding onto it as its C operand: forward ``y``, backward ``dx``. So no memory-bound launch
    re-reads an M x N (M x K) tensor that the base GEMM wrote; modeled on an H100 (bf16, Llama 4096², M 8192,
    r 16) the forward + input gradient is below cuBLAS + a rank-r ``addmm_`` after it (1.28x frozen)."""
    from pyfastpeft.lora import torch_impl

    M, K, N, R = 8192, 4096, 4096, 16
    m = torch.device("meta")
    e = lambda *s: torch.empty(*s, device=m, dtype=torch.bfloat16)  # noqa: E731
    x, W, A, B, dy, u = e(M, K), e(N, K), e(R, K), e(N, R), e(M, N), e(M, R)
    b = e(N) if bias else None
    fwd = perf.count(lambda x: torch_impl.fwd(x, None, W, b, A, B, 2.0), x).ops
    bwd = perf.count(lambda dy: torch_impl.bwd(dy, x, u, W, A, B, 2.0, 1), dy).ops
    for ops in (fwd, bwd):
        big = [i for i, ln in enumerate(ops) if ln.flops == 2 * M * N * K]
        assert len(big) == 1 and "addmm_" in ops[big[0]].name
        assert all(ln.bytes < M * min(N, K) for ln in ops[big[0] + 1:])  # nothing big is touched after it
    frozen = (perf.roofline(perf.count(lambda x: F.linear(x, W, b), x)).time()
              + perf.roofline(perf.count(lambda dy: torch.mm(dy, W), dy)).time())
    ratio = (perf.roofline(Counts(fwd)).time() + perf.roofline(Counts(bwd)).time()) / frozen
    assert ratio < 1.25


def _gemm(name, M=4096, N=4096, K=4096, dtype=torch.bfloat16):
    return Launch(name, 2 * M * N * K, 2 * (M * K + N * K + M * N), dtype, tensor_core=True, kind="matmul")


def test_our_triton_gemms_run_at_the_efficiency_vendor_gemms_at_the_peak(monkeypatch):
    monkeypatch.delenv("PYFASTPEFT_TRITON_EFFICIENCY", raising=False)
    ours, vendor = _gemm("triton:lora_fwd"), _gemm("aten.mm")
    t_vendor, _ = perf.launch_time(vendor)
    for e in (0.65, 0.75, 1.0):
        t_ours, bound = perf.launch_time(ours, triton_efficiency=e)
        assert bound == "compute" and math.isclose(t_ours - 2e-6, (t_vendor - 2e-6) / e, rel_tol=1e-12)
        assert perf.launch_time(vendor, triton_efficiency=e)[0] == t_vendor  # cuBLAS is never scaled
    assert perf.launch_time(ours)[0] == perf.launch_time(ours, triton_efficiency=perf.TRITON_EFFICIENCY)[0]
    # a memory-bound launch of ours (fp32 or not tensor-core) is not scaled
    mem = Launch("triton:gate", 10, 10**9, torch.float32)
    assert perf.launch_time(mem, triton_efficiency=0.5) == perf.launch_time(mem, triton_efficiency=1.0)
    assert "0.75 of cuBLAS" in perf.roofline(Counts([ours])).label


def test_efficiency_from_the_environment(monkeypatch):
    ours = Counts([_gemm("triton:x")])
    monkeypatch.setenv("PYFASTPEFT_TRITON_EFFICIENCY", "0.9")
    assert perf.roofline(ours).time() == perf.roofline(ours, triton_efficiency=0.9).time()
    for bad in ("abc", "0", "-1", "3"):
        monkeypatch.setenv("PYFASTPEFT_TRITON_EFFICIENCY", bad)
        with pytest.raises(ValueError, match="PYFASTPEFT_TRITON_EFFICIENCY"):
            perf.roofline(ours)


def test_break_even():
    ours = Counts([_gemm("triton:fused")])
    vendor_s = perf.roofline(Counts([_gemm("aten.mm")])).time()
    be = perf.break_even(ours, vendor_s * 1.25)
    assert math.isclose(perf.roofline(ours, triton_efficiency=be).time(), vendor_s * 1.25, rel_tol=1e-9)
    assert 0.79 < be < 0.81  # 1 / 1.25 of the rate, less the launch overhead's share
    assert perf.break_even(ours, vendor_s * 0.4) is None  # loses even at twice cuBLAS's rate
    assert perf.break_even(Counts([_gemm("aten.mm")]), vendor_s) == 0.0  # no Triton GEMM: wins at any e
