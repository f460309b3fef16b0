"""The ``pyfastpeft`` command line: info, check (pass and fail), bench (files, columns, progress bar),
compile-report delegation. Everything runs in-process through ``pyfastpeft.tools.cli.main`` on CPU."""
from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import pyfastpeft
from pyfastpeft.core import backend as _backend
from pyfastpeft.tools import bench, check
from pyfastpeft.tools.cli import main


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert pyfastpeft.__version__ in out
    for word in ("python", "triton", "TRITON_INTERPRET", "pyfastpeft._C", "lora_linear on cpu", "devices"):
        assert word in out, word


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "check" in capsys.readouterr().out


def test_check_torch_backend_passes(capsys):
    assert main(["check", "--backend", "torch", "--op", "lora_linear"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("lora_linear")]
    assert len(rows) == 5  # one per case
    assert all(line.rstrip().endswith("PASS") for line in rows), out
    for case in ("odd 37x120->72 r3", "3-D x", "non-contig x", "no bias"):
        assert case in out
    assert "5 passed, 0 failed" in out


def test_check_reports_triton_na_on_cpu(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("triton runs on this machine's GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the backend's device list is read per call
    assert main(["check", "--backend", "triton,torch"]) == 0
    out = capsys.readouterr().out
    assert "TRITON_INTERPRET=1" in out and "skip" in out


def _broken(monkeypatch, prim: str, wrap):
    reg = _backend.REGISTRIES[prim]
    good = reg._impls["torch"]
    monkeypatch.setitem(reg._impls, "torch", dataclasses.replace(good, fn=wrap(good.fn)))


def _wrong_fwd(fn):
    def f(*a):
        y, u = fn(*a)
        return y + 1e-3, u
    return f


def _wrong_bwd(fn):
    def f(*a):
        dx, dxl, da, db = fn(*a)
        return dx, dxl, da * 1.01, db
    return f


@pytest.mark.parametrize("prim,wrap,what", [("lora_linear_fwd", _wrong_fwd, "fwd"),
                                             ("lora_linear_bwd", _wrong_bwd, "dlora_a")])
def test_check_fails_on_a_broken_backend(monkeypatch, capsys, prim, wrap, what):
    _broken(monkeypatch, prim, wrap)
    assert main(["check", "--backend", "torch", "--op", "lora_linear"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and what in out
    assert "0 passed" in out


def test_check_rejects_unknown_names(capsys):
    assert main(["check", "--backend", "nope"]) == 2
    assert main(["check", "--dtype", "fp8"]) == 2
    assert main(["check", "--op", "nope"]) == 2


def test_checks_table_covers_every_op():
    """Every public op of the backend registry has a row in ``pyfastpeft check`` (some have several case
    families, e.g. one-level and recursive atoms), and every row names a registered op."""
    from pyfastpeft.core.backend import REGISTRIES

    # every public name the registry answers to (PSOFT's ops are entries that run on LoRA's registry)
    names = {k[:-4] if k.endswith(("_fwd", "_bwd")) else k for k in REGISTRIES}
    assert {c.op for c in check.CHECKS} == names | {r.public for r in REGISTRIES.values()}
    cases = check.CHECKS[0].cases(torch.device("cpu"), torch.float32)
    assert any(c.noncontig for c in cases) and any(not c.bias for c in cases) and any(c.lead for c in cases)


BENCH_TINY = ["bench", "--tiny", "--device", "cpu", "--budget", "0.01"]


def _peft_ok() -> bool:
    try:
        import peft  # noqa: F401
        return True
    except Exception:
        return False


def test_bench_tiny_writes_results(tmp_path, capsys):
    providers = "frozen,pyfastpeft-torch,peft,ref-eager" if _peft_ok() else "frozen,pyfastpeft-torch,ref-eager"
    assert main(BENCH_TINY + ["--out", str(tmp_path), "--providers", providers]) == 0
    cap = capsys.readouterr()
    stem = bench.device_name(torch.device("cpu")) + "-tiny"
    jpath, cpath, ppath = (tmp_path / f"{stem}.{ext}" for ext in ("json", "csv", "png"))
    assert jpath.exists() and cpath.exists()

    with open(cpath, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        rows = list(reader)
    style_schema = ["op", "provider", "mode", "dtype", "M", "K", "N", "R", "extra_json", "ms_p50", "ms_p20",
                    "ms_p80", "peak_mb", "tflops", "gbps", "gpu_name", "torch", "triton", "cuda", "pyfastpeft",
                    "git_sha", "timestamp"]
    assert bench.COLUMNS[:len(style_schema)] == style_schema
    timed = [r for r in rows if r["status"] == "ok"]
    assert {r["mode"] for r in timed} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["provider"] for r in timed} == set(providers.split(","))
    for r in timed:
        assert float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"])
        assert r["ratio_to_frozen"] != ""
        assert r["op"] == "lora_linear" and r["dtype"] == "fp32" and r["torch"] == torch.__version__
    frozen = [r for r in timed if r["provider"] == "frozen"]
    assert all(float(r["ratio_to_frozen"]) == 1.0 for r in frozen)

    data = json.loads(jpath.read_text())
    for key in ("git_sha", "torch", "triton", "cuda", "cpu_name", "timestamp", "command", "device_name"):
        assert key in data["metadata"], key
    assert "--tiny" in data["metadata"]["command"]
    assert len(data["rows"]) == len(rows)

    try:
        import matplotlib  # noqa: F401
        assert ppath.exists() and ppath.stat().st_size > 1000
        assert ppath.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "matplotlib" in cap.out
    assert "bench" in cap.err and "%|" in cap.err  # the tqdm progress bar
    assert "x frozen" in cap.out and "x peft" in cap.out


def test_bench_gate_blocks_a_wrong_provider(tmp_path, monkeypatch, capsys):
    _broken(monkeypatch, "lora_linear_fwd", _wrong_fwd)
    rc = main(BENCH_TINY + ["--out", str(tmp_path), "--providers", "frozen,pyfastpeft-torch", "--modes", "fwd",
                            "--no-progress"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "FAILED correctness" in out
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    ours = [r for r in data["rows"] if r["provider"] == "pyfastpeft-torch"]
    assert ours and all(r["ms_p50"] is None and r["status"].startswith("FAILED correctness") for r in ours)


def test_bench_unavailable_provider_is_a_skip_row(tmp_path, capsys):
    rc = main(BENCH_TINY + ["--out", str(tmp_path), "--providers", "pyfastpeft-cuda", "--modes", "fwd",
                            "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "skip:" in out
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {r["provider"] for r in data["rows"]} == {"frozen", "pyfastpeft-cuda"}  # frozen always added


def test_cpu_timer_reports_a_provider_that_raises():
    calls = {"ok": bench.Timed(lambda: None, []), "bad": bench.Timed(lambda: 1 / 0, [])}
    res = bench.time_cpu_interleaved(calls, budget_s=0.0, min_rounds=3)
    assert isinstance(res["bad"], ZeroDivisionError)
    p50, p20, p80, samples = res["ok"]
    assert p20 <= p50 <= p80 and len(samples) == 3  # the per-round samples, for paired ratios


def test_bench_plot_roundtrip_from_csv(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for wl in ("a 8x8 r1", "b 16x16 r2"):
        for prov, ratio, sb in (("frozen", 1.0, 0.0), ("pyfastpeft-torch", 1.2, 10.0), ("peft", 1.5, 10.0)):
            rows.append(dict(workload=wl, provider=prov, mode="fwd+bwd", ratio_to_frozen=ratio,
                             saved_bytes_per_token=sb, dtype="fp32", ms_p50=ratio))
    cpath = tmp_path / "r.csv"
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    loaded, _ = bench.load_rows(cpath)
    assert loaded[1]["ratio_to_frozen"] == 1.2
    assert bench.plot(loaded, tmp_path / "r.png") is None
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_workloads_follow_the_spec():
    gpu = bench.lora_workloads("cuda")
    assert len(gpu) == 18
    assert {(w.K, w.N) for w in gpu} == {(4096, 4096), (4096, 14336), (14336, 4096), (768, 768), (768, 3072),
                                         (3072, 768)}
    assert {w.R for w in gpu} == {8, 16, 64}
    assert {w.M for w in gpu} == {8192, 64 * 197}
    cpu = bench.lora_workloads("cpu")
    assert {w.M for w in cpu} == {8192 // 16, 64 * 197 // 16}
    quick = bench.lora_workloads("cpu", quick=True)
    assert [(w.K, w.N, w.R) for w in quick] == [(768, 768, 16), (4096, 4096, 16)]


def test_compile_report_is_delegated(monkeypatch):
    from pyfastpeft.tools import compile_report
    seen = []
    monkeypatch.setattr(compile_report, "main", lambda argv: seen.append(list(argv)) or 7)
    assert main(["compile-report", "--arch", "90", "--json"]) == 7
    assert seen == [["--arch", "90", "--json"]]


def test_python_dash_m_runs():
    r = subprocess.run([sys.executable, "-m", "pyfastpeft", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pyfastpeft info" in r.stdout


@pytest.mark.slow
def test_check_interpret_runs_triton_in_the_interpreter():
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-m", "pyfastpeft", "check", "--interpret", "--backend", "triton"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Triton in the interpreter" in r.stdout and "PASS" in r.stdout


def test_check_gated_all_dtypes_pass(capsys):
    assert main(["check", "--backend", "torch", "--op", "gated_lora_linear", "--dtype", "fp32,fp16,bf16,fp64"]) == 0
    out = capsys.readouterr().out
    assert "20 passed, 0 failed" in out, out
