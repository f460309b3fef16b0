"""Results files (core/results.py) feeding the dispatch's static default and the model, without a GPU: fake
results files, a fake GPU identity and the fake timer of test_tune."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from pyfastpeft.core import backend as B
from pyfastpeft.core import results, tune
from pyfastpeft.tools import perf
from tests.core.test_tune import CUDA, IDENT, FakeTimer, fake_machine, registry, x


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("PYFASTPEFT_TUNE", "PYFASTPEFT_BACKEND", "PYFASTPEFT_RESULTS", "PYFASTPEFT_TRITON_EFFICIENCY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(results, "PACKAGE_DIR", tmp_path / "shipped")  # no shipped file unless a test writes one
    yield from fake_machine(monkeypatch)


def results_file(path, *, gpu="Fake GPU", cc="9.0", dispatch=None, efficiency=None, **machine):
    data = {"format": results.FORMAT, "version": results.VERSION,
            "machine": dict(IDENT, gpu=gpu, cc=cc, **machine),
            "rows": [{"op": "lora_linear", "mode": "fwd", "provider": "frozen", "backend": None, "variant": None,
                      "ms_p50": 1.0, "ms_p20": 0.9, "ms_p80": 1.1}],
            "dispatch": dispatch or {},
            "triton_efficiency": {"value": efficiency}}
    assert results.validate(data) == []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def entry(op, args, **times):
    return {f"{op}|{tune.bucket(args)}": {"times_ms": times, "fastest": min(times, key=times.get)}}


def test_measuring_off_takes_the_results_files_fastest_backend(env, tmp_path, monkeypatch):
    reg = registry(vendor_order=("cuda", "torch", "triton"))
    results_file(tmp_path / "r.json", dispatch=entry(reg.op, (x(),), cuda=2.0, torch=1.5, triton=1.0))
    monkeypatch.setenv("PYFASTPEFT_RESULTS", str(tmp_path / "r.json"))
    monkeypatch.setenv("PYFASTPEFT_TUNE", "0")
    timer = FakeTimer(dict(triton=1.0, cuda=2.0, torch=3.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    assert reg.select(CUDA, x()).name == "triton" and timer.calls == []
    assert "results file r.json" in B.last_choice(reg.op)
    # another shape bucket: nothing in the file, the vendor order
    assert reg.select(CUDA, x(5000)).name == "cuda"
    assert "static default" in B.last_choice(reg.op) and "results file" not in B.last_choice(reg.op)


def test_results_default_only_among_backends_that_run_the_call(env, tmp_path, monkeypatch):
    reg = registry(vendor_order=("cuda", "torch", "triton"), rejects=("triton",))
    results_file(tmp_path / "r.json", dispatch=entry(reg.op, (x(),), cuda=2.0, torch=1.5, triton=1.0))
    monkeypatch.setenv("PYFASTPEFT_RESULTS", str(tmp_path))  # a folder: every *.json in it
    monkeypatch.setenv("PYFASTPEFT_TUNE", "0")
    assert reg.select(CUDA, x()).name == "torch"  # triton rejects the call: the next fastest in the file


def test_compiling_with_nothing_cached_uses_the_results_file(env, tmp_path, monkeypatch):
    reg = registry(vendor_order=("cuda", "torch", "triton"))
    results_file(tmp_path / "shipped" / "h.json", dispatch=entry(reg.op, (x(),), cuda=3.0, torch=1.0))
    timer = FakeTimer(dict(triton=1.0, cuda=2.0, torch=3.0))
    monkeypatch.setattr(tune.hooks, "timer", timer)
    monkeypatch.setattr(tune.hooks, "capturing", lambda device: True)
    assert reg.select(CUDA, x()).name == "torch" and timer.calls == []  # the shipped file, not a timing
    monkeypatch.setattr(tune.hooks, "capturing", lambda device: False)
    assert reg.select(CUDA, x()).name == "triton" and len(timer.calls) == 3  # eager: measured, and that wins


@pytest.mark.parametrize("gpu,cc", [("Other GPU", "9.0"), ("Fake GPU", "8.0")])
def test_a_file_from_another_gpu_is_not_used(env, tmp_path, monkeypatch, gpu, cc):
    reg = registry(vendor_order=("cuda", "torch", "triton"))
    results_file(tmp_path / "r.json", gpu=gpu, cc=cc, dispatch=entry(reg.op, (x(),), cuda=2.0, triton=1.0))
    monkeypatch.setenv("PYFASTPEFT_RESULTS", str(tmp_path / "r.json"))
    monkeypatch.setenv("PYFASTPEFT_TUNE", "0")
    assert reg.select(CUDA, x()).name == "cuda"


def test_the_file_matching_more_versions_wins(env, tmp_path, monkeypatch):
    reg = registry(vendor_order=("cuda", "torch", "triton"))
    old = results_file(tmp_path / "a.json", torch="1.0", dispatch=entry(reg.op, (x(),), cuda=1.0, triton=2.0))
    new = results_file(tmp_path / "b.json", dispatch=entry(reg.op, (x(),), cuda=2.0, triton=1.0))
    monkeypatch.setenv("PYFASTPEFT_RESULTS", f"{old}:{new}")
    monkeypatch.setenv("PYFASTPEFT_TUNE", "0")
    assert reg.select(CUDA, x()).name == "triton"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"format": "something-else", "version": 1}),
                                     json.dumps({"format": results.FORMAT, "version": 1, "machine": {"gpu": "Fake GPU",
                                                 "cc": "9.0"}, "rows": [], "dispatch": {"k": {"times_ms": {}}},
                                                 "triton_efficiency": {"value": None}})])
def test_corrupt_or_foreign_results_file_is_ignored_with_one_warning(env, tmp_path, monkeypatch, content):
    reg = registry(vendor_order=("cuda", "torch", "triton"))
    (tmp_path / "bad.json").write_text(content)
    monkeypatch.setenv("PYFASTPEFT_RESULTS", str(tmp_path / "bad.json"))
    monkeypatch.setenv("PYFASTPEFT_TUNE", "0")
    with pytest.warns(RuntimeWarning, match="ignoring the results file"):
        assert reg.select(CUDA, x()).name == "cuda"
    (tmp_path / "bad.json").write_text(content)  # same stamp or not: no second warning for the same path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reg.select(CUDA, x(3000)).name == "cuda"


def test_validate_names_what_is_wrong():
    assert results.validate({"format": results.FORMAT}) != []
    bad = results.validate({"format": results.FORMAT, "version": 1, "machine": {"gpu": "g", "cc": "9.0"},
                            "rows": [{"op": "x", "mode": "sideways"}], "dispatch": {},
                            "triton_efficiency": {"value": 3.0}})
    assert any("mode" in b for b in bad) and any("triton_efficiency" in b for b in bad)


def test_variants_count_for_their_backend(env, tmp_path):
    reg = registry()
    path = results_file(tmp_path / "r.json", dispatch=entry(reg.op, (x(),), **{"triton:fused": 1.0, "cuda": 2.0}))
    data = results.load(path)
    assert results.fastest(data, reg.op, tune.bucket((x(),)), ["cuda", "triton"]) == "triton"
    assert results.fastest(data, reg.op, tune.bucket((x(),)), ["cuda", "torch"]) == "cuda"


def test_model_takes_the_measured_efficiency_from_an_h100_results_file(env, tmp_path, monkeypatch):
    assert perf.triton_efficiency_source() == (perf.TRITON_EFFICIENCY, "assumed, no GPU measurement")
    results_file(tmp_path / "a100.json", gpu="NVIDIA A100-SXM4-80GB", cc="8.0", efficiency=0.5)
    results_file(tmp_path / "h200.json", gpu="NVIDIA H200", efficiency=0.82)
    monkeypatch.setenv("PYFASTPEFT_RESULTS", str(tmp_path))
    e, src = perf.triton_efficiency_source("h100")
    assert e == 0.82 and "h200.json" in src
    counts = perf.Counts([perf.Launch("triton:gemm", 10 ** 12, 10, torch.bfloat16, tensor_core=True)])
    rl = perf.roofline(counts)
    assert rl.triton_efficiency == 0.82 and "measured" in rl.label
    monkeypatch.setenv("PYFASTPEFT_TRITON_EFFICIENCY", "0.6")  # the explicit variable still wins
    assert perf.triton_efficiency() == 0.6 and perf.roofline(counts).efficiency_source == "PYFASTPEFT_TRITON_EFFICIENCY"


def test_a_file_without_an_efficiency_leaves_the_assumed_figure(env, tmp_path, monkeypatch):
    results_file(tmp_path / "h100.json", gpu="NVIDIA H100 80GB HBM3", efficiency=None)
    monkeypatch.setenv("PYFASTPEFT_RESULTS", str(tmp_path))
    assert perf.triton_efficiency() == perf.TRITON_EFFICIENCY
