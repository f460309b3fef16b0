"""The spread rule: a CPU timing whose (p80 - p20) / median exceeds 20 % is flagged (not a result) in every table
``bench`` prints and writes, in its plot, and in the benchmark scripts' tables; a ratio that uses a flagged timing
is shown flagged, never as a plain ratio. Synthetic rows only."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pyfastpeft.tools import bench, demo, report, timing

REPO = Path(__file__).resolve().parents[2]


def test_spread_and_flag_of_one_timing():
    assert timing.spread(10.0, 9.5, 11.0) == pytest.approx(0.15)
    assert not timing.noisy(10.0, 9.5, 11.0)
    assert timing.noisy(10.0, 8.0, 12.5)  # 45 %
    assert timing.spread(None, 1.0, 2.0) is None and not timing.noisy(None, 1.0, 2.0)
    assert timing.spread(0.0, 0.0, 0.0) is None
    t = timing.Timing(0.010, 0.008, 0.0125, 9)
    assert t.spread == pytest.approx(0.45) and t.noisy
    assert not timing.Timing(0.010, 0.0099, 0.0101, 9).noisy
    assert timing.any_noisy([None, (1.0, 0.99, 1.01), t]) and not timing.any_noisy([(1.0, 0.99, 1.01)])
    assert timing.ratio_text(1.2345, False) == "1.23"
    assert timing.ratio_text(1.2345, True) == "(1.23)!" and timing.FLAG == "!"
    assert timing.spread_text(0.31) == "31 % !" and timing.spread_text(0.05) == "5 %"
    assert timing.spread_text(None) == "?"
    assert "not a result" in timing.FOOTNOTE and "20 %" in timing.FOOTNOTE and "20 %" in timing.LEGEND


def _row(wl: str, prov: str, p50: float, p20: float, p80: float, mode: str = "fwd+bwd") -> dict:
    return dict(op="lora_linear", workload=wl, M=64, dtype="fp32", mode=mode, provider=prov, ms_p50=p50, ms_p20=p20,
                ms_p80=p80, status="ok", ratio_to_frozen=None, ratio_to_peft=None, saved_bytes_per_token=None,
                modeled_h100_ms=None)


def _rows() -> list[dict]:
    """Workload a: every timing tight. Workload b: frozen is noisy (45 %); ours is tight; PEFT is tight."""
    rows = [_row("a 8x8 r1", "frozen", 10.0, 9.8, 10.2), _row("a 8x8 r1", "pyfastpeft-torch", 12.0, 11.8, 12.3),
            _row("a 8x8 r1", "peft", 15.0, 14.7, 15.2),
            _row("b 16x16 r2", "frozen", 10.0, 8.0, 12.5), _row("b 16x16 r2", "pyfastpeft-torch", 11.0, 10.9, 11.2),
            _row("b 16x16 r2", "peft", 16.0, 15.5, 16.3),
            _row("c 4x4 r1", "frozen", 10.0, 9.9, 10.1), _row("c 4x4 r1", "pyfastpeft-torch", 20.0, 12.0, 30.0),
            _row("c 4x4 r1", "peft", 15.0, 14.9, 15.1)]
    for wl in ("a 8x8 r1", "b 16x16 r2", "c 4x4 r1"):
        bench._ratios([r for r in rows if r["workload"] == wl])
    return rows


def _get(rows, wl, prov):
    return next(r for r in rows if r["workload"].startswith(wl) and r["provider"] == prov)


def test_ratios_from_a_flagged_row_are_flagged():
    rows = _rows()
    assert not any(_get(rows, "a", p)["noisy"] for p in ("frozen", "pyfastpeft-torch", "peft"))
    assert not any(_get(rows, "a", p)["ratio_to_frozen_noisy"] or _get(rows, "a", p)["ratio_to_peft_noisy"]
                   for p in ("frozen", "pyfastpeft-torch", "peft"))
    b_fz, b_ours, b_peft = (_get(rows, "b", p) for p in ("frozen", "pyfastpeft-torch", "peft"))
    assert b_fz["noisy"] and b_fz["spread"] == pytest.approx(0.45)
    assert not b_ours["noisy"]
    assert b_ours["ratio_to_frozen_noisy"] and b_peft["ratio_to_frozen_noisy"]  # divided by a noisy frozen
    assert not b_ours["ratio_to_peft_noisy"]  # ours / PEFT: both tight
    c_ours, c_peft = _get(rows, "c", "pyfastpeft-torch"), _get(rows, "c", "peft")
    assert c_ours["noisy"] and c_ours["ratio_to_frozen_noisy"] and c_ours["ratio_to_peft_noisy"]
    assert not c_peft["ratio_to_frozen_noisy"]


def test_summary_table_flags_rows_and_ratios():
    text = bench.summary_table(_rows())
    lines = text.splitlines()

    def line(wl, prov):
        return next(ln for ln in lines if ln.startswith(wl) and f" {prov} " in ln)

    a = line("a 8x8", "pyfastpeft-torch")
    assert "12.000" in a and "11.800-12.300" in a and "4 %" in a and " 1.20 " in a and "!" not in a
    b = line("b 16x16", "pyfastpeft-torch")
    assert "(1.10)!" in b and "0.69" in b and "(0.69)" not in b  # x frozen flagged, x peft plain
    bf = line("b 16x16", "frozen")
    assert "10.000 !" in bf and "45 % !" in bf
    c = line("c 4x4", "pyfastpeft-torch")
    assert "20.000 !" in c and "(2.00)!" in c and "(1.33)!" in c
    assert lines[-1] == timing.FOOTNOTE
    clean = bench.summary_table([r for r in _rows() if r["workload"].startswith("a")])
    assert timing.FOOTNOTE not in clean and "!" not in clean
    assert "spread" in lines[0] and "p20-p80" in lines[0]


def test_flags_survive_the_csv_and_are_recomputed_from_any_file(tmp_path):
    rows = _rows()
    path = tmp_path / "r.csv"
    bench.write_csv(rows, path)
    with open(path, newline="") as f:
        head = next(csv.reader(f))
    assert {"spread", "noisy", "ratio_to_frozen_noisy", "ratio_to_peft_noisy"} <= set(head)
    loaded, _ = bench.load_rows(path)
    for r in loaded:  # stale or missing flag columns do not matter: annotate recomputes them
        r.pop("noisy"), r.pop("ratio_to_frozen_noisy")
    bench.annotate(loaded)
    assert [(r["noisy"], r["ratio_to_frozen_noisy"]) for r in loaded] == \
           [(r["noisy"], r["ratio_to_frozen_noisy"]) for r in rows]


def test_bench_plot_hatches_flagged_bars():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = bench.figure(_rows(), title="t")
    try:
        ax = fig.axes[0]
        hatched = [p for p in ax.patches if p.get_hatch() == bench.NOISY_HATCH]
        # flagged ratio_to_frozen: b frozen, b ours, b peft, c ours
        assert len(hatched) == 4
        assert all(p.get_alpha() is not None and p.get_alpha() < 1 for p in hatched)
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert timing.LEGEND in legend
        texts = [t.get_text() for t in ax.texts]
        assert "(2.00)!" in texts and "1.20" in texts  # flagged ratio labelled as such, a clean one plain
        assert "lower is better" in ax.get_title()
        assert ax.get_xlabel() and ax.get_ylabel()
    finally:
        plt.close(fig)
    clean = bench.figure([r for r in _rows() if r["workload"].startswith("a")])
    try:
        ax = clean.axes[0]
        assert not [p for p in ax.patches if p.get_hatch()]
        assert timing.LEGEND not in [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        plt.close(clean)


def test_report_timing_rows_flag_like_the_bench():
    src = report.Source(1, Path("x.json"), "bench", {"metadata": {}, "rows": _rows()})
    rows = {(r[1], r[4]): r for r in report.timing_rows(src)}
    a = rows[("a 8x8 r1", "pyfastpeft-torch")]
    assert a[7] == "12.000 (4 %)" and a[8] == "1.20" and a[9] == "0.80"
    b = rows[("b 16x16 r2", "pyfastpeft-torch")]
    assert b[8] == "(1.10)!" and b[9] == "0.69"
    assert rows[("b 16x16 r2", "frozen")][7] == "10.000 (45 % !)"


def test_demo_table_flags_noisy_step_times():
    def run(method, impl, ms, lo, hi):
        return dict(model="vit", method=method, impl=impl, status="ok", loss_first=2.0, loss_last=1.5, step_ms=ms,
                    step_ms_p20=lo, step_ms_p80=hi, trainable_params=10, saved_bytes=2**20, note="")

    rows = [run("lora", "pyfastpeft", 20.0, 19.5, 20.5), run("lora", "peft", 10.0, 9.9, 10.1),
            run("oft", "pyfastpeft", 20.0, 10.0, 30.0), run("oft", "peft", 10.0, 9.9, 10.1)]
    text = demo.summary_table(rows)
    lora = next(ln for ln in text.splitlines() if " lora " in ln and "pyfastpeft" in ln)
    oft = next(ln for ln in text.splitlines() if " oft " in ln and "pyfastpeft" in ln)
    assert " 2.00 " in lora and "!" not in lora
    assert "20.0 !" in oft and "100 % !" in oft and "(2.00)!" in oft
    assert text.splitlines()[-1] == timing.FOOTNOTE


def _script(name: str):
    bdir = str(REPO / "benchmarks")
    if bdir not in sys.path:
        sys.path.insert(0, bdir)
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_atoms_script_table_flags_cpu_ratios():
    mod = _script("bench_atoms")
    base = dict(m=4, m1=0, saved_frozen=1e6, saved_ours=1e6, saved_seed=1e6, h100_ours_over_frozen=1.3,
                h100_seed_over_ours=2.5, cpu_seed_over_ours=1.85, cpu_ours_over_frozen=1.94, cpu_spread_frozen=0.05,
                cpu_spread_ours=0.08, cpu_spread_seed=0.06, cpu_seed_over_ours_noisy=False,
                cpu_ours_over_frozen_noisy=False)
    noisy = dict(base, cpu_spread_seed=0.4, cpu_seed_over_ours_noisy=True)
    text = mod.markdown([dict(base, workload="clean"), dict(noisy, workload="noisy")], [])
    clean_line = next(ln for ln in text.splitlines() if "| clean |" in ln)
    noisy_line = next(ln for ln in text.splitlines() if "| noisy |" in ln)
    assert "| 1.85x | 1.94x |" in clean_line and "!" not in clean_line
    assert "| (1.85x)! | 1.94x |" in noisy_line and "40 % !" in noisy_line
    assert text.splitlines()[-1] == timing.FOOTNOTE
    assert timing.FOOTNOTE not in mod.markdown([dict(base, workload="clean")], [])


def test_gated_script_table_flags_cpu_ratios():
    mod = _script("bench_gated_lora")
    base = dict(workload="w", fraction=0.5, modeled_vs_frozen=1.1, modeled_peft_over_ours=1.3, cpu_ours_ms=10.0,
                cpu_peft_ms=9.0, cpu_ours_over_peft=1.111, cpu_ours_spread=0.05, cpu_peft_spread=0.3,
                cpu_ours_over_peft_noisy=True)
    text = mod.summary([base])
    assert "(1.11)!" in text and "30 % !" in text and text.splitlines()[-1] == timing.FOOTNOTE
    text = mod.summary([dict(base, cpu_peft_spread=0.02, cpu_ours_over_peft_noisy=False)])
    assert "1.11" in text and "(1.11)" not in text and timing.FOOTNOTE not in text


def test_subtractive_script_table_flags_cpu_ratios():
    mod = _script("bench_subtractive")
    rows = []
    for p in mod.PROVIDERS:
        rows.append(dict(section="fit-cpu", provider=p, n=100, d_in=8, d_out=8, rows_per_s=1e6, spread=0.05,
                         noisy=False))
    rows.append(dict(section="solve-cpu", provider="fp64 cholesky", n=100, d_in=8, d_out=8, ms_p50=1.0, spread=0.3,
                     noisy=True))
    for name, ms, sp in (("block", 10.0, 0.05), ("block sfp", 8.0, 0.5), ("mlp", 5.0, 0.05), ("filter", 2.0, 0.05)):
        rows.append(dict(section="vit-block", provider=name, params=100, ms_p50_cpu=ms, spread_cpu=sp,
                         noisy_cpu=sp > 0.2, modeled_us_h100=1.0, flops_h100=1e9))
    text = mod.markdown(rows)
    assert "1.0 (30 % !)" in text
    block = next(ln for ln in text.splitlines() if "ratio, block" in ln)
    mlp = next(ln for ln in text.splitlines() if "ratio, MLP alone" in ln)
    assert "(0.80)!" in block and "0.40" in mlp and "(0.40)" not in mlp
    assert text.splitlines()[-1] == timing.FOOTNOTE


def test_orthogonal_script_prints_flagged_ratios():
    mod = _script("bench_orthogonal")
    assert mod._r(1.234, False, "x") == "1.23x" and mod._r(1.234, True, "x") == "(1.23x)!"


def test_timings_in_a_bench_json_are_flagged_in_the_report(tmp_path, capsys):
    from pyfastpeft.tools.cli import main

    data = {"metadata": {"command": "pyfastpeft bench --tiny", "device_name": "cpu-test"}, "rows": _rows()}
    (tmp_path / "r.json").write_text(json.dumps(data))
    assert main(["bench", "--report", "--out", str(tmp_path), "--no-plots"]) == 0
    md = (tmp_path / "REPORT.md").read_text()
    assert "(1.10)!" in md and timing.FOOTNOTE in md
