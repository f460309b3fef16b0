"""``pyfastpeft bench --report``: results JSON files in, a markdown report with source tags and PNGs out."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pyfastpeft.tools.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _bench_layout(p: Path) -> bool:
    rows = json.loads(p.read_text()).get("rows") or []
    return bool(rows) and all({"provider", "mode", "workload"} <= set(r) for r in rows)


BENCH_FILES = sorted(p for p in RESULTS.glob("*.json") if _bench_layout(p))


def _demo_json() -> dict:
    rows = [{"model": "vit", "method": "lora", "impl": impl, "status": "ok", "loss_first": 2.5, "loss_last": 2.25,
             "step_ms": ms, "trainable_params": 1234, "saved_bytes": 3 * 2**20, "note": ""}
            for impl, ms in (("pyfastpeft", 21.75), ("peft", 25.5))]
    return {"metadata": {"command": "pyfastpeft demo --quick", "device_name": "cpu-test"}, "rows": rows,
            "curves": {"vit/lora/pyfastpeft": [2.5, 2.25], "vit/lora/peft": [2.5, 2.25]}, "notes": []}


@pytest.mark.skipif(not BENCH_FILES, reason="no `pyfastpeft bench` results file in benchmarks/results")
def test_report_tags_every_number_with_its_file_and_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench_files = BENCH_FILES
    for p in bench_files:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "zz-demo.json").write_text(json.dumps(_demo_json()))
    family = {"meta": {"command": "python benchmarks/bench_family.py --quick", "torch": "x"},
              "rows": [{"workload": "w1", "m": 4, "cpu_ms_ours": 12.3456, "cpu_ours_over_frozen": 1.5}]}
    (tmp_path / "family.json").write_text(json.dumps(family))
    (tmp_path / "other.json").write_text(json.dumps({"something": 1}))
    assert main(["bench", "--report", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "REPORT.md").read_text()
    assert md in capsys.readouterr().out
    data = json.loads(bench_files[0].read_text())
    source = re.search(r"^(\[\d+\]) `[^`]*" + re.escape(bench_files[0].name) + r"`: (.*)$", md, re.M)
    assert source, md
    tag = source.group(1)
    assert f"`{data['metadata']['command']}`" in source.group(2)  # the command that wrote the file
    timed = [r for r in data["rows"] if r.get("ms_p50") is not None and r["mode"] == "fwd+bwd"]
    assert timed
    for r in timed:  # each measured number appears in a row tagged with its file
        line = next(ln for ln in md.splitlines() if f"| {r['provider']} |" in ln and r["workload"] in ln)
        assert f"{r['ms_p50']:.3f}" in line and line.rstrip().endswith(f"{tag} |")
    assert "| vit | lora | pyfastpeft | 2.500 | 2.250 | 21.8 | 1,234 | 3.00 |" in md
    assert "other.json: skipped" in md
    fam = re.search(r"^(\[\d+\]) `[^`]*family.json`: `python benchmarks/bench_family.py --quick`", md, re.M)
    assert fam and f"| w1 | 4 | 12.35 | 1.5 | {fam.group(1)} |" in md  # any family's layout: every column
    assert (tmp_path / "report-family.png").is_file()
    assert (tmp_path / f"report-{bench_files[0].stem}.png").stat().st_size > 10_000
    assert (tmp_path / "report-zz-demo.png").is_file()


def test_report_without_results_is_an_error(tmp_path, capsys):
    assert main(["bench", "--report", "--out", str(tmp_path)]) == 2
    assert "no bench or demo results" in capsys.readouterr().err
    assert main(["bench", "--report", "--out", str(tmp_path / "missing")]) == 2
