"""Subtractive fine-tuning (``pfp.subtractive``, ``docs/subtractive.md``): the fit recovers what it should,
equals least squares, streams, replaces modules keeping shapes, freezes and restores modes as documented,
and rejects bad input naming the module."""
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

import pyfastpeft as pfp
from pyfastpeft.nn import FilterBlock
from pyfastpeft.subtractive import SingularFitWarning, UnderdeterminedFitWarning

sfp = pfp.subtractive


@pytest.fixture(autouse=True)
def _torch_accumulation():
    # Under TRITON_INTERPRET=1 the auto backend of the accumulation op would be the Triton kernel run
    # program by program in numpy (minutes for the ViT); the op's backends are compared in
    # tests/subtractive/test_gram_accumulate.py, and test_fit_with_triton_backend runs the fit through Triton once.
    with pfp.use_backend("torch"):
        yield


class Affine(nn.Module):
    """An exactly affine module written as two linears with no activation (y = (x A + a) B + b)."""

    def __init__(self, k, h, n, dtype=torch.float64):
        super().__init__()
        self.fc1 = nn.Linear(k, h, dtype=dtype)
        self.fc2 = nn.Linear(h, n, dtype=dtype)

    def forward(self, x):
        return self.fc2(self.fc1(x))

    def matrix(self):
        w = self.fc2.weight @ self.fc1.weight  # (n, k)
        b = self.fc2.weight @ self.fc1.bias + self.fc2.bias
        return w, b


class Net(nn.Module):
    def __init__(self, body: nn.Module, k=12, dtype=torch.float64):
        super().__init__()
        self.pre = nn.Linear(6, k, dtype=dtype)
        self.body = body
        self.post = nn.Linear(body_out(body, k), 3, dtype=dtype)

    def forward(self, x):
        return self.post(self.body(torch.tanh(self.pre(x))))


def body_out(body, k):
    with torch.no_grad():
        p = next(body.parameters())
        return body(torch.zeros(1, k, dtype=p.dtype)).shape[-1]


def mlp(k, h, n, dtype=torch.float64):
    return nn.Sequential(nn.Linear(k, h, dtype=dtype), nn.GELU(), nn.Linear(h, n, dtype=dtype))


def batches(n_batches, rows, dtype=torch.float64, seed=0, feat=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, feat, generator=g, dtype=dtype) for _ in range(n_batches)]


def rows_of(model, name, data):
    """The module's inputs and outputs over data, materialised (test-side only)."""
    xs, ys = [], []
    mod = model.get_submodule(name)

    def hook(m, a, o):
        xs.append(a[0].detach())
        ys.append(o.detach())

    h = mod.register_forward_hook(hook)
    with torch.no_grad():
        for b in data:
            model(b)
    h.remove()
    return torch.cat(xs).reshape(-1, xs[0].shape[-1]), torch.cat(ys).reshape(-1, ys[0].shape[-1])


# ------------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("method", ["ridge", "pinv"])
def test_exactly_affine_module_recovered(method):
    torch.manual_seed(0)
    net = Net(Affine(12, 20, 9))
    w_true, b_true = net.body.matrix()
    w_true, b_true = w_true.detach().clone(), b_true.detach().clone()
    data = batches(4, 50)
    y_before = torch.cat([net(b) for b in data]).detach()
    rep = sfp.fit(net, "body", data, ridge=0.0, method=method, progress=False)
    blk = net.body
    assert isinstance(blk, FilterBlock) and blk.kind == "full"
    rel_w = (blk.weight - w_true).norm() / w_true.norm()
    rel_b = (blk.bias - b_true).norm() / b_true.norm()
    assert rel_w <= 1e-6 and rel_b <= 1e-6, (rel_w, rel_b)
    assert rep[0].fit_error <= 1e-6
    y_after = torch.cat([net(b) for b in data]).detach()
    assert ((y_after - y_before).norm() / y_before.norm()) <= 1e-6


@pytest.mark.parametrize("ridge", [0.0, 1e-13])
def test_fit_equals_numpy_lstsq(ridge):
    torch.manual_seed(1)
    net = Net(mlp(12, 30, 7))
    data = batches(5, 40, seed=3)
    X, Y = rows_of(net, "body", data)
    Xt = np.concatenate([X.numpy(), np.ones((X.shape[0], 1))], 1)
    F, *_ = np.linalg.lstsq(Xt, Y.numpy(), rcond=None)
    err_np = np.linalg.norm(Y.numpy() - Xt @ F) / np.linalg.norm(Y.numpy())
    rep = sfp.fit(net, "body", data, ridge=ridge, progress=False)
    blk = net.body
    got = torch.cat([blk.weight.detach().t(), blk.bias.detach()[None]]).numpy()
    assert np.linalg.norm(got - F) / np.linalg.norm(F) <= 1e-8
    assert rep[0].fit_error == pytest.approx(err_np, rel=1e-6)
    assert rep[0].rows == 200


def test_many_batches_equal_one_big_batch():
    torch.manual_seed(2)
    net_a = Net(mlp(12, 24, 12))
    net_b = Net(mlp(12, 24, 12))
    net_b.load_state_dict(net_a.state_dict())
    data = batches(6, 25, seed=4)
    ra = sfp.fit(net_a, "body", data, progress=False)
    rb = sfp.fit(net_b, "body", [torch.cat(data)], progress=False)
    torch.testing.assert_close(net_a.body.weight, net_b.body.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net_a.body.bias, net_b.body.bias, rtol=1e-10, atol=1e-12)
    assert ra[0].rows == rb[0].rows == 150
    assert ra[0].fit_error == pytest.approx(rb[0].fit_error, rel=1e-8)


def test_fp32_model_fit_matches_fp64_statistics():
    """fp32 activations: the accumulation op's fp32 blocks give the fp64 solution to fp32 accuracy."""
    torch.manual_seed(3)
    net = Net(mlp(12, 24, 8, dtype=torch.float32), dtype=torch.float32)
    data = batches(4, 64, dtype=torch.float32, seed=5)
    X, Y = rows_of(net, "body", data)
    Xt = torch.cat([X.double(), torch.ones(X.shape[0], 1, dtype=torch.float64)], 1)
    G, C = Xt.t() @ Xt, Xt.t() @ Y.double()
    lam = 1e-4 * torch.trace(G) / G.shape[0]
    F = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64), C)
    sfp.fit(net, "body", data, progress=False)
    got = torch.cat([net.body.weight.detach().t(), net.body.bias.detach()[None]]).double()
    assert (got - F).norm() / F.norm() <= 1e-4  # fp32 statistics, a well-conditioned (ridge) solve
    assert net.body.weight.dtype == torch.float32


@pytest.mark.skipif(not pfp.available_backends("gram_accumulate", "cpu").count("triton"),
                    reason="the Triton kernel runs on CPU only under TRITON_INTERPRET=1")
def test_fit_with_triton_backend():
    torch.manual_seed(14)
    net_a = Net(mlp(12, 20, 9, dtype=torch.float32), dtype=torch.float32)
    net_b = Net(mlp(12, 20, 9, dtype=torch.float32), dtype=torch.float32)
    net_b.load_state_dict(net_a.state_dict())
    data = batches(3, 40, dtype=torch.float32)
    ra = sfp.fit(net_a, "body", data, backend="triton", progress=False)
    rb = sfp.fit(net_b, "body", data, backend="torch", progress=False)
    assert pfp.last_backend("gram_accumulate") == "torch"
    torch.testing.assert_close(net_a.body.weight, net_b.body.weight, rtol=1e-4, atol=1e-5)
    assert ra[0].fit_error == pytest.approx(rb[0].fit_error, rel=1e-3, abs=1e-3)


def test_ridge_default_differs_from_plain_least_squares():
    torch.manual_seed(4)
    net1, net2 = Net(mlp(12, 16, 5)), Net(mlp(12, 16, 5))
    net2.load_state_dict(net1.state_dict())
    data = batches(3, 30)
    r0 = sfp.fit(net1, "body", data, ridge=0.0, progress=False)
    r1 = sfp.fit(net2, "body", data, ridge=0.5, progress=False)
    assert r1[0].fit_error > r0[0].fit_error  # ridge trades fit for stability
    assert not torch.allclose(net1.body.weight, net2.body.weight)


def test_lowrank_exact_and_in_the_data_metric():
    torch.manual_seed(5)
    # an affine map of rank 3 is recovered exactly by a rank-3 block
    body = Affine(12, 3, 10)
    net = Net(body)
    w_true, b_true = body.matrix()
    w_true, b_true = w_true.detach().clone(), b_true.detach().clone()
    data = batches(4, 40, seed=6)
    rep = sfp.fit(net, "body", data, ridge=0.0, rank=3, progress=False)
    blk = net.body
    assert blk.kind == "lowrank" and blk.weight_down.shape == (3, 12) and blk.weight_up.shape == (10, 3)
    assert (blk.dense_weight() - w_true).norm() / w_true.norm() <= 1e-6
    assert (blk.bias - b_true).norm() / b_true.norm() <= 1e-6
    assert rep[0].params_after == 3 * (12 + 10) + 10
    # on a nonlinear module, the weighted reduced-rank fit beats truncating the full fit's SVD
    net2 = Net(mlp(12, 40, 10))
    data2 = batches(4, 60, seed=7)
    X, Y = rows_of(net2, "body", data2)
    rep_full = sfp.rank_modules(net2, data2, ["body"], ridge=0.0)
    rep_k = sfp.rank_modules(net2, data2, ["body"], ridge=0.0, rank=2)
    Xt = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    F = torch.linalg.lstsq(Xt, Y).solution
    U, S, Vh = torch.linalg.svd(F[:12], full_matrices=False)
    Wn = U[:, :2] * S[:2] @ Vh[:2]
    bn = (Y - X @ Wn).mean(0)
    err_naive = ((Y - X @ Wn - bn).norm() / Y.norm()).item()
    assert rep_full[0].fit_error <= rep_k[0].fit_error <= err_naive + 1e-9


def test_diagonal_block():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.randn(12, dtype=torch.float64))
            self.b = nn.Parameter(torch.randn(12, dtype=torch.float64))
            self.extra = nn.Linear(12, 12, dtype=torch.float64)  # parameters that the block removes

        def forward(self, x):
            return x * self.s + self.b

    torch.manual_seed(6)
    body = Scale()
    net = Net(body)
    s, b = body.s.detach().clone(), body.b.detach().clone()
    rep = sfp.fit(net, "body", batches(3, 30), diagonal=True, ridge=0.0, progress=False)
    assert net.body.kind == "diagonal"
    torch.testing.assert_close(net.body.scale.detach(), s, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(net.body.bias.detach(), b, rtol=1e-8, atol=1e-10)
    assert rep[0].params_after == 24 and rep[0].params_saved == 24 + 12 * 13 - 24


def test_heldout_error_is_exact():
    torch.manual_seed(7)
    net = Net(mlp(12, 16, 6))
    data, held = batches(4, 30, seed=1), batches(2, 25, seed=2)
    Xh, Yh = rows_of(net, "body", held)
    rep = sfp.fit(net, "body", data, heldout=held, progress=False)
    pred = net.body(Xh).detach()
    want = ((Yh - pred).norm() / Yh.norm()).item()
    assert rep[0].heldout_rows == 50
    assert rep[0].heldout_error == pytest.approx(want, rel=1e-10)
    assert rep[0].error == rep[0].heldout_error


# ------------------------------------------------------------------------------------------ shapes / layouts
def test_feature_maps_channels_as_features():
    torch.manual_seed(8)
    body = nn.Sequential(nn.Conv2d(5, 7, 1, dtype=torch.float64), nn.Conv2d(7, 4, 1, dtype=torch.float64))

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x)

    net = ConvNet()
    data = [torch.randn(2, 5, 3, 4, dtype=torch.float64) for _ in range(3)]
    data.append(torch.randn(2, 5, 3, 4, dtype=torch.float64).to(memory_format=torch.channels_last))
    y0 = [net(b).detach() for b in data]
    rep = sfp.fit(net, "body", data, ridge=0.0, progress=False)
    assert isinstance(net.body, FilterBlock) and net.body.feature_dim == 1
    assert rep[0].rows == 4 * 2 * 12 and rep[0].feature_dim == 1
    for b, y in zip(data, y0):
        out = net(b)
        assert out.shape == y.shape
        assert ((out - y).norm() / y.norm()) <= 1e-6
    merged = net.body.merged()
    assert isinstance(merged, nn.Conv2d)
    torch.testing.assert_close(merged(data[0]), net.body(data[0]))


def test_tokens_3d_and_merged_linear():
    torch.manual_seed(9)
    blk = FilterBlock(8, 5, rank=2, dtype=torch.float64)
    nn.init.normal_(blk.weight_up)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    lin = blk.merged()
    assert isinstance(lin, nn.Linear)
    torch.testing.assert_close(lin(x), blk(x))
    cfg = blk.adapter_config()
    assert json.loads(json.dumps(cfg)) == cfg
    blk2 = FilterBlock.from_config(cfg, dtype=torch.float64)
    assert blk2.adapter_config() == cfg and "rank=2" in repr(blk2)


def test_module_changing_spatial_shape_rejected():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2))
    with pytest.raises(ValueError, match="'0'.*spatial"):
        sfp.fit(net, "0", [torch.randn(2, 3, 8, 8)], progress=False)


# ------------------------------------------------------------------------------------------ model surgery
def test_timm_vit_two_mlps_replaced_and_trained():
    timm = pytest.importorskip("timm")
    torch.manual_seed(10)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4, num_classes=10)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(6)]  # 240 rows (8 x 5 tokens) > 193
    x = torch.randn(16, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (16,), generator=g)
    model.train()
    with torch.no_grad():
        model.eval()
        out_before = model(x)
        model.train()
    params_before = sum(p.numel() for p in model.parameters())

    ranking = sfp.rank_modules(model, calib, r"blocks\.\d+\.mlp", progress=False)
    assert len(ranking) == 4 and [r.error for r in ranking] == sorted(r.error for r in ranking)
    assert all(isinstance(model.get_submodule(f"blocks.{i}.mlp"), nn.Module) for i in range(4))
    assert not any(isinstance(m, FilterBlock) for m in model.modules())  # ranking changes nothing
    chosen = [r.name for r in ranking[:2]]

    rep = sfp.fit(model, chosen, calib, trainable=["head"], progress=False)
    mlp_params = 2 * 192 * 768 + 768 + 192
    block_params = 192 * 192 + 192
    assert [r.params_before for r in rep] == [mlp_params] * 2
    assert [r.params_after for r in rep] == [block_params] * 2
    assert rep.params_saved == 2 * (mlp_params - block_params)
    assert params_before - sum(p.numel() for p in model.parameters()) == rep.params_saved
    assert "params before" in str(rep)
    for name in chosen:
        blk = model.get_submodule(name)
        assert isinstance(blk, FilterBlock) and blk.training  # the replaced module's mode
    assert model.training and all(m.training for m in model.modules())  # restored after the eval-mode fit

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {f"{c}.{p}" for c in chosen for p in ("weight", "bias")} | {"head.weight", "head.bias"}
    assert trainable == want

    model.eval()
    with torch.no_grad():
        out_after = model(x)
    assert out_after.shape == out_before.shape
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for name in chosen:
        assert model.get_submodule(name).weight.grad is not None


def test_modes_and_requires_grad():
    torch.manual_seed(11)
    net = Net(mlp(12, 16, 12))
    net.eval()
    net.pre.train()  # a mixed state must come back exactly
    net.post.weight.requires_grad_(False)
    sfp.fit(net, "body", batches(2, 30), freeze=False, progress=False)
    assert not net.training and net.pre.training and not net.post.training
    assert not net.body.training  # the replaced module was in eval mode
    assert net.pre.weight.requires_grad and not net.post.weight.requires_grad  # freeze=False: untouched
    net2 = Net(mlp(12, 16, 12))
    net2.train()
    sfp.fit(net2, "body", batches(2, 30), progress=False)
    assert all(m.training for m in net2.modules())
    assert {n for n, p in net2.named_parameters() if p.requires_grad} == {"body.weight", "body.bias"}


def test_fit_runs_under_no_grad_and_eval():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 12, dtype=torch.float64)

        def forward(self, x):
            seen["training"] = self.training
            seen["grad"] = torch.is_grad_enabled()
            return self.lin(x)

    net = Net(Probe())
    net.train()
    sfp.fit(net, "body", batches(1, 20), progress=False)
    assert seen == {"training": False, "grad": False}


def test_rank_modules_by_type_top_k_and_savings():
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(6, 12, dtype=torch.float64), nn.Tanh(), mlp(12, 40, 12), nn.Tanh(),
                        Affine(12, 30, 12))
    data = batches(3, 40)
    r = sfp.rank_modules(net, data, [Affine, "2"], ridge=0.0, progress=False)
    assert [m.name for m in r] == ["4", "2"]  # the affine module is the most redundant
    assert r[0].fit_error < 1e-6 < r[1].fit_error
    assert r[0].params_saved == (12 * 30 + 30 + 30 * 12 + 12) - (12 * 12 + 12)
    assert len(sfp.rank_modules(net, data, r"\d", top_k=1, progress=False)) == 1


# ------------------------------------------------------------------------------------------ bad input
def test_bad_module_name():
    net = Net(mlp(12, 16, 6))
    with pytest.raises(ValueError, match="'nope' does not exist"):
        sfp.fit(net, ["body", "nope"], batches(1, 20), progress=False)
    with pytest.raises(ValueError, match="'missing'"):
        sfp.rank_modules(net, batches(1, 20), ["missing"], progress=False)


def test_output_not_one_tensor():
    class Two(nn.Module):
        def forward(self, x):
            return x, x

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.two = Two()

        def forward(self, x):
            return self.two(x)[0]

    with pytest.raises(ValueError, match="'two'.*not one tensor"):
        sfp.fit(M(), "two", [torch.randn(4, 3)], progress=False)


def test_feature_sizes_change_between_batches():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.id = nn.Identity()

        def forward(self, x):
            return self.id(x)

    with pytest.raises(ValueError, match="'id'.*feature sizes changed"):
        sfp.fit(M(), "id", [torch.randn(4, 3), torch.randn(4, 5)], progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_activations(bad):
    net = nn.Sequential(mlp(6, 16, 6))
    x = torch.randn(30, 6, dtype=torch.float64)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="'0'.*NaN or inf"):
        sfp.fit(net, "0", [torch.randn(30, 6, dtype=torch.float64), x], progress=False)
    assert not isinstance(net[0], FilterBlock)  # nothing replaced


def test_no_data():
    net = Net(mlp(12, 16, 6))
    with pytest.raises(ValueError, match="'body'.*no calibration rows"):
        sfp.fit(net, "body", [], progress=False)
    with pytest.raises(ValueError, match="data is None"):
        sfp.fit(net, "body", None, progress=False)


def test_underdetermined_warns():
    net = Net(mlp(12, 16, 6))
    with pytest.warns(UnderdeterminedFitWarning, match="'body'.*underdetermined"):
        rep = sfp.fit(net, "body", [torch.randn(5, 6, dtype=torch.float64)], progress=False)
    assert "underdetermined" in rep[0].notes


def test_singular_without_ridge_falls_back_to_pinv():
    class Dup(nn.Module):  # input features 0 and 1 identical: G singular
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2, dtype=torch.float64)

        def forward(self, x):
            return self.lin(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.dup = Dup()

        def forward(self, x):
            return self.dup(torch.cat([x[:, :1], x[:, :1], x[:, 1:2]], 1))

    x = torch.randn(30, 2, dtype=torch.float64)
    with pytest.warns(SingularFitWarning, match="'dup'"):
        rep = sfp.fit(M(), "dup", [x], ridge=0.0, progress=False)
    assert rep[0].fit_error < 1e-6  # still exact: the minimum-norm solution


def test_bad_options():
    net = Net(mlp(12, 16, 6))
    for kw, msg in [(dict(ridge=-1.0), "ridge"), (dict(method="svd"), "method"), (dict(rank=0), "rank"),
                    (dict(rank=2, diagonal=True), "exclusive"), (dict(feature_dim=2), "feature_dim")]:
        with pytest.raises(ValueError, match=msg):
            sfp.fit(net, "body", batches(1, 20), progress=False, **kw)
    with pytest.raises(ValueError, match="'body'.*in_features == out_features"):
        sfp.fit(net, "body", batches(1, 20), diagonal=True, progress=False)


# ------------------------------------------------------------------------------------------ progress / data
def test_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails -> the one-line counter
    net = Net(mlp(12, 16, 6))
    sfp.fit(net, "body", batches(3, 20), progress=True)
    err = capsys.readouterr().err
    assert "3/3 batches" in err and "60 rows" in err


def test_dataloader_pairs_and_dicts():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(13)
    net = Net(Affine(12, 20, 9))
    ds = TensorDataset(torch.randn(64, 6, dtype=torch.float64), torch.zeros(64))
    rep = sfp.fit(net, "body", DataLoader(ds, batch_size=16), ridge=0.0, progress=False)
    assert rep[0].rows == 64 and rep[0].fit_error < 1e-6

    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp(6, 8, 6)

        def forward(self, inputs):
            return self.body(inputs)

    rep = sfp.fit(KW(), "body", [{"inputs": torch.randn(20, 6, dtype=torch.float64)}], progress=False)
    assert rep[0].rows == 20


def test_save_and_load_adapter_round_trip(tmp_path):
    """Filter blocks are saved by ``pfp.save_adapter`` and rebuilt in a fresh model by ``pfp.load_adapter``."""
    torch.manual_seed(15)
    net = Net(mlp(12, 16, 12))
    fresh = Net(mlp(12, 16, 12))
    fresh.load_state_dict(net.state_dict())
    sfp.fit(net, "body", batches(3, 30), rank=4, progress=False)
    pfp.save_adapter(net, tmp_path / "sfp")
    pfp.load_adapter(fresh, tmp_path / "sfp")
    assert isinstance(fresh.body, FilterBlock) and fresh.body.rank == 4
    x = torch.randn(7, 6, dtype=torch.float64)
    assert torch.equal(fresh(x), net(x))


def test_bf16_model():
    """bf16 activations: fp32 statistics (exact products), the block in the model's dtype."""
    torch.manual_seed(16)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), Affine(12, 20, 9, dtype=torch.float32)).to(torch.bfloat16)
    data = [torch.randn(40, 6).to(torch.bfloat16) for _ in range(3)]
    rep = sfp.fit(net, "2", data, progress=False)
    assert net[2].weight.dtype == torch.bfloat16
    assert rep[0].fit_error < 2e-2  # the module's own bf16 rounding of its output, not the fit
