"""Declared bytes of the token-selective LoRA Triton launches equal the bytes their loads/stores touch
(Triton interpreter, ``pyfastpeft.triton_trace``); the expand's traffic scales with the selected rows."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="traces the Triton interpreter")

triton = pytest.importorskip("triton")

from pyfastpeft.testing import lora_inputs  # noqa: E402
from pyfastpeft.triton_trace import trace_memory  # noqa: E402

SHAPES = [(37, 120, 72, 3), (16, 64, 48, 16), (5, 33, 17, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M, K, N, R", SHAPES)
@pytest.mark.parametrize("has_bias, has_xl", [(True, False), (False, True)])
def test_gated_base_declared_bytes(M, K, N, R, dtype, has_bias, has_xl):
    from pyfastpeft.triton_kernels import gated_lora_linear as gk
    from pyfastpeft.triton_kernels._gated_lora_linear_cost import gated_base_cost

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
    from pyfastpeft.triton_kernels import gated_lora_linear as gk
    from pyfastpeft.triton_kernels._gated_lora_linear_cost import gated_expand_cost

    y = torch.randn(M, N)
    u, b = torch.randn(M, R), torch.randn(N, R)
    sel = torch.zeros(M, dtype=torch.bool)
    sel[torch.randperm(M, generator=torch.Generator().manual_seed(0))[: int(frac * M)]] = True
    want = y + 0.5 * sel[:, None] * (u @ b.T)
    with trace_memory() as tr:
        gk.gated_expand_(y, u, b, sel, 0.5)
    torch.testing.assert_close(y, want)
    c = gated_expand_cost(M, int(sel.sum()), N, R, 4)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
