"""The declared byte formulas of the filter-atom Triton launchers equal the bytes their loads/stores touch
(``pyfastpeft.tools.triton_trace`` under the interpreter), and the partials are exactly the atom gradient."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="traces the Triton interpreter")

triton = pytest.importorskip("triton")

from pyfastpeft.atoms.torch_impl import atom_grad_conv  # noqa: E402
from pyfastpeft.triton_kernels.atoms import _atoms_cost as cost  # noqa: E402
from pyfastpeft.tools.triton_trace import trace_memory  # noqa: E402


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("co, ci, kh, kw, m", [(7, 5, 3, 3, 4), (6, 1, 7, 7, 9), (3, 4, 3, 2, 1)])
def test_fold_declared_bytes(co, ci, kh, kw, m, per_channel):
    from pyfastpeft.triton_kernels.atoms import atoms as tk

    w, coeff = torch.randn(co, ci, kh, kw), torch.randn(co, ci, m)
    atoms = torch.randn(ci, m, kh, kw) if per_channel else torch.randn(m, kh, kw)
    with trace_memory() as tr:
        out = tk.fold(w, coeff, atoms)
    eq = "oij,ijpq->oipq" if per_channel else "oij,jpq->oipq"
    torch.testing.assert_close(out, w + torch.einsum(eq, coeff, atoms), rtol=1e-5, atol=1e-5)
    c = cost.fold_cost(co, ci, kh * kw, m, 4, per_channel=per_channel)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


def test_fold_linear_declared_bytes():
    from pyfastpeft.triton_kernels.atoms import atoms as tk

    w, coeff, atoms = torch.randn(12, 20), torch.randn(3, 5, 2), torch.randn(2, 4, 4)
    with trace_memory() as tr:
        out = tk.fold_linear(w, coeff, atoms)
    want = w + torch.einsum("abj,jpq->apbq", coeff, atoms).reshape(12, 20)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    c = cost.fold_cost(3, 5, 16, 2, 4)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])


CASES = [  # N, cin, cout, H, W, kh, kw, stride, padding, dilation, groups, m
    (2, 5, 7, 9, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1, 4),
    (2, 3, 5, 9, 8, 3, 3, (2, 2), (0, 0), (1, 1), 1, 9),  # stride 2, no padding: the last row/column unread
    (1, 6, 6, 10, 9, 7, 7, (1, 1), (3, 3), (1, 1), 6, 4),  # depthwise 7x7
    (2, 6, 9, 7, 7, 3, 3, (1, 1), (2, 1), (2, 1), 3, 3),  # groups, dilation
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-fma", "fp16-tensorcore"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"g{c[10]}-k{c[5]}-s{c[7][0]}-m{c[11]}")
def test_atom_grad_declared_bytes_and_partials(case, dtype):
    from pyfastpeft.triton_kernels.atoms import atoms as tk

    N, cin, cout, H, W, kh, kw, s, p, d, g, m = case
    ho = (H + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (W + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    x, dy = torch.randn(N, cin, H, W).to(dtype), torch.randn(N, cout, ho, wo).to(dtype)
    coeff = torch.randn(cout, cin // g, m)
    with trace_memory() as tr:
        part = tk.atom_grad_partials(dy, x, coeff, (kh, kw), s, p, d, g)
    npp = part.shape[0]
    c = cost.atom_grad_bytes(N, cin, H, W, cout, cin // g, kh, kw, ho, wo, m, s, p, d, x.element_size(),
                             programs=npp)
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
    want = atom_grad_conv(dy, x, coeff, (kh, kw), s, p, d, g, shared=False)  # (C_in/g, m, kh, kw), fp32 maths
    got = part.sum(0).reshape(g, cin // g, m, kh, kw).sum(0)
    # fp16: the tensor-core path rounds g to fp16 before the correlation (one rounding, 2^-11 relative)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T, N, K, kc, m", [(13, 16, 24, 4, 5), (20, 130, 70, 2, 3), (9, 64, 128, 16, 9),
                                            (5, 6, 12, 1, 1)])
def test_atom_linear_grad_declared_bytes_and_result(T, N, K, kc, m, dtype):
    from pyfastpeft.triton_kernels.atoms import atoms as tk

    dy, x, coeff = torch.randn(T, N).to(dtype), torch.randn(T, K).to(dtype), torch.randn(N // kc, K // kc, m)
    with trace_memory() as tr:
        part = tk.atom_linear_grad_partials(dy, x, coeff, kc)
    c = cost.linear_grad_cost(T, N, K, kc, m, x.element_size())
    assert (tr.loaded_bytes, tr.stored_bytes) == (c["read"], c["write"])
    dw = dy.double().T @ x.double()
    want = torch.einsum("abj,apbq->jpq", coeff.double(), dw.reshape(N // kc, kc, K // kc, kc))
    torch.testing.assert_close(part.sum(0).double(), want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
