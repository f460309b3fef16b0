"""fp64 gradcheck of the reference and of the torch fallback's hand-written backward (through the
custom ops and LoRALinearFn), on tiny shapes, in every dx mode."""
import pytest
import torch

from pyfastpeft.lora import torch_impl as fb
from pyfastpeft.lora.lora_linear import LoRALinearFn
from pyfastpeft.reference import lora_linear_ref
from pyfastpeft.testing import FP64_TOL


def _inputs(bias=True):
    g = torch.Generator().manual_seed(3)
    t = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    return t(4, 5), t(3, 5), (t(3) if bias else None), t(2, 5), t(3, 2)


@pytest.mark.parametrize("bias", [True, False])
def test_reference_gradcheck(bias):
    x, w, b, a, bb = _inputs(bias)
    for t in (x, a, bb) + ((b,) if bias else ()):
        t.requires_grad_()
    mask = torch.tensor([[0.0, 2.0, 2.0, 0.0, 2.0]] * 4, dtype=torch.float64)
    f = lambda x, a, bb: lora_linear_ref(x, w, b, a, bb, 1.7, mask)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, a, bb))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_dropout", [False, True], ids=["x", "x_lora"])
@pytest.mark.parametrize("need_x", [True, False], ids=["dx", "no-dx"])
def test_fallback_backward_gradcheck(bias, with_dropout, need_x):
    x, w, b, a, bb = _inputs(bias)
    x.requires_grad_(need_x)
    a.requires_grad_()
    bb.requires_grad_()
    if b is not None:
        b.requires_grad_()
    mask = torch.tensor([[0.0, 2.0, 2.0, 0.0, 2.0]] * 4, dtype=torch.float64)

    def f(x, a, bb, b):
        xl = x * mask if with_dropout else None  # dx_mode 2: the lora part flows back through the mask
        return LoRALinearFn.apply(x, xl, w, b, a, bb, 1.7, "torch")

    args = (x, a, bb, b)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("dx_mode", [0, 1, 2])
def test_fallback_matches_reference_fp64(dx_mode):
    x, w, b, a, bb = _inputs()
    y, u = fb.fwd(x, None, w, b, a, bb, 1.7)
    torch.testing.assert_close(y, lora_linear_ref(x, w, b, a, bb, 1.7), **FP64_TOL)
    torch.testing.assert_close(u, x @ a.T, **FP64_TOL)
    dy = torch.randn_like(y)
    dx, dxl, da, db = fb.bwd(dy, x, u, w, a, bb, 1.7, dx_mode)
    xr, ar, br = (t.clone().requires_grad_() for t in (x, a, bb))
    gx, ga, gb = torch.autograd.grad(lora_linear_ref(xr, w, b, ar, br, 1.7), (xr, ar, br), dy)
    torch.testing.assert_close(da, ga, **FP64_TOL)
    torch.testing.assert_close(db, gb, **FP64_TOL)
    if dx_mode == 1:
        torch.testing.assert_close(dx, gx, **FP64_TOL)
    elif dx_mode == 2:
        torch.testing.assert_close(dx + dxl, gx, **FP64_TOL)
        torch.testing.assert_close(dx, dy @ w, **FP64_TOL)
    else:
        assert dx.numel() == 0 and dxl.numel() == 0
