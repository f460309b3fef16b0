"""pytest-benchmark suite: LoRA linear fwd+bwd on CPU-sized workloads, fp32.

Providers: ``frozen`` (F.linear, frozen weight: the target), ``pyfastpeft-torch`` (our torch backend,
forced, PYFASTPEFT_STRICT=1) and ``peft`` (a real PEFT ``lora.Linear`` with the same weights). Each
provider passes the correctness gate (output and gradients vs the fp64 reference) before it is timed.
No timing assertions: the numbers are evidence, grouped per workload.

    pytest benchmarks/bench_lora_linear.py
    PYFASTPEFT_BENCH_FULL=1 pytest benchmarks/bench_lora_linear.py   # all 18 workloads at M / 16

Workloads come from ``benchmarks/shapes.py`` (= ``pyfastpeft.tools.bench``); by default the quick subset.
pytest-benchmark times each provider in its own test (not interleaved); ``pyfastpeft bench`` is the
interleaved timer.
"""
import os

import pytest
import torch

from pyfastpeft.tools import bench
from shapes import lora_workloads

FULL = os.environ.get("PYFASTPEFT_BENCH_FULL", "0") == "1"
WORKLOADS = lora_workloads("cpu", quick=not FULL)
PROVIDERS = ["frozen", "pyfastpeft-torch", "peft"]
DEVICE = torch.device("cpu")
DTYPE = torch.float32


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_STRICT", "1")


@pytest.fixture(scope="module")
def workload_data():
    cache = {}

    def get(w):
        if w not in cache:
            inp = bench.make_inputs(w, DTYPE, DEVICE)
            cache.clear()  # one workload's tensors alive at a time
            cache[w] = (inp, bench.reference(inp, w, DTYPE))
        return cache[w]

    return get


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.label.replace(" ", "_") for w in WORKLOADS])
def test_lora_linear_fwd_bwd(benchmark, workload, provider, workload_data):
    inp, ref = workload_data(workload)
    try:
        p = bench.provider_table(DEVICE)[provider](inp, device=DEVICE)
    except bench.Skip as e:
        pytest.skip(str(e))
    if provider != "frozen":
        bad = bench.gate(p, ref, workload)
        assert bad is None, f"{provider} failed the correctness gate: {bad}"
    t = bench.mode_callable(p, "fwd+bwd", ref.gy)
    benchmark.group = workload.label
    benchmark.extra_info.update(dict(provider=provider, M=workload.M, K=workload.K, N=workload.N, R=workload.R,
                                     dtype="fp32", mode="fwd+bwd",
                                     gflop=bench.flops(workload, "frozen" if provider == "frozen" else "lora",
                                                       "fwd+bwd") / 1e9))

    def reset():
        for leaf in t.leaves:
            leaf.grad = None

    benchmark.pedantic(t.call, setup=reset, rounds=10, iterations=1, warmup_rounds=2)
