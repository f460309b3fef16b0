"""The Hopper (sm_90) LoRA kernels: TMA tensor descriptors, persistent grid, split-M reductions.

On a GPU they run only on sm_90; here the Triton interpreter executes tensor descriptors, so the tests switch
them on (``_FORCE_TMA``) and compare forward and every gradient with the fp64 reference, at small shapes.
A spy on each Hopper launcher proves the descriptor path ran (or, for tensors a descriptor cannot address,
that the pointer kernels took the call instead). What the compiled kernels do on sm_90a (TMA loads, wgmma,
CTAs per SM) is checked by the compile report, not here.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import pyfastpeft as pfp  # noqa: E402
from tests._lora_cases import case, run_and_compare  # noqa: E402

if "triton" not in pfp.available_backends("lora_linear", "cpu"):
    pytest.skip("the triton backend does not run here", allow_module_level=True)

from pyfastpeft.triton_kernels.lora import lora_linear as tk  # noqa: E402


@pytest.fixture
def hopper(monkeypatch):
    """Force the Hopper kernels; returns the list of Hopper launchers that ran."""
    monkeypatch.setenv("PYFASTPEFT_TRITON_GEMM", "fused")  # the fused variant is where the Hopper kernels live
    monkeypatch.setattr(tk, "_FORCE_TMA", True)
    ran = []
    for name in ("_lora_fwd_hopper", "_lora_bwd_dx_hopper"):
        real = getattr(tk, name)

        def spy(*a, _real=real, _name=name, **k):
            ran.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(tk, name, spy)
    return ran


# 16-bit, every row stride a multiple of 16 bytes (K, N, R multiples of 8); several column tiles per row
# block (the interpreter config is 16 x 32 x 32 with 2 tiles per work item) and more work items than the
# interpreter's persistent grid (2 programs), so programs loop over items.
ALIGNED = [
    case(37, 64, 80, 8, torch.float16),
    case(37, 64, 80, 16, torch.bfloat16),
    case(20, 48, 40, 32, torch.bfloat16, lead=(2,), bias=False),
    case(9, 32, 72, 64, torch.float16),
]


@pytest.mark.parametrize("c", ALIGNED)
def test_hopper_lora_linear_matches_reference(c, hopper):
    for name, v in run_and_compare(c, "triton").items():
        assert v.ok, f"{name}: {v}"
    assert {"_lora_fwd_hopper", "_lora_bwd_dx_hopper"} <= set(hopper)


def test_hopper_lora_linear_dropout_matches_reference(hopper):
    c = case(24, 64, 48, 8, torch.float16).values[0]
    for name, v in run_and_compare(c, "triton", dropout_p=0.3).items():
        assert v.ok, f"dropout {name}: {v}"
    assert {"_lora_fwd_hopper", "_lora_bwd_dx_hopper"} <= set(hopper)  # dropout: dx mode 2 (dx, dx_lora apart)


@pytest.mark.parametrize("c", [
    case(37, 120, 72, 3, torch.bfloat16),  # B (N, 3) and u (M, 3): rows of 6 bytes, no descriptor
    case(16, 64, 48, 8, torch.float32),  # fp32 keeps the pointer kernels (IEEE dots)
])
def test_tensors_a_descriptor_cannot_address_take_the_pointer_kernels(c, hopper):
    for name, v in run_and_compare(c, "triton").items():
        assert v.ok, f"{name}: {v}"
    assert hopper == []


def test_misaligned_rows_take_the_pointer_kernel(hopper):
    # x a column slice of a wider buffer: rows 49 elements apart (98 bytes), which no descriptor can address
    from pyfastpeft.reference import lora_linear_ref
    from pyfastpeft.testing import compare

    g = torch.Generator().manual_seed(3)
    M, K, N, R = 21, 48, 40, 8
    x = torch.randn(M, K + 1, generator=g).to(torch.float16)[:, :K]
    w, bias = torch.randn(N, K, generator=g).to(torch.float16), torch.randn(N, generator=g).to(torch.float16)
    a, b = torch.randn(R, K, generator=g).to(torch.float16), torch.randn(N, R, generator=g).to(torch.float16)
    y, u = tk.lora_fwd(x, None, w, bias, a, b, 0.5)
    assert hopper == []
    y64 = lora_linear_ref(*(t.double() for t in (x, w, bias, a, b)), 0.5)
    y16 = lora_linear_ref(x, w, bias, a, b, 0.5)
    assert compare(y, y64, y16, reduction=K + R).ok
    # the same tensors, contiguous, do take the Hopper kernel and agree
    y2, _ = tk.lora_fwd(x.contiguous(), None, w, bias, a, b, 0.5)
    assert hopper == ["_lora_fwd_hopper"]
    assert compare(y2, y64, y16, reduction=K + R).ok


def test_use_tma_conditions():
    x = torch.zeros(8, 16, dtype=torch.bfloat16)
    dev = x.device
    assert not tk._use_tma(torch.bfloat16, dev, x)  # a CPU tensor is no sm_90 device
    assert not tk._hopper(dev)
    assert tk._tma_ok(x) and not tk._tma_ok(x.t()) and not tk._tma_ok(torch.zeros(8, 3, dtype=torch.bfloat16))
    assert not tk._tma_ok(torch.zeros(0, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_hopper_gated_lora_linear_matches_reference(dtype, monkeypatch, hopper):
    # token-selective LoRA: the Hopper forward (h, u, row norms of h) and the Hopper dx with the selection
    from pyfastpeft.testing import lora_inputs
    from pyfastpeft.triton_kernels.lora import gated_lora_linear as gk
    from tests.lora.test_gated_lora_linear import _check, _gap_tau, _run

    real = gk._gated_base_hopper
    monkeypatch.setattr(gk, "_gated_base_hopper", lambda *a, **k: (hopper.append("_gated_base_hopper"), real(*a, **k))[1])
    M, K, N, R = 37, 64, 80, 8
    d = lora_inputs(M, K, N, R, seed=11)
    got, want, want_lo, (sel, _), (sel64, _) = _run(d, _gap_tau(d), "triton", dtype=dtype, gate_width=0.5)
    assert torch.equal(sel, sel64), "selection differs from the fp64 reference"
    assert 0 < int(sel.sum()) < M  # some rows selected, some not
    _check(got, want, want_lo, M, K, N, R, dtype)
    assert {"_gated_base_hopper", "_lora_bwd_dx_hopper"} <= set(hopper)
