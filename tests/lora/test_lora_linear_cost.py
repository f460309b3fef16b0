"""The declared byte formulas of the LoRA and gated-LoRA Triton launchers equal the bytes their loads/stores
touch; the gated expand's and the selected-rows reductions' traffic scales with the selected rows.

Each launch runs under the Triton interpreter with ``pyfastpeft.tools.triton_trace.trace_memory``, which
records the distinct addresses of every unmasked lane of every ``tl.load`` / ``tl.store``.
fp32 and fp16 only: under the interpreter bf16 kernels write fp32 buffers (see the kernel module).
"""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="traces the Triton interpreter")

triton = pytest.importorskip("triton")

from pyfastpeft.testing import lora_inputs  # noqa: E402
from pyfastpeft.tools.triton_trace import trace_memory  # noqa: E402

SHAPES = [(37, 120, 72, 3), (16, 64, 48, 16), (5, 33, 17, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M, K, N, R", SHAPES)
@pytest.mark.parametrize("has_bias, has_xl", [(True, False), (False, True)])
def test_fwd_declared_bytes(M, K, N, R, dtype, has_bias, has_xl):
    from pyfastpeft.triton_kernels.lora import lora_linear as tk

    d = lora_inputs(M, K, N, R, dtype=dtype, bias=has_bias)
    xl = d["x"] * 0.5 if has_xl else None
    with trace_memory() as tr:
        y, u = tk.lora_fwd(d["x"], xl, d["weight"], d["bias"], d["lora_a"], d["lora_b"], 2.0)
    c = tk.fwd_cost(M, N, K, R, d["x"].element_size(), has_bias=has_bias, has_xl=has_xl)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


@pytest.mark.parametrize("dx_mode", [0, 1, 2])
@pytest.mark.parametrize("M, K, N, R", SHAPES)
def test_bwd_dx_declared_bytes(M, K, N, R, dx_mode):
    from pyfastpeft.triton_kernels.lora import lora_linear as tk

    d = lora_inputs(M, K, N, R)
    dy = torch.randn(M, N)
    with trace_memory() as tr:
        tk.bwd_dx(dy, d["weight"], d["lora_a"], d["lora_b"], 2.0, dx_mode)
    c = tk.bwd_dx_cost(M, N, K, R, 4, dx_mode=dx_mode)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


@pytest.mark.parametrize("M, P, Q", [(37, 3, 120), (64, 72, 16), (5, 17, 1)])
def test_matmul_tn_declared_bytes(M, P, Q):
    from pyfastpeft.triton_kernels.lora import lora_linear as tk

    p, q = torch.randn(M, P), torch.randn(M, Q)
    with trace_memory() as tr:
        c_out = tk.matmul_tn(p, q, 1.5)
    torch.testing.assert_close(c_out, 1.5 * p.T @ q, rtol=1e-5, atol=1e-5)
    c = tk.tn_cost(M, P, Q, 4, split=tk._tn_split(M, P, Q, "fp32", p.device))
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


def test_tn_split_policy():
    from pyfastpeft.triton_kernels.lora import lora_linear as tk
    from pyfastpeft.triton_kernels.lora._lora_linear_cost import tn_cost, tn_split

    # Llama-3-8B on an H100 (132 SMs), 128 x 64 tiles: dA (r=16, K=4096) has 64 tiles, dB (N=4096, r=16) 32;
    # split over M so that every SM gets a program
    assert tn_split(8192, 16, 4096) == 3 and 64 * 3 >= 132
    assert tn_split(8192, 4096, 16) == 5 and 32 * 5 >= 132
    assert tn_split(8192, 4096, 4096) == 1  # enough tiles already
    assert tn_split(300, 16, 4096) == 1  # too few rows to split
    c1, c3 = tn_cost(8192, 16, 4096, 2, split=1), tn_cost(8192, 16, 4096, 2, split=3)
    assert c3["read"] - c1["read"] == c3["write"] - c1["write"] == 3 * 16 * 4096 * 4  # the fp32 partials
    assert tn_cost(8192, 16, 4096, 2) == c3  # the default is the H100 policy
    # the interpreter splits every reduction longer than one BLOCK_M in two (so tests run the partials)
    assert tk._tn_split(37, 3, 120, "fp32", torch.device("cpu")) == 2
    assert tk._tn_split(20, 3, 120, "fp32", torch.device("cpu")) == 1


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_matmul_tn_split_sums_in_order(split, monkeypatch):
    # any split gives the same result (within fp32 summation error) and the declared bytes
    from pyfastpeft.triton_kernels.lora import lora_linear as tk

    monkeypatch.setattr(tk, "_tn_split", lambda *a: split)
    M, P, Q = 70, 17, 40
    p, q = torch.randn(M, P), torch.randn(M, Q)
    with trace_memory() as tr:
        c_out = tk.matmul_tn(p, q, 0.75)
    torch.testing.assert_close(c_out, 0.75 * (p.double().T @ q.double()).float(), rtol=1e-5, atol=1e-5)
    c = tk.tn_cost(M, P, Q, 4, split=split)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


def test_tiles_per_prog_policy():
    from pyfastpeft.triton_kernels.lora._lora_linear_cost import fwd_cost, tiles_per_prog

    # Llama-3-8B projection on an H100: 64 row blocks x 32 column tiles; 4 tiles per program keeps
    # 512 programs (>= 2 per SM) and cuts the recomputed shrink from 32x to 8x per row block.
    assert tiles_per_prog(8192, 4096, 128, 128, sms=132) == 4
    assert tiles_per_prog(64, 4096, 128, 128, sms=132) == 1  # few rows: every tile its own program
    assert tiles_per_prog(10 ** 6, 4096, 128, 128, sms=132) == 8  # capped
    c1 = fwd_cost(8192, 4096, 4096, 16, 2, has_bias=False, has_xl=False, tiles=1)
    c4 = fwd_cost(8192, 4096, 4096, 16, 2, has_bias=False, has_xl=False)
    base = 2 * 8192 * 4096 * 4096
    assert (c1["flops"] - base) / base == pytest.approx(16 / 128 + 16 / 4096)
    assert (c4["flops"] - base) / base == pytest.approx(16 / 512 + 16 / 4096)
    assert c1["read"] == c4["read"] and c1["write"] == c4["write"]


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_matmul_tn_selected_rows_only(frac):
    from pyfastpeft.triton_kernels.lora import lora_linear as tk

    M, P, Q = 37, 3, 120
    p, q = torch.randn(M, P), torch.randn(M, Q)
    sel = torch.zeros(M, dtype=torch.bool)
    sel[torch.randperm(M, generator=torch.Generator().manual_seed(1))[: int(frac * M)]] = True
    with trace_memory() as tr:
        c_out = tk.matmul_tn(p, q, 2.0, selected=sel)
    torch.testing.assert_close(c_out, 2.0 * p[sel].T @ q[sel], rtol=1e-5, atol=1e-5)
    c = tk.tn_cost(M, P, Q, 4, selected=int(sel.sum()), split=tk._tn_split(M, P, Q, "fp32", p.device))
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M, K, N, R", SHAPES)
@pytest.mark.parametrize("has_bias, has_xl", [(True, False), (False, True)])
def test_gated_base_declared_bytes(M, K, N, R, dtype, has_bias, has_xl):
    from pyfastpeft.triton_kernels.lora import gated_lora_linear as gk
    from pyfastpeft.triton_kernels.lora._gated_lora_linear_cost import gated_base_cost

    d = lora_inputs(M, K, N, R, dtype=dtype, bias=has_bias)
    xl = d["x"] * 0.5 if has_xl else None
    with trace_memory() as tr:
        y, u, hsq = gk.gated_base(d["x"], xl, d["weight"], d["bias"], d["lora_a"])
    # the interpreter runs one config, BLOCK_N=32, two tiles per program (see triton_kernels._config)
    c = gated_base_cost(M, N, K, R, d["x"].element_size(), has_bias=has_bias, has_xl=has_xl, block_n=32, tiles=2)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
    h = (d["x"] @ d["weight"].T).float()
    torch.testing.assert_close(hsq.sum(0), h.pow(2).sum(1), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("frac", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("M, N, R", [(37, 72, 3), (64, 48, 16)])
def test_gated_expand_declared_bytes_scale_with_selection(M, N, R, frac):
    from pyfastpeft.triton_kernels.lora import gated_lora_linear as gk
    from pyfastpeft.triton_kernels.lora._gated_lora_linear_cost import gated_expand_cost

    y = torch.randn(M, N)
    u, b = torch.randn(M, R), torch.randn(N, R)
    sel = torch.zeros(M, dtype=torch.bool)
    sel[torch.randperm(M, generator=torch.Generator().manual_seed(0))[: int(frac * M)]] = True
    want = y + 0.5 * sel[:, None] * (u @ b.T)
    index = torch.full((M,), -1, dtype=torch.int32)  # entries past the count are never read
    index[: int(sel.sum())] = torch.nonzero(sel).flatten().int()
    count = sel.sum().int().reshape(1)
    with trace_memory() as tr:
        gk.gated_expand_(y, u, b, index, count, 0.5)
    torch.testing.assert_close(y, want)
    c = gated_expand_cost(M, int(sel.sum()), N, R, 4)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M, R, G, q", [(37, 3, 2, 0.5), (70, 16, 1, 0.0), (50, 40, 3, 1.01)])
def test_gate_declared_bytes_and_stable_compaction(M, R, G, q, dtype):
    """The gate and the one-program compaction: ratio and flags as the spec's formula, ``index[:count]`` the selected rows in
    increasing order (ties at τ select), and declared bytes equal to the interpreter's."""
    from pyfastpeft.triton_kernels.lora import gated_lora_linear as gk
    from pyfastpeft.triton_kernels.lora._gated_lora_linear_cost import gate_cost

    gen = torch.Generator().manual_seed(3)
    u, b = torch.randn(M, R, generator=gen).to(dtype), torch.randn(40, R, generator=gen)
    hsq = torch.rand(G, M, generator=gen) + 0.1
    hsq[:, 5] = 0.0  # ‖h‖ = 0 -> the ε floor
    uw = u.double()
    want = (0.7 * (uw @ b.double().T).norm(dim=1)) / hsq.double().sum(0).sqrt().clamp(min=1e-6)
    # τ at the quantile q: q = 0 selects all (τ at the smallest ratio, a tie), q > 1 selects none
    tau = torch.tensor(float(want.quantile(min(q, 1.0))) * (2.0 if q > 1 else 1.0), dtype=torch.float32)
    with trace_memory() as tr:
        ratio, sel, index, count, thr = gk.gate(u, b, hsq, 0.7, tau)
    torch.testing.assert_close(ratio.double(), want, rtol=1e-5, atol=0)
    assert torch.equal(sel, ratio >= tau.clamp(min=0)) and torch.equal(thr, tau.clamp(min=0))
    n = int(count)
    assert n == int(sel.sum()) and (n == M) == (q == 0.0) and (n == 0) == (q > 1)
    assert torch.equal(index[:n].long(), torch.nonzero(sel).flatten())
    c = gate_cost(M, R, G, n, u.element_size())
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
