"""``pyfastpeft bench --device cuda --smoke`` without a GPU: it refuses cleanly on a CPU, and its stages,
timing and results-file logic run on CPU tensors with a fake timer, fake subprocesses and a fake GPU name."""
from __future__ import annotations

import json

import pytest
import torch

import pyfastpeft
from pyfastpeft.core import backend as B
from pyfastpeft.core import results, tune
from pyfastpeft.tools import bench, cli, smoke
from tests.core.test_tune import IDENT

TINY = bench.LinearWorkload("tiny", 16, 32, 24, 4, 16)  # one program per Triton kernel in the interpreter
TIMES = {"frozen": 0.8, "torch": 1.0, "triton": 2.0, "gemm/cublas": 0.5, "gemm/triton": 0.8}


class Timer:
    def __init__(self, times=TIMES, spread=0.05):
        self.times, self.spread, self.seen = times, spread, []

    def __call__(self, fn, what, leaves=()):
        self.seen.append(what)
        key = what if what.startswith("gemm/") else what.rsplit("/", 1)[1]
        t = self.times[key]
        return t, t * (1 - self.spread / 2), t * (1 + self.spread / 2)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    (tmp_path / "checkout" / "tests").mkdir(parents=True)
    (tmp_path / "checkout" / "setup.py").write_text("")
    calls = []

    def run(cmd, env, timeout, cwd):
        calls.append((list(cmd), env, timeout))
        return (0, "building...\nok") if "setup.py" in cmd else (0, "..s.\n3 passed, 1 skipped in 2.0s")

    monkeypatch.setattr(smoke.hooks, "cuda_available", lambda: True)
    monkeypatch.setattr(smoke.hooks, "identity", lambda device: dict(IDENT))
    monkeypatch.setattr(smoke.hooks, "run", run)
    monkeypatch.setattr(smoke.hooks, "nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(smoke.hooks, "root", tmp_path / "checkout")
    monkeypatch.setattr(smoke.hooks, "timer", Timer())
    for var in ("PYFASTPEFT_RESULTS", "PYFASTPEFT_TUNE", "PYFASTPEFT_BACKEND", "PYFASTPEFT_TRITON_EFFICIENCY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(results, "PACKAGE_DIR", tmp_path / "shipped")
    tune.clear_memory()
    yield calls
    tune.clear_memory()


@pytest.mark.parametrize("argv", [["bench", "--smoke", "--device", "cpu"], ["bench", "--device", "cpu", "--smoke"]])
def test_smoke_on_a_cpu_fails_cleanly(argv, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_smoke_without_cuda_even_when_asked_for_cuda(monkeypatch, capsys):
    monkeypatch.setattr(smoke.hooks, "cuda_available", lambda: False)
    assert smoke.main("cuda", None, None) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_smoke_writes_one_results_file_the_dispatch_and_the_model_read(fake, tmp_path, monkeypatch):
    # the other ops at their largest check case: torch only (Triton's interpreter would take minutes there)
    code, path = smoke.smoke(torch.device("cpu"), tmp_path / "out", 300, lora_workloads=[TINY], ops=["cayley"],
                             dtype=torch.float32, backends=["torch"])
    assert code == 0 and path == tmp_path / "out" / "smoke-fake-gpu.json"
    data = json.loads(path.read_text())
    assert results.validate(data) == [] and data["machine"] == IDENT
    build, tests = data["stages"]["build"], data["stages"]["tests"]
    assert build["status"] == "built" and fake[0][1]["PYFASTPEFT_BUILD_CUDA"] == "1"
    assert fake[0][1]["TORCH_CUDA_ARCH_LIST"] == "9.0"  # the GPU's own architecture only
    assert (tests["status"], tests["passed"], tests["skipped"], tests["failed"]) == ("passed", 3, 1, 0)
    assert fake[1][0][-4:-1] == ["-m", "gpu", "-q"] or "gpu" in fake[1][0]
    rows = {(r["op"], r["provider"], r["mode"]): r for r in data["rows"]}
    # every runnable LoRA backend here (torch; triton under the interpreter) against frozen, in every mode
    here = pyfastpeft.available_backends("lora_linear", torch.device("cpu"))
    for prov in ["frozen", *here]:
        for mode in smoke.MODES:
            assert rows[("lora_linear", prov, mode)]["status"] == "ok", rows[("lora_linear", prov, mode)]
    assert rows[("lora_linear", "torch", "fwd+bwd")]["ratio_to_frozen"] == pytest.approx(1.0 / 0.8)
    assert rows[("lora_linear", "torch", "fwd")]["spread"] == pytest.approx(0.05)
    assert {r["mode"] for r in data["rows"] if r["op"] == "cayley" and r["status"] == "ok"} == set(smoke.MODES)
    assert any(e["op"].startswith("cayley") for e in data["dispatch"].values())
    # the dispatch table is keyed by primitive and shape bucket, as the dispatch looks it up
    fwd = [e for e in data["dispatch"].values() if e["op"] == "lora_linear_fwd"]
    bwd = [e for e in data["dispatch"].values() if e["op"] == "lora_linear_bwd"]
    assert len(fwd) == 1 and len(bwd) == 1 and fwd[0]["fastest"] == "torch"
    assert set(fwd[0]["times_ms"]) == set(here)
    # the measured Triton efficiency: the fused forward's FLOP rate over cuBLAS's
    if "triton" in here:
        from pyfastpeft.triton_kernels.lora._lora_linear_cost import fwd_cost

        flops = fwd_cost(TINY.M, TINY.N, TINY.K, TINY.R, 4, has_bias=True, has_xl=False)["flops"]
        want = (flops / 0.8) / (2 * TINY.M * TINY.N * TINY.K / 0.5)
        assert data["triton_efficiency"]["value"] == pytest.approx(want, rel=1e-3)

    # the file feeds the dispatch: measuring off, this "GPU" takes the file's fastest backend (torch here,
    # though triton comes first in LoRA's preference order)
    monkeypatch.setenv("PYFASTPEFT_RESULTS", str(path))
    monkeypatch.setenv("PYFASTPEFT_TUNE", "0")
    monkeypatch.setattr(tune.hooks, "identity", lambda device: dict(IDENT))
    monkeypatch.setattr(tune.hooks, "measurable_device", lambda device: True)
    inp = bench.make_inputs(TINY, torch.float32, torch.device("cpu"))
    pyfastpeft.lora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], 2.0)
    if len(here) > 1:
        assert B.last_backend("lora_linear_fwd") == "torch"
        assert "smoke-fake-gpu.json" in B.last_choice("lora_linear_fwd")


def test_a_spent_budget_skips_stages_with_a_reason_and_still_writes_the_file(fake, tmp_path):
    code, path = smoke.smoke(torch.device("cpu"), tmp_path, 0.0, lora_workloads=[TINY], ops=[], dtype=torch.float32)
    data = json.loads(path.read_text())
    assert results.validate(data) == []
    for stage in ("build", "tests"):
        assert data["stages"][stage]["status"] == "skipped" and "budget" in data["stages"][stage]["why"]
    assert data["rows"] and all(r["status"].startswith("skipped: time budget") for r in data["rows"])
    assert data["triton_efficiency"]["value"] is None and data["dispatch"] == {}
    assert fake == []  # nothing was run


def test_failed_build_is_reported_and_failed_tests_fail_the_command(fake, tmp_path, monkeypatch):
    def run(cmd, env, timeout, cwd):
        return (1, "x.cu(3): error: bad\nerror: command nvcc failed") if "setup.py" in cmd else \
            (1, "F..\n1 failed, 2 passed in 3.1s")

    monkeypatch.setattr(smoke.hooks, "run", run)
    code, path = smoke.smoke(torch.device("cpu"), tmp_path, 300, lora_workloads=[TINY], ops=[], dtype=torch.float32)
    data = json.loads(path.read_text())
    assert data["stages"]["build"]["status"] == "failed" and "nvcc failed" in data["stages"]["build"]["why"]
    assert (data["stages"]["tests"]["status"], data["stages"]["tests"]["failed"]) == ("failed", 1)
    assert code == 1


def test_noisy_timings_are_flagged_not_ratios(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(smoke.hooks, "timer", Timer(spread=0.5))
    _, path = smoke.smoke(torch.device("cpu"), tmp_path, 300, lora_workloads=[TINY], ops=[], dtype=torch.float32,
                          build=False, tests=False)
    rows = [r for r in json.loads(path.read_text())["rows"] if r.get("ratio_to_frozen") is not None]
    assert rows and all(r["noisy"] and r["ratio_to_frozen_noisy"] for r in rows)
