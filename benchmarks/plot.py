"""Plot ``pyfastpeft bench`` results: JSON or CSV in, PNG out (the same figure ``bench`` writes).

    python benchmarks/plot.py benchmarks/results/cpu-intel-r-xeon-r-processor-2-00ghz-quick.json   # -> pyfastpeft-results/<name>.png
    python benchmarks/plot.py results.csv -o out.png --mode fwd

The PNG goes to ``./pyfastpeft-results/`` (git-ignored) unless ``-o`` names a path, so re-plotting a committed
results file never rewrites the committed PNG beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pyfastpeft.tools import bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a results .json or .csv written by `pyfastpeft bench`")
    ap.add_argument("-o", "--out", default=None,
                    help="PNG path (default: pyfastpeft-results/<input name>.png, git-ignored)")
    ap.add_argument("--mode", default="fwd+bwd", choices=list(bench.MODES), help="which timings to plot")
    args = ap.parse_args(argv)
    rows, meta = bench.load_rows(args.results)
    if not rows:
        print(f"{args.results}: no rows", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else bench.results_dir(None) / Path(args.results).with_suffix(".png").name
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{bench.OP} on {meta.get('device_name', '?')} ({rows[0].get('dtype')}), {args.mode}"
    why = bench.plot(rows, out, title=title, mode=args.mode)
    if why is not None:
        print(why, file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
