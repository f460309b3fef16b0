"""The model's occupancy and L2 terms (pfp.perf.occupancy, core/cost.l2_reread) on hand-computed cases, and the
grids the LoRA launches declare."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pyfastpeft.core.cost import Launch, grid_order, l2_reread
from pyfastpeft.tools import perf

SMS = perf.DEVICES["h100"]["sms"]


def test_grid_orders():
    assert list(grid_order(2, 3)) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]  # blockIdx.x fastest
    # _grouped_pid with GROUP_M = 2: two row tiles sweep the columns together, then the next two
    assert list(grid_order(4, 2, group_m=2)) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    assert list(grid_order(3, 2, group_m=2))[-2:] == [(2, 0), (2, 1)]  # a short last group


def test_l2_reread_hand_cases():
    # one program at a time, row by row over 4 column panels of 10 B (rows 1 B): L2 of 25 B holds two column
    # panels, so every row sweep reads all four again: 3 more sweeps x 40 B
    assert l2_reread(4, 4, 1, 10, group_m=1, sms=1, l2_bytes=25) == 120
    assert l2_reread(4, 4, 1, 10, group_m=1, sms=1, l2_bytes=50) == 0  # all of it fits: each panel read once
    assert l2_reread(4, 4, 1, 10, group_m=1, sms=16, l2_bytes=1) == 0  # one wave: shared panels read once
    # one row panel shared by four programs in four waves, L2 too small to keep it next to a column panel:
    # it is read in every wave, three times more than once
    assert l2_reread(1, 4, 10, 10, sms=1, l2_bytes=15) == 30
    assert l2_reread(0, 4, 10, 10) == 0


def test_occupancy_caps_compute_and_bandwidth_by_the_grid():
    mem = Launch("triton:reduce", 10, 3 * 10 ** 9, torch.bfloat16, tensor_core=True)
    full, _ = perf.launch_time(mem)
    assert perf.occupancy(mem) == (1.0, 1.0)
    half = dataclasses.replace(mem, ctas=SMS // 2)
    assert perf.occupancy(half) == (0.5, 1.0)  # half the SMs still pull the whole bandwidth (2 x fair share)
    assert perf.launch_time(half)[0] == full
    few = dataclasses.replace(mem, ctas=12)
    assert perf.occupancy(few) == pytest.approx((12 / SMS, 24 / SMS))
    launch_s = perf.DEVICES["h100"]["launch_s"]
    assert perf.launch_time(few)[0] - launch_s == pytest.approx((full - launch_s) * SMS / 24)
    gemm = Launch("aten.mm", 10 ** 12, 10, torch.bfloat16, tensor_core=True, ctas=SMS // 4)
    assert perf.launch_time(gemm, triton_efficiency=1.0)[0] - launch_s == pytest.approx(4e12 / 790e12)
    more = dataclasses.replace(mem, ctas=10 * SMS, reread=3 * 10 ** 9)  # re-read bytes are paid for
    assert perf.launch_time(more)[0] - launch_s == pytest.approx(2 * (full - launch_s))


def _lora_bwd(M, K, N, R):
    import pyfastpeft  # noqa: F401  (registers the op)

    m = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    x, W = m(M, K).requires_grad_(), torch.nn.Parameter(m(N, K), requires_grad=False)
    A, B = torch.nn.Parameter(m(R, K)), torch.nn.Parameter(m(N, R))
    return perf.count(lambda x, A, B: pyfastpeft.lora_linear(x, W, None, A, B, 2.0, backend="triton"), x, A, B,
                      mode="fwd+bwd")


# fwd: 128 x 128 tiles, tiles_per_prog N tiles a program (4 at Llama, 2 at ViT); matmul_tn: the widest grid
# of output tiles (64 at Llama, 12 at ViT-B), times the slices of M its launcher splits the reduction into
@pytest.mark.parametrize("M,K,N,tiles_tn,ctas_fwd", [(8192, 4096, 4096, 64, 64 * 8), (64 * 197, 768, 768, 12, 99 * 3)])
def test_lora_launches_declare_their_grids(M, K, N, tiles_tn, ctas_fwd, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_TRITON_GEMM", "fused")  # the fused variant's kernels and grids
    ops = {o.name: o for o in _lora_bwd(M, K, N, 16).ops}
    for name in ("triton:matmul_tn(dA)", "triton:matmul_tn(dB)"):
        ctas = ops[name].ctas
        assert ctas % tiles_tn == 0 and ctas // tiles_tn > 1 and ctas >= SMS, (name, ctas)  # split over M: full
    assert ops["triton:lora_fwd"].ctas == ctas_fwd
    unsplit = dataclasses.replace(ops["triton:matmul_tn(dA)"], ctas=tiles_tn)
    for op in (ops["triton:matmul_tn(dA)"], ops["triton:matmul_tn(dB)"], unsplit):  # the grid decides the time
        capped, uncapped = perf.launch_time(op)[0], perf.launch_time(dataclasses.replace(op, ctas=None))[0]
        assert capped >= uncapped and (capped > uncapped) == (2 * op.ctas < SMS)
        assert math.isfinite(capped)
