"""``pyfastpeft bench --report``: the results files in, a markdown performance report and PNG plots out.

Reads every ``*.json`` (and ``*/demo.json``) in the results directory (default ``benchmarks/results``) written by
``pyfastpeft bench`` (``{"metadata", "rows", ...}``; any op) or ``pyfastpeft demo`` (``{"rows", "curves"}``),
and writes ``REPORT.md`` with

* measured timings per workload and provider (median ms of fwd / bwd / fwd+bwd, ratios to the frozen
  layer and to PEFT), as the bench measured them;
* counted and modeled columns (bytes saved for backward per token, modeled H100 fwd+bwd) from
  :func:`pyfastpeft.tools.bench.model_table`;
* the demo runs (loss, step time, trainable parameters, saved bytes) when a demo JSON is there;
* one PNG per results file, drawn by :func:`pyfastpeft.tools.bench.plot` (the same figure ``bench`` writes);
  any other layout's ratio columns in one panel per direction (lower-is-better and higher-is-better ratios
  never share an axis, :func:`ratio_direction`).

Every timing is shown with its spread ``(p80 - p20) / median``; over 20 % it is marked ``!`` (not a result) and a
ratio that uses it is shown ``(x)!`` (:mod:`pyfastpeft.tools.timing`). By default the report reads the committed
``benchmarks/results`` and writes ``REPORT.md`` and the PNGs into ``./pyfastpeft-results/`` (git-ignored);
``--out DIR`` reads ``DIR`` and writes ``DIR/REPORT.md``.

Every table row carries a source tag ``[n]``; the sources list gives, per tag, the results file, the
command that wrote it, the device, versions, git revision and time. Nothing is re-measured.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pyfastpeft.core.table import table
from pyfastpeft.tools import timing

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Source:
    tag: int
    path: Path
    kind: str  # "bench" (pyfastpeft bench's row layout), "demo", or "table" (any other list of flat rows)
    data: dict

    @property
    def meta(self) -> dict:
        return self.data.get("metadata") or self.data.get("meta") or {}

    def line(self, root: Path) -> str:
        m = self.meta
        rel = _rel(self.path, root)
        cmd = m.get("command")
        bits = [f"`{cmd}`" if cmd else "command NOT recorded in the file",
                m.get("device_name") or m.get("device") or "device not recorded"]
        vers = ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "peft", "pyfastpeft") if m.get(k))
        if vers:
            bits.append(vers)
        if m.get("cpu_threads"):
            bits.append(f"CPU threads: {m['cpu_threads']}")
        if m.get("git_sha"):
            bits.append(f"git {str(m['git_sha'])[:10]}")
        if m.get("timestamp"):
            bits.append(str(m["timestamp"]))
        return f"[{self.tag}] `{rel}`: " + "; ".join(bits)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def load_sources(results: Path) -> tuple[list[Source], list[str]]:
    """Every readable bench / demo JSON under ``results`` (sorted by name); notes on files skipped."""
    sources: list[Source] = []
    notes: list[str] = []
    for p in sorted(list(results.glob("*.json")) + list(results.glob("*/demo.json"))):  # demo --out <dir>
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            notes.append(f"{p.name}: skipped (not JSON: {e})")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            notes.append(f"{p.name}: skipped (no 'rows': not a bench or demo results file)")
            continue
        rows = data["rows"]
        if "curves" in data:
            kind = "demo"
        elif rows and all(isinstance(r, dict) and {"provider", "mode", "workload"} <= set(r) for r in rows):
            kind = "bench"
        elif rows and all(isinstance(r, dict) for r in rows):
            kind = "table"
        else:
            notes.append(f"{p.name}: skipped (empty or not a list of rows)")
            continue
        sources.append(Source(len(sources) + 1, p, kind, data))
    return sources, notes


def _f(v: Any, fmt: str) -> str:
    return "–" if v is None or v == "" else format(v, fmt)


def _ms_cell(r: Optional[dict]) -> str:
    """``"18.034 (9 %)"``: the median with its spread (p80 - p20) / median; ``"54.535 (58 %) !"`` over the limit."""
    if not r or r.get("ms_p50") in (None, ""):
        return "–"
    from pyfastpeft.tools import bench

    s = bench.row_spread(r)
    return f"{float(r['ms_p50']):.3f}" + ("" if s is None else f" ({timing.spread_text(s)})")


def timing_rows(src: Source) -> list[list[str]]:
    """Per (op, workload, provider) with a timing: ms p50 (spread) per mode and the fwd+bwd ratios; a timing
    whose spread exceeds 20 % is marked ``!`` and a ratio that uses one is shown ``(x)!``."""
    from pyfastpeft.tools import bench

    rows = bench.annotate([dict(r) for r in src.data["rows"]])
    acc: dict[tuple, dict] = {}
    for r in rows:
        if r.get("ms_p50") in (None, ""):
            continue
        key = (r.get("op", "?"), r.get("workload", "?"), r.get("provider", "?"))
        e = acc.setdefault(key, {"dtype": r.get("dtype"), "M": r.get("M")})
        e[r.get("mode", "fwd+bwd")] = r
    out = []
    for (op, wl, prov), e in acc.items():
        full = e.get("fwd+bwd", {})
        out.append([op, wl, f"M={e['M']}" if e.get("M") is not None else "–", e.get("dtype") or "–", prov,
                    *(_ms_cell(e.get(m)) for m in MODES),
                    timing.ratio_text(bench._num(full.get("ratio_to_frozen")), bool(full.get("ratio_to_frozen_noisy")),
                                      empty="–"),
                    timing.ratio_text(bench._num(full.get("ratio_to_peft")), bool(full.get("ratio_to_peft_noisy")),
                                      empty="–"), f"[{src.tag}]"])
    return out


def model_rows(src: Source) -> list[list[str]]:
    from pyfastpeft.tools import bench

    out = []
    for e in bench.model_table(src.data["rows"]):
        out.append([e["workload"], bench.path_label(e["path"]), _f(e["saved_bytes_per_token"], ".0f"),
                    _f(e["modeled_h100_ms"], ".4f"), _f(e.get("modeled_x_frozen"), ".2f"), bench.efficiency_range(e),
                    bench.break_even_text(e), _f(e.get("modeled_x_peft"), ".2f"), f"[{src.tag}]"])
    return out


def skipped_rows(src: Source) -> list[list[str]]:
    """Providers that produced no timing at all, with the reason the bench recorded (once per provider)."""
    seen: dict[str, str] = {}
    timed = {r.get("provider") for r in src.data["rows"] if r.get("ms_p50") not in (None, "")}
    for r in src.data["rows"]:
        p = r.get("provider", "?")
        if p not in timed and p not in seen:
            seen[p] = str(r.get("status", ""))[:140]
    return [[p, why, f"[{src.tag}]"] for p, why in seen.items()]


def _step_cell(r: dict) -> str:
    """A demo run's median step ms, with its spread when the file records p20 / p80 (older files do not)."""
    cell = _f(r.get("step_ms"), ".1f")
    s = timing.spread(r.get("step_ms"), r.get("step_ms_p20"), r.get("step_ms_p80"))
    return cell if s is None else f"{cell} ({timing.spread_text(s)})"


def demo_rows(src: Source) -> list[list[str]]:
    out = []
    for r in src.data["rows"]:
        sb = r.get("saved_bytes")
        out.append([r["model"], r["method"], r["impl"], _f(r.get("loss_first"), ".3f"), _f(r.get("loss_last"), ".3f"),
                    _step_cell(r), _f(r.get("trainable_params"), ","),
                    _f(sb / 2**20 if sb is not None else None, ".2f"),
                    r.get("note", "") if r.get("status") == "ok" else r.get("status", ""), f"[{src.tag}]"])
    return out


_MEASURE_WORDS = ("saved", "bytes", "ms", "us", "seconds", "time", "flops", "gbps", "spread", "err")
_MEASURE_PREFIXES = ("cpu_", "h100_", "modeled_", "gpu_")  # measured / modeled values, not a row's settings


def _label(r: dict) -> str:
    """A row's name in a generic table: its text fields and its small integer settings (m=4, r=16)."""
    text = [str(v) for v in r.values() if isinstance(v, str)]
    ints = [f"{k}={v}" for k, v in r.items() if isinstance(v, int) and not isinstance(v, bool)
            and not any(w in k.lower() for w in _MEASURE_WORDS)]
    ints += [f"{k}={v:g}" for k, v in r.items() if isinstance(v, float) and not any(w in k.lower() for w in
             _MEASURE_WORDS) and not k.lower().startswith(_MEASURE_PREFIXES) and k not in _ratio_columns([r])]
    return " ".join(text + ([",".join(ints)] if ints else [])) or "?"


def generic_table(src: Source) -> str:
    """Any other results layout (each family's bench): every column, numbers to 4 significant digits."""
    rows = src.data["rows"]
    cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return format(v, ".4g")
        return str(v)

    return table(cols + ["src"], [[cell(r.get(c)) for c in cols] + [f"[{src.tag}]"] for r in rows], markdown=True)


_OURS = ("ours", "pyfastpeft", "gated")  # names a family's bench gives our side of a ratio


def _ratio_columns(rows: Sequence[dict]) -> list[str]:
    cols = dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return [c for c in cols if any(w in c.lower() for w in ("over", "ratio", "_x_", "speedup", "_vs_"))]


def ratio_direction(col: str) -> Optional[str]:
    """Which way a ratio column of time (or bytes) is better: ``"higher"`` for ``<other>_over_ours`` and
    ``*speedup*`` (ours is that many times faster), ``"lower"`` for ``ours_over_<other>``, ``ratio_to_<other>``,
    ``<x>_x_<other>`` and ``<x>_vs_<other>`` (ours divided by the other), None when the name does not say."""
    c = col.lower()
    if "speedup" in c:
        return "higher"
    if "_over_" in c:
        num, den = c.rsplit("_over_", 1)
        if den.split("_")[0] in _OURS:
            return "higher"
        if num.split("_")[-1] in _OURS:
            return "lower"
        return None
    for sep in ("_vs_", "_x_", "ratio_to_"):
        if sep in c:
            den = c.split(sep, 1)[1]
            return "higher" if den.split("_")[0] in _OURS else "lower"
    return None


_DIRECTION_TITLES = {
    "lower": "ours / other (time or bytes ratio): lower is better",
    "higher": "other / ours (speed-up of ours): higher is better",
    None: "direction not known from the column name: read each ratio's definition",
}


def generic_figure(src: Source) -> Any:
    """Grouped bars of a generic file's ratio columns (``*_over_*``, ``*ratio*``, ``*_x_*``, ``*_vs_*``,
    ``*speedup*``) per row, one panel per direction (:func:`ratio_direction`): lower-is-better and
    higher-is-better ratios never share an axis. A value whose ``<column>_noisy`` is true (a CPU timing with
    spread > 20 %) is hatched. Returns the figure, or a string saying why there is none."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except Exception as e:  # noqa: BLE001
        return f"matplotlib not importable ({type(e).__name__}: {e})"
    rows = src.data["rows"]
    cols = _ratio_columns(rows)
    if not cols:
        return "no ratio columns (*_over_*, *ratio*, *_x_*, *_vs_*, *speedup*) to plot"
    groups: dict[Optional[str], list[str]] = {}
    for c in cols:
        groups.setdefault(ratio_direction(c), []).append(c)
    order = [d for d in ("lower", "higher", None) if d in groups]
    width_in = max(7.0, 0.5 * len(rows) * max(len(g) for g in groups.values()) / 2 + 3)
    fig, axes = plt.subplots(len(order), 1, figsize=(width_in, 4.6 * len(order)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    colors = {c: cmap(i % 10) for i, c in enumerate(cols)}
    from pyfastpeft.tools.bench import NOISY_HATCH
    for ax, d in zip(axes[:, 0], order):
        gcols = groups[d]
        width = 0.8 / len(gcols)
        flagged = False
        for i, c in enumerate(gcols):
            xs = [j + (i - (len(gcols) - 1) / 2) * width for j in range(len(rows))]
            keep = [(x, r.get(c), bool(r.get(f"{c}_noisy"))) for x, r in zip(xs, rows)
                    if isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)]
            if not keep:
                continue
            cont = ax.bar([k[0] for k in keep], [k[1] for k in keep], width, label=c, color=colors[c])
            for patch, (_, _, bad) in zip(cont.patches, keep):
                if bad:
                    patch.set_hatch(NOISY_HATCH)
                    patch.set_alpha(0.35)
                    patch.set_edgecolor("dimgray")
                    flagged = True
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([_label(r) for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_xlabel("results row")
        ax.set_ylabel("ratio (1 = parity)")
        ax.set_title(_DIRECTION_TITLES[d], fontsize=10)
        handles, names = ax.get_legend_handles_labels()
        if flagged:
            handles.append(Patch(facecolor="lightgray", edgecolor="dimgray", hatch=NOISY_HATCH, label=timing.LEGEND))
            names.append(timing.LEGEND)
        ax.legend(handles, names, fontsize=7)
    fig.suptitle(f"{src.path.name} [{src.tag}]")
    fig.tight_layout()
    return fig


def generic_plot(src: Source, path: Path) -> Optional[str]:
    """Write :func:`generic_figure` to ``path``; None, or why no PNG was written."""
    from pyfastpeft.tools import figures

    return figures.save(generic_figure(src), path, dpi=100)


def plots(sources: Sequence[Source], out_dir: Path) -> tuple[list[tuple[Source, Path]], list[str]]:
    """One PNG per bench results file via ``bench.plot``; demo PNGs via ``demo.plot``."""
    from pyfastpeft.tools import bench
    from pyfastpeft.tools import demo

    made, notes = [], []
    for s in sources:
        png = out_dir / f"report-{s.path.stem}.png"
        if s.kind == "table":
            why = generic_plot(s, png)
        elif s.kind == "bench":
            rows = s.data["rows"]
            title = (f"{rows[0].get('op', bench.OP) if rows else bench.OP} on {s.meta.get('device_name', '?')} "
                     f"({s.meta.get('dtype', rows[0].get('dtype') if rows else '?')}) [{s.tag}]")
            why = bench.plot(rows, png, title=title) if rows else "no rows"
        else:
            why = demo.plot(s.data, png)
        if why is None:
            made.append((s, png))
        else:
            notes.append(f"{s.path.name}: no plot ({why})")
    return made, notes


def build(results: Path, out: Path, *, root: Optional[Path] = None, with_plots: bool = True) -> tuple[str, list[Path]]:
    """The markdown report (also written to ``out``) and the PNG paths."""
    root = root or Path.cwd()
    sources, notes = load_sources(results)
    if not sources:
        raise ValueError(f"no bench or demo results (*.json with 'rows') in {str(results)!r}; run "
                         "`pyfastpeft bench` (or `pyfastpeft demo --out <dir>`) first")
    out.parent.mkdir(parents=True, exist_ok=True)
    made, pnotes = plots(sources, out.parent) if with_plots else ([], [])
    notes += pnotes
    bench_srcs = [s for s in sources if s.kind == "bench"]
    demo_srcs = [s for s in sources if s.kind == "demo"]
    table_srcs = [s for s in sources if s.kind == "table"]
    md = ["# pyfastpeft performance report", "",
          f"Generated by `pyfastpeft bench --report` from {len(sources)} results file(s) in `{_rel(results, root)}`. "
          "Each row's tag `[n]` names its results file and the command that wrote it (sources below); nothing "
          "here is re-measured. CPU timings are wall-clock medians of the machine that ran the command; the "
          "H100 columns are a roofline MODEL, not measurements.", ""]
    if bench_srcs:
        md += ["## Measured timings (median ms; ratios of fwd+bwd)", ""]
        trows = [r for s in bench_srcs for r in timing_rows(s)]
        md.append(table(["op", "workload", "tokens", "dtype", "provider", "fwd ms (spread)", "bwd ms (spread)",
                         "fwd+bwd ms (spread)", "x frozen", "x peft", "src"], trows, markdown=True))
        md += ["", "Spread = (p80 - p20) / median of the timed calls. " + timing.FOOTNOTE + "."]
        mrows = []
        for s in bench_srcs:
            try:
                mrows += model_rows(s)
            except (KeyError, TypeError, ValueError) as e:  # a results file of another layout: say so
                notes.append(f"{s.path.name}: no counted/modeled rows ({type(e).__name__}: {e})")
        if mrows:
            md += ["", "## Counted and modeled (per workload)", "",
                   "Saved bytes per token are counted exactly (`pfp.perf.saved_bytes`); the H100 time is the "
                   "roofline model of `pfp.perf.roofline` (bf16, the GPU shape; pyfastpeft: the Triton path with our "
                   "GEMMs at 0.75 of cuBLAS's rate, also shown at 1.0–0.65, and the efficiency below which the "
                   "cuBLAS path is faster; results files written before the efficiency columns leave those "
                   "cells empty).", ""]
            md.append(table(["workload", "code path", "saved B/token", "H100 fwd+bwd ms (MODEL)",
                             "model x frozen", "x frozen, Triton eff 1.0–0.65", "break-even eff vs cuBLAS path",
                             "model x peft", "src"], mrows, markdown=True))
        srows = [r for s in bench_srcs for r in skipped_rows(s)]
        if srows:
            md += ["", "Providers without timings:", "", table(["provider", "why", "src"], srows, markdown=True)]
    for s in table_srcs:
        md += ["", f"## `{s.path.name}` [{s.tag}]", "", generic_table(s)]
        keys = {k.lower() for r in s.data["rows"] for k in r}
        if any(k.startswith("cpu_") for k in keys) and not any("spread" in k or "p80" in k for k in keys):
            md += ["", "This file's CPU timings carry no spread (p20 / p80), so none can be flagged; rerun its "
                   "benchmark script to get the spread columns and `<ratio>_noisy` flags."]
    if demo_srcs:
        md += ["", "## Demo runs (`pyfastpeft demo`)", ""]
        md.append(table(["model", "method", "impl", "loss first", "loss last", "step ms", "trainable",
                         "saved MiB", "note", "src"], [r for s in demo_srcs for r in demo_rows(s)], markdown=True))
        md += ["", "step ms: median over the timed steps, with its spread where the file records it; "
               + timing.FOOTNOTE + "."]
    if made:
        md += ["", "## Plots", ""]
        md += [f"![{_rel(s.path, root)} [{s.tag}]]({png.name})" for s, png in made]
    md += ["", "## Sources", ""] + [s.line(root) + "  " for s in sources]
    if notes:
        md += ["", "Notes:", ""] + [f"* {n}" for n in notes]
    text = "\n".join(md) + "\n"
    out.write_text(text)
    return text, [p for _, p in made]


def default_paths(results: Optional[str] = None, out: Optional[str] = None) -> tuple[Path, Path]:
    """(results folder read, report path written): ``results`` or the committed ``benchmarks/results``;
    ``out``, else ``<results>/REPORT.md`` when ``results`` was named, else ``./pyfastpeft-results/REPORT.md``
    (git-ignored): the default run reads the committed results and writes nothing beside them."""
    from pyfastpeft.tools import bench

    res = Path(results) if results else bench.COMMITTED_RESULTS_DIR
    if out:
        return res, Path(out)
    return res, (res / "REPORT.md") if results else bench.DEFAULT_OUT_DIR / "REPORT.md"


def main(results: Optional[str], out: Optional[str], *, with_plots: bool = True) -> int:
    import sys

    res, dest = default_paths(results, out)
    if not res.is_dir():
        print(f"pyfastpeft bench --report: {str(res)!r} is not a directory (--out names the results folder to "
              "read, e.g. pyfastpeft-results)", file=sys.stderr)
        return 2
    try:
        text, pngs = build(res, dest, with_plots=with_plots)
    except ValueError as e:
        print(f"pyfastpeft bench --report: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {dest}")
    for p in pngs:
        print(f"wrote {p}")
    return 0
