"""The plots read as they claim: built headless (Agg) from small synthetic data, checked on the Axes objects.

Demo: every line and bar has its implementation's colour and the legend shows exactly those colours; step
times are on a log axis. Report: axes labelled; lower-is-better and higher-is-better ratios never share an
axis, and each panel's title says which way is better."""
from __future__ import annotations

from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from pyfastpeft.tools import bench, demo, report, timing  # noqa: E402


def _demo_result() -> dict:
    rows, curves = [], {}
    for model in ("vit", "llama"):
        for method, ms in (("lora", 20.0), ("oft", 900.0), ("atoms", 15.0)):  # one run far slower than the rest
            impls = ("pyfastpeft", "peft") if method != "atoms" else ("pyfastpeft",)
            for impl in impls:
                t = ms if impl == "pyfastpeft" else 0.8 * ms
                noisy_run = method == "lora" and impl == "peft"
                rows.append(dict(model=model, method=method, impl=impl, status="ok", loss_first=2.0, loss_last=1.5,
                                 step_ms=t, step_ms_p20=t * (0.7 if noisy_run else 0.98),
                                 step_ms_p80=t * (1.3 if noisy_run else 1.02), trainable_params=100,
                                 saved_bytes=2**20 * (1.0 if impl == "pyfastpeft" else 1.2), note=""))
                curves[f"{model}/{method}/{impl}"] = [2.0, 1.8, 1.6, 1.5]
    return {"metadata": {"device_name": "cpu-test"}, "rows": rows, "curves": curves, "notes": []}


def _same(a, b) -> bool:
    return to_rgba(a) == pytest.approx(to_rgba(b))


def test_demo_figure_colours_match_the_legend_and_step_times_are_log():
    result = _demo_result()
    fig = demo.figure(result)
    try:
        axes = fig.axes
        assert len(axes) == 6  # 2 models x (loss, step time, saved bytes)
        for ax in axes:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        impl_of_name = {v: k for k, v in demo.IMPL_NAMES.items()}
        for row in range(2):
            loss, step, saved = axes[3 * row: 3 * row + 3]
            # loss curves: each line in its implementation's colour, and its legend entry in the same colour
            lines = loss.get_lines()
            assert len(lines) == 5
            leg = loss.get_legend()
            handles = dict(zip([t.get_text() for t in leg.get_texts()], leg.legend_handles))
            for line in lines:
                impl = impl_of_name[line.get_label().rsplit("(", 1)[1].rstrip(")")]
                assert _same(line.get_color(), demo.IMPL_COLORS[impl]), line.get_label()
                assert _same(handles[line.get_label()].get_color(), line.get_color()), line.get_label()
            # bars: each in its implementation's colour; the legend's patches carry exactly those colours
            for ax in (step, saved):
                leg = ax.get_legend()
                legend_colour = {t.get_text(): h.get_facecolor() for t, h in zip(leg.get_texts(), leg.legend_handles)}
                assert {"pyfastpeft", "PEFT"} <= set(legend_colour)
                for name, impl in impl_of_name.items():
                    assert _same(legend_colour[name], demo.IMPL_COLORS[impl])
                labels = [t.get_text() for t in ax.get_xticklabels()]
                bars = [p for p in ax.patches]
                assert len(bars) == len(labels) == 5
                for lab, bar in zip(labels, bars):
                    impl = "peft" if lab.endswith("(PEFT)") else "pyfastpeft"
                    assert _same(bar.get_facecolor()[:3] + (1.0,), demo.IMPL_COLORS[impl]), lab
            assert step.get_yscale() == "log"  # the 900 ms run does not squash the 15-20 ms ones
            assert saved.get_yscale() == "linear"
            lo, hi = step.get_ylim()
            assert lo > 0 and hi > 900
            # the noisy PEFT lora run is hatched and the legend says what that means
            hatched = [p for p in step.patches if p.get_hatch()]
            assert len(hatched) == 1
            assert timing.LEGEND in [t.get_text() for t in step.get_legend().get_texts()]
        assert "blue" in fig._suptitle.get_text() and "gray" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_demo_plot_writes_a_png(tmp_path):
    assert demo.plot(_demo_result(), tmp_path / "d.png") is None
    assert (tmp_path / "d.png").stat().st_size > 10_000


def _family_source() -> report.Source:
    rows = [dict(workload=f"w{i}", m=4, fraction=f, cpu_ms_ours=10.0 + i, cpu_ours_over_frozen=1.2 + 0.1 * i,
                 cpu_ours_over_frozen_noisy=(i == 1), h100_seed_over_ours=2.0 + i, modeled_vs_frozen=1.1,
                 speedup_exact=3.0, weird_ratio_thing=0.7)
            for i, f in enumerate((1.0, 0.5))]
    return report.Source(1, Path("family.json"), "table", {"meta": {}, "rows": rows})


def test_ratio_direction_from_column_names():
    d = report.ratio_direction
    assert d("cpu_ours_over_frozen") == "lower" and d("h100_ours_over_frozen") == "lower"
    assert d("cpu_seed_over_ours") == "higher" and d("modeled_peft_over_ours") == "higher"
    assert d("cpu_ours_over_peft") == "lower" and d("modeled_vs_frozen") == "lower"
    assert d("ratio_to_frozen") == "lower" and d("modeled_x_frozen") == "lower"
    assert d("exact_speedup_cpu") == "higher"
    assert d("weird_ratio_thing") is None and d("a_over_b") is None


def test_report_figure_keeps_the_two_ratio_kinds_on_separate_axes():
    src = _family_source()
    fig = report.generic_figure(src)
    try:
        titles = {ax.get_title(): ax for ax in fig.axes}
        lower = next(ax for t, ax in titles.items() if "lower is better" in t)
        higher = next(ax for t, ax in titles.items() if "higher is better" in t)
        unknown = next(ax for t, ax in titles.items() if "direction not known" in t)
        assert len(fig.axes) == 3 and len({id(lower), id(higher), id(unknown)}) == 3

        def series(ax):
            return {t.get_text() for t in ax.get_legend().get_texts()} - {timing.LEGEND}

        assert series(lower) == {"cpu_ours_over_frozen", "modeled_vs_frozen"}
        assert series(higher) == {"h100_seed_over_ours", "speedup_exact"}
        assert series(unknown) == {"weird_ratio_thing"}
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel()
            assert {report.ratio_direction(s) for s in series(ax)} in ({"lower"}, {"higher"}, {None})
        # the one noisy CPU ratio is hatched, and said so in its panel's legend
        assert len([p for p in lower.patches if p.get_hatch()]) == 1
        assert timing.LEGEND in [t.get_text() for t in lower.get_legend().get_texts()]
        assert not [p for p in higher.patches if p.get_hatch()]
        # rows are told apart by their settings, floats included
        assert any("fraction=0.5" in t.get_text() for t in lower.get_xticklabels())
    finally:
        plt.close(fig)


def test_bench_figure_panels_are_labelled_and_say_lower_is_better():
    rows = []
    for wl in ("a 8x8 r1", "b 16x16 r2"):
        for prov, ms, sb, mod in (("frozen", 10.0, 0.0, 1.0), ("pyfastpeft-torch", 12.0, 10.0, None),
                                  ("peft", 15.0, 10.0, 2.0)):
            rows.append(dict(op="lora_linear", workload=wl, M=64, dtype="fp32", mode="fwd+bwd", provider=prov,
                             ms_p50=ms, ms_p20=0.98 * ms, ms_p80=1.02 * ms, ratio_to_frozen=ms / 10.0,
                             ratio_to_peft=ms / 15.0, saved_bytes_per_token=sb, modeled_h100_ms=mod, status="ok"))
    fig = bench.figure(rows, title="t")
    try:
        assert len(fig.axes) == 3
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel()
            assert "lower is better" in ax.get_title()
        assert "MODELED" in fig.axes[2].get_title()
        # whiskers (p20-p80) drawn on the measured panel
        assert fig.axes[0].collections
    finally:
        plt.close(fig)
