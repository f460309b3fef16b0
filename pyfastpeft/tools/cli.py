"""The ``pyfastpeft`` command (also ``python -m pyfastpeft``).

Subcommands: ``info`` (versions, devices, backends), ``check`` (every op and backend against the fp64
reference; exit code 1 on any failure), ``bench`` (the workloads of ``docs/performance.md``; results
JSON/CSV and a PNG; ``--report`` turns results files into a markdown report; ``--device cuda --smoke`` builds,
runs the GPU tests and writes the results file the dispatch and the model read), ``demo`` (tiny ViT and
Llama fine-tuned with each method vs PEFT), ``compile-report`` (ahead-of-time compile of the Triton
kernels; delegated to ``pyfastpeft.tools.compile_report``).

``bench``, ``demo`` and ``bench --report`` write into ``./pyfastpeft-results/`` (git-ignored) unless ``--out`` /
``--report-out`` name another place, so the committed ``benchmarks/results/`` change only on purpose.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from typing import Optional, Sequence

import torch


# ----------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------
def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as e:  # noqa: BLE001 - report, never raise
        return f"not importable ({type(e).__name__}: {e})"


def _ext_status() -> str:
    try:
        from pyfastpeft.core import ext as _ext
        if _ext.load():
            return "loaded"
        return f"not loaded: {_ext.LOAD_ERROR}"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"


def _devices() -> list[str]:
    from pyfastpeft.tools.bench import cpu_name
    out = [f"cpu: {cpu_name()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"]
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out.append(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                           f"{p.multi_processor_count} SMs")
        else:
            out.append("cuda: not available" + ("" if torch.version.cuda else " (torch built without CUDA)"))
    except Exception as e:  # noqa: BLE001
        out.append(f"cuda: query failed ({type(e).__name__}: {e})")
    return out


def _backend_info_text() -> str:
    import pyfastpeft
    fmt = getattr(pyfastpeft, "format_backend_info", None)
    if fmt is not None:
        return str(fmt())
    info = getattr(pyfastpeft, "backend_info", None)
    if info is None:
        return "(pyfastpeft.backend_info is not available in this version)"
    import json
    return json.dumps(info(), indent=2, default=str)


def _available_lines() -> list[str]:
    import pyfastpeft
    from pyfastpeft.families import ops
    lines = []
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in ops():  # each public op once, from the table of families
        for d in devs:
            try:
                names = list(pyfastpeft.available_backends(op, torch.device(d)))
            except Exception as e:  # noqa: BLE001
                names = [f"? ({type(e).__name__}: {e})"]
            lines.append(f"{op} on {d}: {', '.join(names) if names else 'none'}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    from pyfastpeft.tools.bench import pyfastpeft_version
    print("pyfastpeft info")
    print(f"  pyfastpeft        {pyfastpeft_version()}")
    print(f"  python            {platform.python_version()} ({sys.executable})")
    print(f"  platform          {platform.platform()}")
    print(f"  torch             {torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    print(f"  triton            {_triton_version()}")
    cuda_rt = "available" if torch.cuda.is_available() else "not available"
    print(f"  CUDA runtime      {cuda_rt}")
    print(f"  TRITON_INTERPRET  {os.environ.get('TRITON_INTERPRET', '(unset)')}")
    for var in ("PYFASTPEFT_BACKEND", "PYFASTPEFT_STRICT", "PYFASTPEFT_DISABLE_CUDA_EXT"):
        if var in os.environ:
            print(f"  {var:<17} {os.environ[var]}")
    print(f"  pyfastpeft._C     {_ext_status()}")
    print("devices")
    for d in _devices():
        print(f"  {d}")
    print("backends available here")
    try:
        for line in _available_lines():
            print(f"  {line}")
    except Exception as e:  # noqa: BLE001
        print(f"  (could not list: {type(e).__name__}: {e})")
    print("backend details (pyfastpeft.backend_info)")
    try:
        for line in _backend_info_text().splitlines():
            print(f"  {line}")
    except Exception as e:  # noqa: BLE001
        print(f"  (backend_info failed: {type(e).__name__}: {e})")
    return 0


# ----------------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------------
def _split(s: Optional[str]) -> Optional[list[str]]:
    return None if s is None else [p.strip() for p in s.split(",") if p.strip()]


def _device_or_error(name: str) -> Optional[str]:
    if name == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available here (see `pyfastpeft info`)"
    return None


def cmd_check(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pyfastpeft.tools import check
    from pyfastpeft.core.backend import ORDER
    if args.interpret and os.environ.get("TRITON_INTERPRET", "0") != "1":
        # the interpreter is chosen when Triton kernels are imported: re-run in a fresh process
        rest = [a for a in argv if a != "--interpret"]
        env = dict(os.environ, TRITON_INTERPRET="1")
        print("pyfastpeft check: re-running with TRITON_INTERPRET=1 (Triton kernels in the interpreter)", flush=True)
        return subprocess.call([sys.executable, "-m", "pyfastpeft", *rest], env=env)
    err = _device_or_error(args.device)
    if err:
        print(f"pyfastpeft check: {err}", file=sys.stderr)
        return 2
    dtypes = _split(args.dtype)
    for d in dtypes or []:
        if d not in check.DTYPES:
            print(f"pyfastpeft check: unknown dtype {d!r}; choose from {', '.join(check.DTYPES)}", file=sys.stderr)
            return 2
    backends = _split(args.backend)
    for b in backends or []:
        if b not in ORDER:
            print(f"pyfastpeft check: unknown backend {b!r}; choose from {', '.join(ORDER)}", file=sys.stderr)
            return 2
    ops = _split(args.op)
    known = list(dict.fromkeys(c.op for c in check.CHECKS))  # each op once (an op may have several rows)
    for o in ops or []:
        if o not in known:
            print(f"pyfastpeft check: unknown op {o!r}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
    print(f"pyfastpeft check on {args.device}"
          + (" (Triton in the interpreter)" if check.interpreting() else ""), flush=True)
    rows = check.run_checks(args.device, dtypes=dtypes, backends=backends, ops=ops, seed=args.seed)
    print(check.format_rows(rows))
    print(check.summary(rows))
    failed = any(r.status == "FAIL" for r in rows)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.report:  # no benchmark runs: the results files become a markdown report + plots
        from pyfastpeft.tools import report
        return report.main(args.out, args.report_out, with_plots=not args.no_plots)
    if args.smoke:  # the GPU smoke: build, GPU tests, timings -> one results file (tools/smoke.py)
        from pyfastpeft.tools import smoke
        return smoke.main(args.device, args.out, args.time_limit, argv)
    from pyfastpeft.tools import bench
    from pyfastpeft.tools.check import DTYPES
    from pyfastpeft.tools.timing import SPREAD_LIMIT
    err = _device_or_error(args.device)
    if err:
        print(f"pyfastpeft bench: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else bench.default_dtype(device)
    modes = _split(args.modes) or list(bench.MODES)
    for m in modes:
        if m not in bench.MODES:
            print(f"pyfastpeft bench: unknown mode {m!r}; choose from {', '.join(bench.MODES)}", file=sys.stderr)
            return 2
    known = bench.provider_table(device)
    providers = _split(args.providers) or bench.default_providers(device, args.quick or args.tiny)
    for p in providers:
        if p not in known:
            print(f"pyfastpeft bench: unknown provider {p!r}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
    if "frozen" not in providers:
        providers = ["frozen", *providers]  # every ratio is to frozen
    tag = "-tiny" if args.tiny else ("-quick" if args.quick else "")
    if dtype != bench.default_dtype(device):
        tag += "-" + args.dtype
    workloads = bench.lora_workloads(device, quick=args.quick, tiny=args.tiny)
    if args.filter:
        subs = _split(args.filter) or []
        workloads = [w for w in workloads if any(sub in w.label for sub in subs)]
        if not workloads:
            print(f"pyfastpeft bench: --filter {args.filter!r} matches no workload", file=sys.stderr)
            return 2
        tag += "-" + bench.sanitize(args.filter)
    out_dir = bench.results_dir(args.out)  # ./pyfastpeft-results/ (git-ignored) unless --out names a folder
    budget = args.budget if args.budget is not None else (0.05 if args.tiny else (0.5 if args.quick else 1.5))
    cfg = bench.BenchConfig(device=device, dtype=dtype, workloads=workloads, providers=providers, modes=modes,
                            progress=not args.no_progress, budget_s=budget,
                            seed=args.seed, argv=list(argv))
    print(f"pyfastpeft bench on {bench.device_name(device)}: {len(workloads)} workload(s) x "
          f"{len(providers)} provider(s) x {len(modes)} mode(s), {args.dtype or bench.DTYPE_NAMES[dtype]}",
          flush=True)
    result = bench.run(cfg)
    paths = bench.write_results(result, out_dir, bench.device_name(device) + tag)
    print(bench.summary_table(result["rows"]))
    ms = bench.model_summary(result["rows"])
    if ms:
        print("\ncounted and modeled (per workload; the H100 times are a roofline MODEL, not measurements):")
        print(ms)
    notes = list(dict.fromkeys(result.get("notes", [])))
    if notes:
        print("notes:")
        for n in notes:
            print(f"  {n}")
    print(f"timer: {result['metadata']['timer']}; ratios are medians of this run; a timing whose spread "
          f"(p80 - p20) / median exceeds {100 * SPREAD_LIMIT:.0f} % is flagged and is not a result")
    for kind, p in paths.items():
        if p is not None:
            print(f"wrote {p}")
    if not args.out:
        print(f"results are in {out_dir}/ (untracked, git-ignored); the committed {bench.COMMITTED_RESULTS_DIR}/ "
              f"files change only with --out {bench.COMMITTED_RESULTS_DIR}")
    failed = [r for r in result["rows"] if r["status"].startswith("FAILED")]
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyfastpeft", description="pyfastpeft: fused PEFT kernels -- tools")
    sub = p.add_subparsers(dest="command", metavar="{info,check,bench,demo,compile-report}")

    sub.add_parser("info", help="versions, devices, and the backends available here")

    c = sub.add_parser("check", help="every op and backend vs the fp64 reference (exit 1 on any failure)")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--dtype", default=None,
                   help="comma list of fp32,fp16,bf16,fp64 (default: fp32 on cpu; fp32,fp16,bf16 on cuda)")
    c.add_argument("--backend", default=None, help="comma list of cuda,triton,torch (default: all)")
    c.add_argument("--op", default=None, help="comma list of ops (default: all)")
    c.add_argument("--interpret", action="store_true",
                   help="re-run in a subprocess with TRITON_INTERPRET=1 so Triton kernels run on the CPU")
    c.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("bench", help="the workloads of docs/performance.md on this device")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="default: cuda when available (bf16, the spec's M), else cpu (fp32, M / 16)")
    b.add_argument("--quick", action="store_true", help="two workloads only (under a minute on a small CPU)")
    b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # one tiny shape, for tests
    b.add_argument("--filter", default=None,
                   help="comma list of substrings; only workloads whose name contains one (e.g. 'vit-b16,r16')")
    b.add_argument("--modes", default=None, help="comma list of fwd,bwd,fwd+bwd (default: all)")
    b.add_argument("--providers", default=None,
                   help="comma list (default: frozen, pyfastpeft-<each backend>, peft, ref-eager, ref-compile)")
    b.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: bf16 on cuda, fp32 on cpu")
    b.add_argument("--out", default=None,
                   help="results directory (default: ./pyfastpeft-results, git-ignored; pass benchmarks/results to "
                        "update the committed results on purpose). With --report: the results to read "
                        "(default: benchmarks/results)")
    b.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)  # CPU seconds per group
    b.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--report", action="store_true",
                   help="run nothing: turn the results files (--out dir) into a markdown report and plots")
    b.add_argument("--report-out", default=None,
                   help="report path (default: <--out dir>/REPORT.md when --out is given, else "
                        "./pyfastpeft-results/REPORT.md); the PNGs go beside it")
    b.add_argument("--no-plots", action="store_true", help="--report without PNGs")
    b.add_argument("--smoke", action="store_true",
                   help="needs a CUDA GPU: build the extension, run the GPU tests, time every op's backends "
                        "against the frozen layer and write one results file the dispatch and the model read "
                        "(about 8 minutes)")
    b.add_argument("--time-limit", type=float, default=None,
                   help="--smoke's time budget in seconds (default 480)")

    d = sub.add_parser("demo", help="fine-tune a tiny ViT and Llama with each method (synthetic data, vs PEFT)")
    from pyfastpeft.tools import demo as _demo
    _demo.add_arguments(d)

    sub.add_parser("compile-report", add_help=False,
                   help="compile every Triton kernel ahead of time; registers/spills (see its --help)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compile-report":
        try:
            from pyfastpeft.tools import compile_report
        except ImportError as e:
            print(f"pyfastpeft compile-report: not available ({e})", file=sys.stderr)
            return 2
        return int(compile_report.main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        return cmd_info(args)
    if args.command == "check":
        return cmd_check(args, argv)
    if args.command == "demo":
        from pyfastpeft.tools import demo
        return demo.main(args, argv[1:])
    if args.command == "bench":
        return cmd_bench(args, argv)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
