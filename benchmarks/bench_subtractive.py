"""Subtractive fine-tuning (SFP) benchmarks: fit throughput and filter-block inference (``docs/performance.md``).

1. Fit accumulation, CPU measured: rows/s of the streaming ``G = X̃ᵀX̃``, ``C = X̃ᵀY`` over ``n`` rows in
   4096-row batches (as ``pfp.subtractive.fit`` feeds it), d_in = d_out = d in {768, 1024},
   n in {1e5, 1e6} / 16 (the CPU divisor). Providers: ``pyfastpeft-torch`` (our torch backend, forced:
   fp32 BLAS blocks, fp64 between batches), ``naive-fp64`` (build ``X̃ = [X, 1]`` per batch and multiply
   in fp64: what one writes for an accurate fit), ``naive-fp32`` (the same in fp32, one fp32 sum over all
   batches). Each provider passes a correctness gate against the fp64 statistics before it is timed.
2. Fit accumulation, modeled H100 (a roofline model, ``pfp.perf``): the Triton kernel's declared FLOPs
   and bytes at the full n in {1e5, 1e6}, bf16 and fp32 activations, against the bandwidth bound of
   reading X and Y once (``n·(d_in + d_out)·itemsize / 3.0 TB/s``).
3. ``pfp.subtractive.fit`` end to end on a ViT-B block's MLP (forward with hooks, accumulation, solve,
   replacement), CPU measured.
4. ViT-B/16 block inference (d = 768, 12 heads, MLP ratio 4) before and after replacing its MLP by a
   768 x 768 ``FilterBlock``: CPU measured (fp32, 4 x 197 tokens = M / 16), and modeled H100 (bf16,
   64 x 197 tokens, every aten op of the block counted on the meta device).

    python benchmarks/bench_subtractive.py            # all rows (a few minutes on 2 cores)
    python benchmarks/bench_subtractive.py --quick    # the n = 1e5 / 16 rows only

Writes ``pyfastpeft-results/subtractive-cpu.json`` (git-ignored; ``--out`` names another file, e.g. the committed
``benchmarks/results/subtractive-cpu.json`` on purpose) and prints markdown tables. Every CPU timing keeps its
spread ((p80 - p20) / median); a timing over 20 % is marked ``!`` and a ratio that uses one ``(x)!``: not a
result. No timing assertions.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial

import torch

import pyfastpeft as pfp
from pyfastpeft.tools import perf
from pyfastpeft.core.table import table
from pyfastpeft.tools import timing
from pyfastpeft.tools.bench import results_dir
from pyfastpeft.tools.timing import time_interleaved
from pyfastpeft.nn import FilterBlock
from pyfastpeft.subtractive.gram_accumulate import gram_accumulate

CPU_DIVISOR = 16
BATCH_ROWS = 4096
DIMS = (768, 1024)
FULL_ROWS = (100_000, 1_000_000)
H100 = perf.DEVICES["h100"]


def _timed(fns: dict, reps: int, warmup: int = 1) -> dict:
    """``{name: Timing}`` (seconds): ``warmup`` calls each, then ``reps`` interleaved rounds."""
    return time_interleaved(fns, warmup=warmup, min_rounds=reps, max_rounds=reps)


# ---------------------------------------------------------------------------------------------- providers
def acc_pyfastpeft(xs, ys):
    G = C = None
    for x, y in zip(xs, ys):
        g, c = gram_accumulate(x, y, backend="torch")
        G = g.double() if G is None else G.add_(g.double())
        C = c.double() if C is None else C.add_(c.double())
    return G, C


def acc_naive(xs, ys, dtype):
    G = C = None
    for x, y in zip(xs, ys):
        xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1).to(dtype)
        g, c = xt.t() @ xt, xt.t() @ y.to(dtype)
        G = g if G is None else G.add_(g)
        C = c if C is None else C.add_(c)
    return G, C


PROVIDERS = {
    "pyfastpeft-torch": acc_pyfastpeft,
    "naive-fp64": lambda xs, ys: acc_naive(xs, ys, torch.float64),
    "naive-fp32": lambda xs, ys: acc_naive(xs, ys, torch.float32),
}


def bench_fit_cpu(n: int, d: int, reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, d, generator=g) + 0.5 * x  # correlated, like a module's input and output
    xs, ys = x.split(BATCH_ROWS), y.split(BATCH_ROWS)
    G0, C0 = acc_naive(xs, ys, torch.float64)
    rows = []
    errs = {}
    for name, fn in PROVIDERS.items():  # correctness gate (and warm-up) before any timing
        G, C = fn(xs, ys)
        errs[name] = max(((G.double() - G0).abs().max() / G0.abs().max()).item(),
                         ((C.double() - C0).abs().max() / C0.abs().max()).item())
    # fp32 blocks: ~u·sqrt(rows) relative error; the gate rejects only wrong results
    gated = [name for name in PROVIDERS if errs[name] <= 1e-5]
    # interleaved rounds (a busy machine slows every provider alike); the gate calls were the warm-up
    times = _timed({name: partial(PROVIDERS[name], xs, ys) for name in gated}, reps, warmup=0)
    for name in PROVIDERS:
        t, p20, p80, _ = times.get(name, (float("nan"),) * 4)
        rows.append(dict(section="fit-cpu", provider=name, n=n, d_in=d, d_out=d, dtype="fp32", ms_p50=t * 1e3,
                         ms_p20=p20 * 1e3, ms_p80=p80 * 1e3, spread=timing.spread(t, p20, p80),
                         noisy=timing.noisy(t, p20, p80), rows_per_s=n / t, max_rel_err=errs[name],
                         gate=name in gated))
        print(f"  fit-cpu n={n} d={d} {name:<17} {t * 1e3:9.1f} ms  {n / t:12,.0f} rows/s  rel err {errs[name]:.1e}",
              flush=True)
    # the solve, once per module: (d+1)^3 Cholesky in fp64
    A = G0 + 1e-4 * torch.trace(G0) / G0.shape[0] * torch.eye(G0.shape[0], dtype=torch.float64)
    ts = _timed({"solve": lambda: torch.cholesky_solve(C0, torch.linalg.cholesky(A))}, reps)["solve"]
    rows.append(dict(section="solve-cpu", provider="fp64 cholesky", n=n, d_in=d, d_out=d, ms_p50=ts.median * 1e3,
                     ms_p20=ts.p20 * 1e3, ms_p80=ts.p80 * 1e3, spread=ts.spread, noisy=ts.noisy))
    return rows


def bench_fit_modeled(n: int, d: int, dtype: torch.dtype) -> dict:
    x = torch.empty(n, d, dtype=dtype, device="meta")
    cnt = perf.count(lambda a, b: gram_accumulate(a, b, backend="torch"), x, x)
    rl = perf.roofline(cnt)
    item = torch.finfo(dtype).bits // 8
    bound = n * (d + d) * item / H100["bandwidth"]
    peak = H100["tensor_flops"] if dtype in (torch.float16, torch.bfloat16) else H100["simt_flops"]
    kernel = cnt.ops[0]
    return dict(section="fit-h100-model", provider="triton (declared cost)", n=n, d_in=d, d_out=d,
                dtype=str(dtype).replace("torch.", ""), modeled_us=rl.total_s * 1e6, bandwidth_bound_us=bound * 1e6,
                compute_bound_us=kernel.flops / peak * 1e6, kernel_bytes=kernel.bytes, xy_bytes=n * 2 * d * item,
                fraction_of_bandwidth_bound=bound / rl.total_s, launches=cnt.launches,
                modeled_rows_per_s=n / rl.total_s)


def _vit_block(dim=768):
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    return Block(dim, num_heads=12, mlp_ratio=4.0, qkv_bias=True).eval()


def bench_vit_block(reps: int) -> list[dict]:
    rows = []
    base = _vit_block()
    sfp_block = copy.deepcopy(base)
    sfp_block.mlp = FilterBlock(768, 768, source="Mlp").eval()
    x = torch.randn(64 // CPU_DIVISOR, 197, 768)
    xm = torch.empty(64, 197, 768, dtype=torch.bfloat16, device="meta")
    blocks = (("ViT-B block (MLP)", base), ("ViT-B block (MLP -> FilterBlock 768x768)", sfp_block),
              ("MLP alone (fc1, GELU, fc2)", base.mlp), ("FilterBlock 768x768 alone", sfp_block.mlp))
    with torch.no_grad():
        times = _timed({name: partial(blk, x) for name, blk in blocks}, reps)
    for name, blk in blocks:
        t, p20, p80, _ = times[name]
        cnt = perf.count(copy.deepcopy(blk).to(torch.bfloat16), xm)
        rl = perf.roofline(cnt)
        params = sum(p.numel() for p in blk.parameters())
        rows.append(dict(section="vit-block", provider=name, tokens_cpu=x.shape[0] * 197, ms_p50_cpu=t * 1e3,
                         ms_p20_cpu=p20 * 1e3, ms_p80_cpu=p80 * 1e3, spread_cpu=timing.spread(t, p20, p80),
                         noisy_cpu=timing.noisy(t, p20, p80), tokens_h100=64 * 197,
                         modeled_us_h100=rl.total_s * 1e6, flops_h100=cnt.flops, bytes_h100=cnt.bytes,
                         launches_h100=cnt.launches, params=params))
        print(f"  vit-block {name:<42} cpu {t * 1e3:8.2f} ms   modeled H100 {rl.total_s * 1e6:8.1f} us  "
              f"params {params:,}", flush=True)
    return rows


def bench_fit_end_to_end(reps: int) -> list[dict]:
    """``pfp.subtractive.fit`` on a ViT-B block's MLP, end to end: the block's forward on the calibration
    batches (hooks), the accumulation, the solve, the replacement. 8 batches of 4 x 197 tokens (6,304 rows)."""
    base = _vit_block()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 197, 768, generator=g) for _ in range(8)]
    rows_n = 8 * 4 * 197

    def run():
        blk = copy.deepcopy(base)
        return pfp.subtractive.fit(blk, "mlp", data, backend="torch", progress=False)

    rep = run()
    t, p20, p80, _ = _timed({"fit": run}, reps, warmup=0)["fit"]
    with torch.no_grad():  # the block's forward alone, for the share of the fit that is the model's
        tfw = _timed({"forward": lambda: [base(b) for b in data]}, reps, warmup=0)["forward"]
    tf = tfw.median
    print(f"  fit-e2e ViT-B block mlp, {rows_n} rows: {t * 1e3:.0f} ms ({rows_n / t:,.0f} rows/s; forward alone "
          f"{tf * 1e3:.0f} ms), fit error {rep[0].fit_error:.3f}", flush=True)
    return [dict(section="fit-e2e", provider="pfp.subtractive.fit (torch backend)", n=rows_n, d_in=768, d_out=768,
                 ms_p50=t * 1e3, ms_p20=p20 * 1e3, ms_p80=p80 * 1e3, spread=timing.spread(t, p20, p80),
                 noisy=timing.noisy(t, p20, p80), forward_noisy=tfw.noisy, rows_per_s=rows_n / t,
                 forward_ms=tf * 1e3,
                 fit_error=rep[0].fit_error, params_before=rep[0].params_before, params_after=rep[0].params_after)]


def _meta() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        sha = ""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__, pyfastpeft=pfp.__version__,
                git_sha=sha, timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def markdown(rows: list[dict]) -> str:
    fit = [r for r in rows if r["section"] == "fit-cpu"]
    body = []
    flagged = False

    def cell(text: str, r: dict, spread_key: str = "spread", noisy_key: str = "noisy") -> str:
        """A measured CPU value with its spread; ``!`` over 20 % (not a result)."""
        nonlocal flagged
        flagged = flagged or bool(r.get(noisy_key))
        return f"{text} ({timing.spread_text(r.get(spread_key))})"

    for (n, d) in sorted({(r["n"], r["d_in"]) for r in fit}, key=lambda t: (t[1], t[0])):
        by = {r["provider"]: r for r in fit if (r["n"], r["d_in"]) == (n, d)}
        solve = next(r for r in rows if r["section"] == "solve-cpu" and (r["n"], r["d_in"]) == (n, d))
        body.append([d, f"{n:,}", *(cell(f"{by[p]['rows_per_s']:,.0f}", by[p]) for p in PROVIDERS),
                     cell(f"{solve['ms_p50']:.1f}", solve)])
    out = ["Fit accumulation, CPU measured (fp32 activations, 4096-row batches, d_in = d_out = d; median, with the "
           "spread (p80 - p20) / median):", "",
           table(["d", "rows", "pyfastpeft-torch rows/s", "naive fp64 rows/s", "naive fp32 rows/s", "fp64 solve (ms)"],
                 body, markdown=True)]
    for r in (r for r in rows if r["section"] == "fit-e2e"):
        flagged = flagged or bool(r.get("noisy")) or bool(r.get("forward_noisy"))
        out += ["", f"End to end, `pfp.subtractive.fit` of one ViT-B block's MLP on {r['n']:,} token rows (CPU, fp32): "
                f"{r['ms_p50']:.0f} ms (spread {timing.spread_text(r.get('spread'))}) = "
                f"{r['rows_per_s']:,.0f} rows/s, "
                f"of which the block's own forward {r['forward_ms']:.0f} ms"
                f"{' ' + timing.FLAG if r.get('forward_noisy') else ''}; calibration fit error {r['fit_error']:.3f} "
                f"(random init); parameters {r['params_before']:,} -> {r['params_after']:,}."]
    body = [[r["d_in"], f"{r['n']:,}", r["dtype"], f"{r['modeled_us']:.0f}", f"{r['bandwidth_bound_us']:.0f}",
             f"{r['compute_bound_us']:.0f}", f"{r['fraction_of_bandwidth_bound']:.2f}",
             f"{r['modeled_rows_per_s']:.3g}"] for r in rows if r["section"] == "fit-h100-model"]
    out += ["", "Fit accumulation, **modeled** H100 (roofline; Triton kernel's declared cost + split reduction):", "",
            table(["d", "rows", "dtype", "modeled (us)", "bandwidth bound (us)", "compute bound (us)",
                   "bound / modeled", "modeled rows/s"], body, markdown=True)]
    vit = [r for r in rows if r["section"] == "vit-block"]
    if vit:
        body = [[r["provider"], f"{r['params']:,}", cell(f"{r['ms_p50_cpu']:.2f}", r, "spread_cpu", "noisy_cpu"),
                 f"{r['modeled_us_h100']:.1f}", f"{r['flops_h100'] / 1e9:.1f}"] for r in vit]
        for a, b, what in ((vit[0], vit[1], "block"), (vit[2], vit[3], "MLP alone")):
            bad = bool(a.get("noisy_cpu")) or bool(b.get("noisy_cpu"))
            flagged = flagged or bad
            body.append([f"ratio, {what} (filter / MLP)", f"{b['params'] / a['params']:.2f}",
                         timing.ratio_text(b["ms_p50_cpu"] / a["ms_p50_cpu"], bad),
                         f"{b['modeled_us_h100'] / a['modeled_us_h100']:.2f}",
                         f"{b['flops_h100'] / a['flops_h100']:.2f}"])
        out += ["", "ViT-B/16 block forward, MLP vs filter block (CPU fp32 measured at 4 x 197 tokens; H100 bf16 "
                "**modeled** at 64 x 197):", "",
                table(["block", "params", "CPU ms (spread)", "modeled H100 us", "H100 GFLOP"], body, markdown=True)]
    if flagged:
        out += ["", timing.FOOTNOTE]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only n = 1e5 / 16 rows")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None,
                    help="results JSON (default pyfastpeft-results/subtractive-cpu.json, git-ignored; name "
                         "benchmarks/results/subtractive-cpu.json to update the committed file)")
    args = ap.parse_args(argv)
    rows = []
    ns = FULL_ROWS[:1] if args.quick else FULL_ROWS
    for d in DIMS:
        for n in ns:
            rows += bench_fit_cpu(n // CPU_DIVISOR, d, args.reps)
    for d in DIMS:
        for n in FULL_ROWS:
            for dt in (torch.bfloat16, torch.float32):
                rows.append(bench_fit_modeled(n, d, dt))
    rows += bench_fit_end_to_end(args.reps)
    rows += bench_vit_block(max(args.reps, 5))
    res = dict(meta=_meta(), rows=rows)
    path = args.out or str(results_dir(None) / "subtractive-cpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
