"""Results files written by ``pyfastpeft bench --device cuda --smoke``, read by the dispatch and the model.

A results file is one JSON object (schema in ``docs/performance.md``, "The results file")::

    {"format": "pyfastpeft-results", "version": 1,
     "machine": {"gpu", "cc", "pyfastpeft", "torch", "triton", "cuda", "ext"},   # core/cache.identity
     "rows": [{"op", "label", "mode", "dtype", "provider", "backend", "variant", "ms_p50", "ms_p20",
               "ms_p80", "status", ...}],
     "dispatch": {"<primitive op>|<shape bucket>": {"times_ms": {"<backend>": ms}, "fastest": "<backend>"}},
     "triton_efficiency": {"value": 0.81, ...} or {"value": null, "why": "..."}}

Who reads it:

* the dispatch's static default (``core/tune.py``): where nothing is measured (``PYFASTPEFT_TUNE=0``, or
  ``torch.compile`` tracing / CUDA-graph capture with nothing cached), the backend a results file for *this*
  GPU found fastest for the call's op and shape bucket is the default, if it can run the call;
* the model (``pfp.perf.triton_efficiency``): our Triton GEMMs' share of cuBLAS's rate, measured.

Where: the files named by ``PYFASTPEFT_RESULTS`` (files or folders, separated by ``os.pathsep``), then the
files shipped with the package (``pyfastpeft/data/results/*.json``). A file that is unreadable, corrupt or
not a results file is ignored with one warning. Nothing here touches CUDA.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

FORMAT = "pyfastpeft-results"
VERSION = 1
ENV = "PYFASTPEFT_RESULTS"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "data" / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
#: identity keys that must match for a file to speak for this machine; the others (versions) are preferred
REQUIRED = ("gpu", "cc")
PREFERRED = ("torch", "triton", "cuda", "pyfastpeft")

_WARNED: set[str] = set()
_CACHE: dict[str, tuple[Any, Optional[dict]]] = {}  # path -> (mtime/size stamp, the validated data or None)


def validate(data: Any) -> list[str]:
    """What is wrong with ``data`` as a results file (``[]``: nothing)."""
    if not isinstance(data, dict):
        return [f"a JSON {type(data).__name__}, not an object"]
    bad = []
    if data.get("format") != FORMAT:
        bad.append(f"format is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("version") != VERSION:
        bad.append(f"version is {data.get('version')!r}, expected {VERSION}")
    machine = data.get("machine")
    if not isinstance(machine, dict) or not all(isinstance(machine.get(k), str) for k in REQUIRED):
        bad.append(f"machine must be an object with string {', '.join(REQUIRED)}")
    rows = data.get("rows")
    if not isinstance(rows, list):
        bad.append("rows must be a list")
    else:
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or not isinstance(r.get("op"), str) or r.get("mode") not in MODES:
                bad.append(f"rows[{i}] needs a string op and a mode in {MODES}")
                break
            if r.get("ms_p50") is not None and not (isinstance(r["ms_p50"], (int, float)) and r["ms_p50"] > 0):
                bad.append(f"rows[{i}].ms_p50 must be a positive number or null")
                break
    disp = data.get("dispatch")
    if not isinstance(disp, dict):
        bad.append("dispatch must be an object")
    else:
        for key, e in disp.items():
            times = e.get("times_ms") if isinstance(e, dict) else None
            if (not isinstance(times, dict) or not times or e.get("fastest") not in times
                    or not all(isinstance(v, (int, float)) and v > 0 for v in times.values())):
                bad.append(f"dispatch[{key!r}] needs times_ms (backend -> positive ms) and fastest among them")
                break
    eff = data.get("triton_efficiency")
    if not isinstance(eff, dict) or not (eff.get("value") is None or (
            isinstance(eff.get("value"), (int, float)) and 0 < eff["value"] <= 2)):
        bad.append("triton_efficiency must be an object whose value is null or a number in (0, 2]")
    return bad


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(f"pyfastpeft: ignoring the results file {path} ({why})", RuntimeWarning, stacklevel=4)


def load(path: str | Path) -> Optional[dict]:
    """The validated results file at ``path``, or None (with one warning when it exists but is not valid).
    Re-read only when the file changes."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    data: Optional[dict]
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        bad = validate(raw)
    except (OSError, ValueError) as e:
        raw, bad = None, [f"unreadable: {e}"]
    if bad:
        _warn_once(path, "; ".join(bad[:3]))
        data = None
    else:
        data = raw
    _CACHE[str(path)] = (stamp, data)
    return data


def _expand(entry: str) -> list[Path]:
    p = Path(entry).expanduser()
    return sorted(p.glob("*.json")) if p.is_dir() else [p]


def paths() -> list[Path]:
    """Every results file to consult, in order: ``$PYFASTPEFT_RESULTS`` entries, then the shipped ones."""
    out: list[Path] = []
    for entry in os.environ.get(ENV, "").split(os.pathsep):
        if entry.strip():
            out.extend(_expand(entry.strip()))
    if PACKAGE_DIR.is_dir():
        out.extend(sorted(PACKAGE_DIR.glob("*.json")))
    return out


def matches(machine: dict, ident: dict) -> bool:
    """The file's machine is this GPU (same name and compute capability)."""
    return all(machine.get(k) == ident.get(k) for k in REQUIRED)


def for_machine(ident: dict, files: Optional[Iterable[Path]] = None) -> Optional[tuple[Path, dict]]:
    """The results file for the GPU of ``ident`` (an identity from ``core/cache.identity``): among the
    files that match its GPU, the one that matches most of its versions (first listed on a tie)."""
    best: Optional[tuple[int, int, Path, dict]] = None
    for i, p in enumerate(paths() if files is None else files):
        data = load(p)
        if data is None or not matches(data["machine"], ident):
            continue
        score = sum(data["machine"].get(k) == ident.get(k) for k in PREFERRED)
        if best is None or score > best[0]:
            best = (score, i, p, data)
    return None if best is None else (best[2], best[3])


def fastest(data: dict, op: str, bucket: str, candidates: Iterable[str]) -> Optional[str]:
    """The fastest of ``candidates`` in the file's timings of ``op`` at ``bucket`` (None: no timing)."""
    e = data["dispatch"].get(f"{op}|{bucket}")
    if not e:
        return None
    times = {b.split(":", 1)[0]: t for b, t in e["times_ms"].items()}  # "triton:fused" counts as triton
    known = [(times[c], i, c) for i, c in enumerate(candidates) if c in times]
    return min(known)[2] if known else None


def gpu_family(gpu: str) -> str:
    """The GPU generation a name belongs to, for the model (``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; H200
    has H100's SMs and tensor cores, so it counts as ``"h100"`` for a GEMM-efficiency ratio)."""
    g = gpu.lower()
    for key, fam in (("h100", "h100"), ("h200", "h100"), ("gh200", "h100"), ("a100", "a100")):
        if key in g:
            return fam
    return g


def triton_efficiency(family: str, files: Optional[Iterable[Path]] = None) -> Optional[tuple[float, Path]]:
    """The measured Triton GEMM efficiency of the first results file from a GPU of ``family`` that has one."""
    for p in paths() if files is None else files:
        data = load(p)
        if data is None or gpu_family(data["machine"]["gpu"]) != family:
            continue
        v = data["triton_efficiency"].get("value")
        if v is not None:
            return float(v), p
    return None


def clear() -> None:
    """Forget loaded files and warnings (tests)."""
    _CACHE.clear()
    _WARNED.clear()
