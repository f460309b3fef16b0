"""The subtractive fit under ``torch.autocast``: ``gram_accumulate`` keeps its fp32 (fp64) sums on every CPU backend,
and ``pfp.subtractive.fit`` runs on the activations the model computes under autocast, with an exact fit error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.nn import FilterBlock
from pyfastpeft.subtractive import gram_accumulate, gram_accumulate_ref
from pyfastpeft.testing import fp32_tol

sfp = pfp.subtractive
BACKENDS = pfp.available_backends("gram_accumulate", "cpu")
AUTOCAST = (torch.bfloat16, torch.float16)


def _cases(backend):
    cases = [(70, 33, 17, True), (45, 24, 30, False), (50, 1, 9, True)]
    if backend == "torch":
        cases.append((9000, 8, 5, True))  # more than one 8192-row block: the fp64 between-block path
    return cases


_GRAM_PARAMS = [pytest.param(b, dt, id=f"{b}-{str(dt)[6:]}") for b in BACKENDS
                for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
                if b == "torch" or dt != torch.float64]  # fp64 runs on the torch backend only


@pytest.mark.parametrize("autocast_dtype", AUTOCAST, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend, in_dtype", _GRAM_PARAMS)
def test_gram_accumulate_unchanged_under_autocast(backend, in_dtype, autocast_dtype):
    """Same G and C under torch.autocast("cpu", bf16/fp16) as without (bit for bit), fp32 (fp64 for fp64 inputs),
    and within the fp32 rule of the fp64 reference."""
    g = torch.Generator().manual_seed(0)
    for M, K, N, bias in _cases(backend):
        x = torch.randn(M, K, generator=g).to(in_dtype)
        y = torch.randn(M, N, generator=g).to(in_dtype)
        G0, C0 = gram_accumulate(x, y, bias=bias, backend=backend)
        with torch.autocast("cpu", dtype=autocast_dtype):
            G1, C1 = gram_accumulate(x, y, bias=bias, backend=backend)
        want = torch.float64 if in_dtype == torch.float64 else torch.float32
        assert G1.dtype == C1.dtype == want
        assert torch.equal(G0, G1) and torch.equal(C0, C1), f"M={M} K={K} N={N}: autocast changed G or C"
        Gr, Cr = gram_accumulate_ref(x, y, bias)
        for got, ref in ((G1, Gr), (C1, Cr)):
            tol = fp32_tol(M, ref.pow(2).mean().sqrt().item())
            torch.testing.assert_close(got.double(), ref, **tol)


# ------------------------------------------------------------------------------------------ fit under autocast
class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.pre = nn.Linear(6, d)
        self.body = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.lin = nn.Linear(d, d)
        self.up = CastUp(d)
        self.post = nn.Linear(d, 3)

    def forward(self, x):
        return self.post(self.up(self.lin(self.body(self.pre(x)))))


class CastUp(nn.Module):
    """An exactly linear map that returns fp32 whatever autocast does to its (bf16) input."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.w, self.b)


@pytest.fixture
def solutions(monkeypatch):
    """The fp64 solutions the fit hands to each FilterBlock (before they are rounded to the block's dtype)."""
    got = []
    orig = FilterBlock.load_solution

    def spy(self, weight, bias=None, **kw):
        got.append((weight.detach().double().clone(), None if bias is None else bias.detach().double().clone()))
        return orig(self, weight, bias, **kw)
    monkeypatch.setattr(FilterBlock, "load_solution", spy)
    return got


def _rows(model, name, data, dtype):
    xs, ys = [], []
    h = model.get_submodule(name).register_forward_hook(
        lambda m, a, o: (xs.append(a[0].detach().double()), ys.append(o.detach().double()), None)[-1])
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        for b in data:
            model(b)
    h.remove()
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.filterwarnings("ignore::pyfastpeft.subtractive.SingularFitWarning")  # ridge 0 on a rank-poor input
@pytest.mark.parametrize("dtype", AUTOCAST, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("target", ["body", "lin", "up"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_under_autocast(backend, target, dtype, solutions):
    """fit inside torch.autocast: the statistics are those of the activations the model computes under autocast
    (``up`` gets bf16/fp16 rows and returns fp32 ones: neither side is rounded), the fit error is exactly the
    fitted map's error on them, the block keeps the module's fp32 parameters and returns the autocast dtype."""
    torch.manual_seed(0)
    model = Net()
    data = [torch.randn(40, 6) for _ in range(3)]
    X, Y = _rows(model, target, data, dtype)
    with torch.autocast("cpu", dtype=dtype):
        rep = sfp.fit(model, target, data, ridge=0.0, heldout=data, backend=backend, progress=False)
    W, b = solutions[-1]
    want = ((Y - X @ W.t() - b).norm() / Y.norm()).item()
    assert rep[0].rows == 120 and rep[0].heldout_rows == 120
    assert rep[0].fit_error == pytest.approx(want, rel=1e-6)
    assert rep[0].heldout_error == pytest.approx(want, rel=1e-9)
    if target == "up":  # exactly linear, fp32 out: Y is not rounded to bf16/fp16 (that alone would give ~1e-3)
        assert want < 1e-4
    blk = model.get_submodule(target)
    assert isinstance(blk, FilterBlock) and blk.weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert blk(torch.randn(2, 16)).dtype == dtype


def test_rank_modules_under_autocast_equals_fit_errors():
    torch.manual_seed(1)
    model = Net()
    data = [torch.randn(40, 6) for _ in range(3)]
    with pfp.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        ranked = sfp.rank_modules(model, data, ["body", "lin", "up"], ridge=0.0, heldout=data, progress=False)
    assert [m.name for m in ranked] == sorted((m.name for m in ranked), key=lambda n: ranked.by_name()[n].error)
    for m in ranked:
        assert m.fit_error == pytest.approx(m.heldout_error, rel=1e-6), m.name
    assert ranked[0].name == "up"  # exactly linear on its (bf16) inputs
