"""Measured dispatch (core/tune.py) without a GPU: a fake CUDA device, a fake timer, a temporary cache."""
from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import torch

from pyfastpeft.core import backend as B
from pyfastpeft.core import tune

CUDA = torch.device("cuda")  # only a name here: nothing touches a GPU
IDENT = {"gpu": "Fake GPU", "cc": "9.0", "pyfastpeft": "0.1.0", "torch": "2.14.1", "triton": "3.8.0",
         "cuda": "13.0", "ext": "none"}


class FakeTimer:
    def __init__(self, times):
        self.times, self.calls = dict(times), []

    def __call__(self, fn):
        name = fn()  # the fake backends return their own name
        self.calls.append(name)
        if isinstance(self.times[name], Exception):
            raise self.times[name]
        return self.times[name]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PYFASTPEFT_TUNE", raising=False)
    monkeypatch.delenv("PYFASTPEFT_BACKEND", raising=False)
    yield from fake_machine(monkeypatch)


def fake_machine(monkeypatch):
    """A fake GPU identity and device check for the dispatch tests; yields the identity (a fixture body)."""
    ident = dict(IDENT)
    monkeypatch.setattr(tune.hooks, "identity", lambda device: dict(ident))
    monkeypatch.setattr(tune.hooks, "capturing", lambda device: False)
    monkeypatch.setattr(tune.hooks, "measurable_device", lambda device: device.type == "cuda")
    tune.clear_memory()
    yield ident
    tune.clear_memory()


_N = [0]


def registry(order=("triton", "cuda", "torch"), vendor_order=None, rejects=()):
    _N[0] += 1
    reg = B.OpRegistry(f"fake_op_{_N[0]}_fwd", public=f"fake_op_{_N[0]}", order=order, vendor_order=vendor_order)
    B.REGISTRIES.pop(reg.op)  # fakes stay out of the library's table of ops (`pyfastpeft check` covers that table)
    for name in B.ORDER:
        reg.register(B.Backend(name, (lambda n: lambda x: n)(name), devices=lambda: ("cuda",),
                               supports=(lambda n: lambda x: "too big" if n in rejects else None)(name)))
    return reg


def x(m=100):
    return torch.empty(m, 64)


@pytest.mark.parametrize("times", [dict(triton=1.0, cuda=2.0, torch=3.0), dict(triton=3.0, cuda=2.0, torch=1.0),
                                   dict(triton=2.0, cuda=0.5, torch=0.9), dict(triton=0.9, cuda=0.9, torch=0.8)])
def test_the_fastest_measured_backend_is_chosen(env, monkeypatch, times):
    timer = FakeTimer(times)
    monkeypatch.setattr(tune.hooks, "timer", timer)
    reg = registry()
    chosen = reg.select(CUDA, x()).name
    assert chosen == min(times, key=times.get)
    assert sorted(timer.calls) == sorted(times)  # every runnable backend was timed once
    assert "measured on Fake GPU" in B.last_choice(reg.op)


def test_a_tie_keeps_the_preference_order(env, monkeypatch):
    monkeypatch.setattr(tune.hooks, "timer", FakeTimer(dict(triton=1.0, cuda=1.0, torch=1.0)))
    assert registry(order=("cuda", "triton", "torch")).select(CUDA, x()).name == "cuda"


def test_decision_is_remembered_in_memory_and_on_disk(env, monkeypatch, tmp_path):
    timer = FakeTimer(dict(triton=2.0, cuda=3.0, torch=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    reg = registry()
    assert reg.select(CUDA, x()).name == "torch"
    assert reg.select(CUDA, x()).name == "torch" and len(timer.calls) == 3  # memory
    tune.clear_memory()  # a new process: the file answers
    assert reg.select(CUDA, x()).name == "torch" and len(timer.calls) == 3
    data = json.loads((tmp_path / "dispatch.json").read_text())
    assert data["format"] == tune.FORMAT and data["version"] == tune.VERSION
    (entry,) = data["entries"].values()
    assert entry["chosen"] == "torch" and entry["gpu"] == "Fake GPU" and entry["times_ms"]["triton"] == 2.0
    assert "measured earlier on Fake GPU" in str(reg.explain(CUDA, x()))


def test_shape_buckets(env, monkeypatch):
    timer = FakeTimer(dict(triton=2.0, cuda=3.0, torch=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    reg = registry()
    reg.select(CUDA, x(100))
    reg.select(CUDA, x(120))  # same bucket (128 rows)
    assert len(timer.calls) == 3
    reg.select(CUDA, x(300))  # another bucket
    assert len(timer.calls) == 6
    reg.select(CUDA, torch.empty(100, 64, dtype=torch.float16))  # another dtype
    assert len(timer.calls) == 9
    assert tune.bucket([x(100), None, 3, 1.5, "a"]) == tune.bucket([x(128), None, 3, 2.5, "a"])
    assert tune.bucket([x(100)]) != tune.bucket([x(100).t()])  # contiguity is part of it


@pytest.mark.parametrize("field", ["gpu", "torch", "triton", "cuda", "pyfastpeft", "cc"], ids=lambda f: f"new-{f}-id")
def test_a_new_gpu_or_library_version_measures_again(env, monkeypatch, field):
    timer = FakeTimer(dict(triton=2.0, cuda=3.0, torch=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    reg = registry()
    reg.select(CUDA, x())
    tune.clear_memory()
    env[field] = "something else"
    timer.times = dict(triton=0.5, cuda=3.0, torch=1.0)
    assert reg.select(CUDA, x()).name == "triton" and len(timer.calls) == 6


@pytest.mark.parametrize("content", ["{not json", "", json.dumps([1, 2]), json.dumps({"format": "other", "entries": {}}),
                                     json.dumps({"format": tune.FORMAT, "version": 99, "entries": {}})])
def test_corrupt_or_foreign_cache_is_ignored_with_one_warning(env, monkeypatch, tmp_path, content):
    (tmp_path / "dispatch.json").write_text(content)
    timer = FakeTimer(dict(triton=2.0, cuda=3.0, torch=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    reg = registry()
    with pytest.warns(RuntimeWarning, match="ignoring the dispatch cache") as rec:
        assert reg.select(CUDA, x()).name == "torch"
        reg.select(CUDA, x(300))  # a second lookup of the same bad file: no second warning
    assert len([w for w in rec if "dispatch cache" in str(w.message)]) == 1
    data = json.loads((tmp_path / "dispatch.json").read_text())  # rewritten as a valid cache
    assert data["format"] == tune.FORMAT and len(data["entries"]) == 2


def test_measuring_off_uses_the_vendor_order(env, monkeypatch):
    timer = FakeTimer(dict(triton=0.1, cuda=3.0, torch=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    monkeypatch.setenv("PYFASTPEFT_TUNE", "0")
    reg = registry(vendor_order=("torch", "cuda", "triton"))
    assert reg.select(CUDA, x()).name == "torch" and timer.calls == []
    assert "PYFASTPEFT_TUNE=0" in B.last_choice(reg.op)
    assert registry().select(CUDA, x()).name == "triton"  # no vendor order: the preference order
    assert reg.static_order(torch.device("cpu")) == reg.order  # the vendor order is for CUDA


def test_no_timing_while_compiling_or_capturing(env, monkeypatch):
    timer = FakeTimer(dict(triton=2.0, cuda=3.0, torch=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    reg = registry(vendor_order=("cuda", "torch", "triton"))
    monkeypatch.setattr(tune.hooks, "capturing", lambda device: True)
    assert reg.select(CUDA, x()).name == "cuda" and timer.calls == []  # nothing remembered: static default
    assert "static default" in B.last_choice(reg.op)
    monkeypatch.setattr(tune.hooks, "capturing", lambda device: False)
    assert reg.select(CUDA, x()).name == "torch" and len(timer.calls) == 3  # eager: measured
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert reg.select(CUDA, x()).name == "torch" and len(timer.calls) == 3  # tracing: the remembered choice


def test_forced_backend_and_single_candidate_are_not_timed(env, monkeypatch):
    timer = FakeTimer(dict(triton=2.0, cuda=3.0, torch=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    reg = registry()
    assert reg.select(CUDA, x(), backend="cuda").name == "cuda"
    with B.use_backend("triton"):
        assert reg.select(CUDA, x()).name == "triton"
    assert registry(rejects=("triton", "cuda")).select(CUDA, x()).name == "torch"
    assert timer.calls == []


def test_rejected_and_failing_backends_are_not_candidates(env, monkeypatch):
    timer = FakeTimer(dict(triton=RuntimeError("out of resources"), cuda=3.0, torch=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    reg = registry(rejects=("torch",))
    assert reg.select(CUDA, x()).name == "cuda"
    assert "triton failed: RuntimeError: out of resources" in B.last_choice(reg.op)
    assert sorted(timer.calls) == ["cuda", "triton"]


def test_cpu_calls_are_never_timed(env, monkeypatch):
    timer = FakeTimer(dict(triton=2.0, cuda=3.0, torch=1.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    import pyfastpeft as pfp
    xx, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    pfp.lora_linear(xx, w, None, a, b, 1.0)
    assert timer.calls == []


def test_explain_before_the_first_call(env, monkeypatch):
    monkeypatch.setattr(tune.hooks, "timer", FakeTimer(dict(triton=2.0, cuda=3.0, torch=1.0)))
    reg = registry(vendor_order=("cuda", "torch", "triton"))
    dec = reg.explain(CUDA, x())
    assert dec.chosen == "cuda" and "not measured yet" in dec.how
    reg.select(CUDA, x())
    dec = reg.explain(CUDA, x())
    assert dec.chosen == "torch" and "on Fake GPU: torch 1 ms" in dec.how
    tune.clear_memory()
    assert "measured earlier on Fake GPU: torch 1 ms" in reg.explain(CUDA, x()).how


def test_real_ops_declare_the_vendor_order():
    from pyfastpeft.lora import gated_lora_linear, lora_linear
    from pyfastpeft.orthogonal import oft_linear
    for reg in (gated_lora_linear.FWD, gated_lora_linear.BWD):
        order = reg.static_order(CUDA)
        assert order.index("triton") > order.index("torch"), reg.op
    # LoRA's triton backend defaults to its cuBLAS-backed variant (vendor), modeled fastest: it comes first
    for reg in (lora_linear.FWD, lora_linear.BWD):
        assert reg.static_order(CUDA)[0] == "triton" and lora_linear.STATIC_VARIANT == "vendor"
    # OFT's backends both run their GEMMs on cuBLAS; its Triton kernels do only the memory-bound work, which
    # the model puts at ~800 us against ~1260 us for the torch path (Llama 4096², M 8192, bf16): triton first
    for reg in (oft_linear.FWD, oft_linear.BWD):
        order = reg.static_order(CUDA)
        assert order.index("triton") < order.index("torch"), reg.op


def _writer(path, start, n):
    from pathlib import Path
    from pyfastpeft.core import tune as t
    for i in range(start, start + n):
        t._store(Path(path), f"key{i}", {"chosen": "torch", "times_ms": {"torch": float(i)}})


def test_two_processes_writing_at_once_keep_every_entry(tmp_path):
    path = tmp_path / "dispatch.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), k * 100, 25)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 50
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
