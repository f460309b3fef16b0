"""Where the tools write by default, and that they list each op once.

``pyfastpeft bench`` / ``demo`` / ``bench --report`` and ``benchmarks/plot.py`` write into ``./pyfastpeft-results/``
(git-ignored) unless told otherwise, so running the README's commands never rewrites the committed
``benchmarks/results/`` files."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pyfastpeft.tools import bench, check, demo, report
from pyfastpeft.tools.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "benchmarks" / "results"


def _git(*args: str) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"git not usable here ({e})")
    if r.returncode not in (0, 1) or "not a git repository" in r.stderr:
        pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    return r


def _tracked() -> set[str]:
    return set(_git("ls-files").stdout.split("\n")) - {""}


def _ignored(rel: Path) -> bool:
    return _git("check-ignore", "-q", "--no-index", str(rel)).returncode == 0


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_untracked(rel: Path, tracked: set[str]) -> None:
    assert not rel.is_absolute(), rel
    assert rel.as_posix() not in tracked, f"{rel} is a committed file"
    assert not rel.as_posix().startswith("benchmarks/results/"), rel
    assert _ignored(rel), f"{rel} is not git-ignored"


def test_bench_default_output_is_not_a_tracked_path():
    tracked = _tracked()
    committed = {p for p in tracked if p.startswith("benchmarks/results/cpu-") and p.endswith("-quick.json")}
    assert committed, "expected committed `pyfastpeft bench --quick` results"
    args = build_parser().parse_args(["bench", "--quick"])  # the README's main command
    out = bench.results_dir(args.out)
    assert args.out is None and out == bench.DEFAULT_OUT_DIR
    stems = {bench.device_name(torch.device("cpu")) + "-quick"} | {Path(p).stem for p in committed}
    for stem in stems:  # this machine's name, and the names of the committed files
        paths = bench.result_paths(out, stem)
        assert set(paths) == {"json", "csv", "png"}
        for p in paths.values():
            _assert_untracked(p, tracked)
            assert (COMMITTED / p.name).resolve() != (REPO / p).resolve()


def test_demo_and_report_default_outputs_are_not_tracked_paths():
    tracked = _tracked()
    args = build_parser().parse_args(["demo", "--quick"])
    assert args.out is None
    d = demo.out_dir(args.out)
    assert d == bench.DEFAULT_OUT_DIR / "demo"
    for name in ("demo.json", "demo.csv", "demo.png"):
        _assert_untracked(d / name, tracked)
    assert "benchmarks/results/demo-cpu-quick/demo.json" in tracked
    results, md = report.default_paths(None, None)
    assert results == bench.COMMITTED_RESULTS_DIR  # the report reads the committed results ...
    _assert_untracked(md, tracked)  # ... and writes beside none of them
    _assert_untracked(md.parent / "report-cpu-amd-epyc-quick.png", tracked)
    assert report.default_paths("some/dir", None) == (Path("some/dir"), Path("some/dir/REPORT.md"))


def test_bench_without_out_writes_into_the_untracked_folder(tmp_path, monkeypatch, capsys):
    before = _digest(COMMITTED)
    monkeypatch.chdir(tmp_path)  # the default is relative to the working directory
    rc = main(["bench", "--tiny", "--device", "cpu", "--budget", "0.01", "--providers", "frozen,pyfastpeft-torch",
               "--modes", "fwd", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    stem = bench.device_name(torch.device("cpu")) + "-tiny"
    for p in bench.result_paths(bench.DEFAULT_OUT_DIR, stem).values():
        if p.suffix == ".png" and "no PNG" in out:
            continue
        assert (tmp_path / p).is_file(), p
        assert f"wrote {p}" in out
    assert "results are in pyfastpeft-results/" in out and "--out benchmarks/results" in out
    assert sorted(q.name for q in tmp_path.iterdir()) == ["pyfastpeft-results"]
    assert _digest(COMMITTED) == before


def test_report_without_out_reads_committed_and_writes_elsewhere(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    src = next(p for p in sorted(COMMITTED.glob("cpu-*-quick.json")))
    res = tmp_path / "benchmarks" / "results"
    res.mkdir(parents=True)
    shutil.copy(src, res / src.name)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--report"]) == 0
    assert "wrote pyfastpeft-results/REPORT.md" in capsys.readouterr().out
    assert sorted(p.name for p in res.iterdir()) == [src.name]  # nothing written beside the committed file
    assert (tmp_path / "pyfastpeft-results" / "REPORT.md").is_file()
    assert (tmp_path / "pyfastpeft-results" / f"report-{src.stem}.png").is_file()


def test_plot_script_does_not_overwrite_the_committed_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("bench_plot_script", REPO / "benchmarks" / "plot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = next(p for p in sorted(COMMITTED.glob("cpu-*-quick.json")))
    copy = tmp_path / "in" / src.name
    copy.parent.mkdir()
    shutil.copy(src, copy)
    monkeypatch.chdir(tmp_path)
    assert mod.main([str(copy)]) == 0
    assert not copy.with_suffix(".png").exists()  # not beside its input (the committed PNG's place)
    assert (tmp_path / "pyfastpeft-results" / f"{src.stem}.png").is_file()


# ----------------------------------------------------------------------------------------------------
# each op listed once
# ----------------------------------------------------------------------------------------------------
def _section(out: str, header: str) -> list[str]:
    lines = out.splitlines()
    i = lines.index(header)
    body = []
    for line in lines[i + 1:]:
        if not line.startswith("  "):
            break
        body.append(line)
    return body


def test_info_lists_each_op_once(capsys):
    from pyfastpeft.families import ops

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    avail = [line.strip().split(":", 1)[0] for line in _section(out, "backends available here")]
    assert avail and len(avail) == len(set(avail)), avail
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    assert sorted(avail) == sorted(f"{op} on {d}" for op in ops() for d in devs)
    details = _section(out, "backend details (pyfastpeft.backend_info)")
    j = next(k for k, line in enumerate(details) if line.strip() == "ops:")
    indent = len(details[j + 1]) - len(details[j + 1].lstrip())
    prims = [line.strip() for line in details[j + 1:] if len(line) - len(line.lstrip()) == indent]
    assert prims and len(prims) == len(set(prims)), prims


def test_check_unknown_op_lists_each_known_op_once(capsys):
    assert main(["check", "--op", "nope"]) == 2
    err = capsys.readouterr().err
    listed = [o.strip() for o in err.split("choose from", 1)[1].split(",")]
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == {c.op for c in check.CHECKS}


def test_bench_json_records_the_spread(tmp_path):
    rc = main(["bench", "--tiny", "--device", "cpu", "--budget", "0.01", "--providers", "frozen,pyfastpeft-torch",
               "--modes", "fwd", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    timed = [r for r in data["rows"] if r["ms_p50"] is not None]
    assert timed
    for r in timed:
        assert r["spread"] == pytest.approx((r["ms_p80"] - r["ms_p20"]) / r["ms_p50"])
        assert r["noisy"] == (r["spread"] > 0.20)
        assert r["ratio_to_frozen_noisy"] in (True, False)
