"""Compile report: every shipped Triton kernel config, compiled ahead of time with no GPU.

Why this exists
---------------
Our CI has no GPU, so Triton kernels are tested under the interpreter (``TRITON_INTERPRET=1``). The
interpreter runs kernels as numpy programs and accepts a lot that real compilation rejects (unsupported
dtype combinations, ``tl.dot`` shapes below the tensor-core minimum, non-power-of-two blocks, ...), and it
says nothing about what the GPU will do with the code: registers, spills to local memory, and shared
memory are only visible after the real code generator and ``ptxas`` have run. This module runs exactly
that, without a device:

* every ``pyfastpeft.triton_kernels.<name>`` module (names starting with ``_`` skipped) is imported and
  its module-level ``AOT_SPECS`` (a list of :class:`~pyfastpeft.core.triton_config.AOTSpec`) is read;
* each spec is compiled with ``triton.compile`` for ``sm_80`` (A100) and ``sm_90a`` (H100);
* the PTX is assembled again by the ``ptxas`` bundled with Triton with ``-v``, whose log gives registers
  per thread, spill stores/loads, stack frame and *static* shared memory ("bytes smem");
* Triton's own ``metadata.shared`` is reported beside it: the *dynamic* shared memory the launch asks
  for (tiles, pipelining buffers, layout-conversion scratch). Triton kernels normally declare no static
  shared memory, so "ptxas smem" is usually 0 and "triton shared" is the number that decides occupancy
  and whether the launch fits at all (checked here against each architecture's per-block limit).

It also judges the kernel that runs, per row: ``wgmma`` (count of Hopper warpgroup MMAs: ``HGMMA`` in the
SASS, which the ``cuobjdump`` bundled with Triton disassembles from the cubin; without a cuobjdump,
``wgmma.mma_async`` in the PTX, and ``counts_from`` says ``"ptx"``), ``tma`` (TMA tile loads: ``UTMALDG`` in
the SASS, ``cp.async.bulk.tensor`` global-to-shared in the PTX), ``hmma`` (Ampere ``mma.sync``), ``smem``
(bytes per block: Triton's dynamic plus ptxas's static) and ``ctas_per_sm``, the blocks one SM holds at once
given registers (allocated per warp in units of 256), shared memory (plus 1 KiB reserved per block),
threads and the block limit (:data:`SM_LIMITS`); ``occupancy_limit`` names the binding one.

Run it as ``pyfastpeft compile-report`` (or ``python -m pyfastpeft.tools.compile_report``). Target (see
docs/performance.md, section 1 item 3): zero spilled bytes in every shipped config; ``--fail-on-spill``
turns spills into a non-zero exit code. A failed compile always does.

``TRITON_INTERPRET`` must be unset when the kernel modules are imported (under the interpreter
``@triton.jit`` returns functions that cannot be compiled). When it is set, :func:`run` re-executes this
module in a subprocess with the variable removed and returns that subprocess's results.

Recognised ``AOTSpec.meta`` keys (all optional): ``"options"``: extra ``triton.compile`` options (e.g.
``{"maxnreg": 128}``); ``"aligned"``: assume 16-byte-aligned pointer arguments, as a real launch with
ordinary torch tensors does (default ``True``); ``"divisible_by_16"``: names of integer arguments to
specialise as multiples of 16 (as the JIT does for such values, e.g. strides and ``K``); ``"archs"``: compile
only for these architectures (a Hopper-only kernel lists ``("sm_90a",)``).

Fidelity: at launch the JIT specialises pointers that are 16-byte aligned, integers that are multiples of
16, and integers equal to 1 (compiled as the constant 1). A spec reproduces the launched code only if it
says the same: pointers are assumed aligned here; put unit strides in ``constexprs`` (``"stride_k": 1``,
which overrides an ``"i32"`` signature entry) and list multiple-of-16 integers in
``meta["divisible_by_16"]``. Otherwise loads along the unit stride cannot be vectorised and the report
shows more registers than the real kernel uses.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from pyfastpeft.core.table import table

PACKAGE = "pyfastpeft.triton_kernels"
DEFAULT_ARCHS = ("sm_80", "sm_90a")

# Maximum dynamic shared memory one block may opt into, in bytes (CUDA programming guide, "Technical
# Specifications per Compute Capability"). A Triton kernel asking for more fails at launch.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

# Per-SM resources that bound how many CTAs of one kernel are resident at once (CUDA programming guide,
# "Technical Specifications per Compute Capability", and the occupancy calculator's allocation rules):
# ``regs``: 32-bit registers per SM; ``threads``: resident threads per SM; ``ctas``: resident blocks per SM;
# ``smem``: shared memory per SM in bytes (A100: 164 KiB, H100/H200: 228 KiB), of which the driver reserves
# ``smem_reserved`` bytes per resident block; ``reg_unit``: registers are allocated per warp in units of this
# many (so a thread's count is rounded up to a multiple of reg_unit / 32).
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, ctas=32, smem=164 * 1024, smem_reserved=1024, reg_unit=256),
    86: dict(regs=65536, threads=1536, ctas=16, smem=100 * 1024, smem_reserved=1024, reg_unit=256),
    89: dict(regs=65536, threads=1536, ctas=24, smem=100 * 1024, smem_reserved=1024, reg_unit=256),
    90: dict(regs=65536, threads=2048, ctas=32, smem=228 * 1024, smem_reserved=1024, reg_unit=256),
}

_TRUE = {"1", "true", "on", "yes", "y"}


class CompileReportError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------
# environment


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def _child_env() -> dict:
    """Environment for the re-executed report: no interpreter; our sys.path so the same modules import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _import_package():
    """``pyfastpeft.triton_kernels``, installed, or from a source checkout (``<repo>/triton_kernels``)."""
    try:
        return importlib.import_module(PACKAGE)
    except ModuleNotFoundError as e:
        if e.name not in (PACKAGE, "pyfastpeft"):
            raise
    pkg_dir = Path(__file__).resolve().parents[2] / "triton_kernels"
    init = pkg_dir / "__init__.py"
    if not init.is_file():
        raise CompileReportError(f"cannot import {PACKAGE} and found no {init}")
    importlib.import_module("pyfastpeft")
    spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(pkg_dir)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(PACKAGE, None)
        raise
    setattr(sys.modules["pyfastpeft"], "triton_kernels", mod)
    return mod


def discover_modules() -> list[str]:
    """Fully qualified names of every family's Triton kernel modules (the table of families)."""
    from pyfastpeft.families import kernel_modules

    _import_package()
    return kernel_modules()


def expand_modules(names: Iterable) -> list:
    """A family name stands for its kernel modules (``"orthogonal"`` -> cayley, oft_linear); other names
    pass through (a module's last name, ``"cayley"``, or a dotted name)."""
    from pyfastpeft.families import FAMILIES, family

    out: list = []
    for n in names:
        out.extend(family(n).kernels if isinstance(n, str) and n in FAMILIES else [n])
    return out


def _qualify(name: str) -> str:
    """``"cayley"`` -> ``pyfastpeft.triton_kernels.orthogonal.cayley`` (the kernel module of that name in the
    table of families), else ``pyfastpeft.triton_kernels.<name>``; dotted names as given."""
    if "." in name:
        return name
    from pyfastpeft.families import kernel_modules

    for qual in kernel_modules():
        if qual.rsplit(".", 1)[1] == name:
            return qual
    return f"{PACKAGE}.{name}"


# ----------------------------------------------------------------------------------------------------
# triton version differences


def _parse_arch(arch: str) -> tuple[int, str]:
    """``"sm_90a"`` -> ``(90, "sm_90a")``; ``"sm_80"``, ``"80"``, ``"sm80"`` accepted."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)(a?)", arch.strip())
    if not m:
        raise CompileReportError(f"unrecognised architecture {arch!r} (expected e.g. sm_80, sm_90a)")
    cap = int(m.group(1))
    # Triton targets the arch-specific ("a") variant from sm_90 on; ptxas must be told the same.
    name = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    return cap, name


def _ptxas_path(cap: int) -> str:
    """The ptxas Triton itself would use (its bundled one, or ``TRITON_PTXAS_PATH``)."""
    try:  # triton >= 3.4: knobs
        from triton import knobs

        tool = knobs.nvidia.ptxas_blackwell if cap >= 100 and hasattr(knobs.nvidia, "ptxas_blackwell") \
            else knobs.nvidia.ptxas
        if tool is not None and tool.path:
            return tool.path
    except Exception:
        pass
    try:  # triton 3.0 - 3.3
        from triton.backends.nvidia import compiler as nv

        return nv._path_to_binary("ptxas")[0]
    except Exception:
        pass
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if bundled.is_file():
        return str(bundled)
    found = shutil.which("ptxas")
    if found:
        return found
    raise CompileReportError("no ptxas found (neither bundled with Triton nor on PATH)")


def _unwrap_kernel(fn):
    """The ``JITFunction`` under autotuner/heuristics wrappers; error if it is an interpreted function."""
    seen = 0
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn") and seen < 8:
        fn = fn.fn
        seen += 1
    if type(fn).__name__ == "InterpretedFunction":
        raise CompileReportError("kernel was decorated under TRITON_INTERPRET=1 and cannot be compiled; "
                                 "import the kernel modules with TRITON_INTERPRET unset")
    if not hasattr(fn, "arg_names"):
        raise CompileReportError(f"kernel {fn!r} is not a @triton.jit function")
    return fn


def _complete_signature(spec, fn) -> tuple[dict, dict]:
    """Check the spec against the kernel's parameters; fill constexpr defaults. Errors name the problem."""
    arg_names = list(fn.arg_names)
    signature = dict(spec.signature)
    constexprs = dict(spec.constexprs)
    unknown = [k for k in list(signature) + list(constexprs) if k not in arg_names]
    if unknown:
        raise CompileReportError(f"{fn.__name__} has no argument(s) {sorted(set(unknown))}; "
                                 f"its arguments are {arg_names}")
    for k in constexprs:
        # A value given for it makes it a compile-time constant, also for a runtime argument: that is what
        # the JIT does with an integer argument equal to 1 (e.g. a unit stride), so {"stride_xk": 1}
        # reproduces the code a launch with contiguous tensors gets.
        signature[k] = "constexpr"
    params = {p.name: p for p in getattr(fn, "params", [])}
    for name in arg_names:
        if name in signature and (signature[name] != "constexpr" or name in constexprs):
            continue
        p = params.get(name)
        default = getattr(p, "default", inspect.Parameter.empty) if p is not None else inspect.Parameter.empty
        if default is not inspect.Parameter.empty and (signature.get(name) == "constexpr"
                                                        or getattr(p, "is_constexpr", False)):
            signature[name] = "constexpr"
            constexprs[name] = default
        elif signature.get(name) == "constexpr":
            raise CompileReportError(f"constexpr argument {name!r} has no value in constexprs")
        else:
            raise CompileReportError(f"argument {name!r} of {fn.__name__} is missing from the signature")
    # Triton wants the signature in argument order.
    return {k: signature[k] for k in arg_names}, constexprs


def _divisibility_attr(backend) -> list:
    parse = getattr(backend, "parse_attr", None)
    if parse is not None:
        try:
            return parse("D")
        except Exception:
            pass
    return [["tt.divisibility", 16]]


def _make_source(spec, fn, target):
    """``triton.compiler.ASTSource`` for the spec, across Triton versions.

    Triton >= 3.3 (3.6, 3.8): ``ASTSource(fn, signature, constexprs=..., attrs=...)``: the signature names
    every argument, constexprs with type ``"constexpr"``; ``constexprs`` keyed by name; ``attrs`` keyed by
    argument-index tuples, values lists of ``[attr, value]`` pairs. Triton 3.2 and older took
    ``constants=`` instead (with a name-keyed compatibility shim in 3.2) and an ``AttrsDescriptor``.
    """
    import triton
    from triton.compiler import ASTSource

    signature, constexprs = _complete_signature(spec, fn)
    meta = dict(getattr(spec, "meta", None) or {})
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        attrs = {}
        try:
            from triton.compiler.compiler import make_backend

            div = _divisibility_attr(make_backend(target))
        except Exception:
            div = [["tt.divisibility", 16]]
        aligned = bool(meta.get("aligned", True))
        div_ints = set(meta.get("divisible_by_16", ()))
        for i, name in enumerate(fn.arg_names):
            ty = signature[name]
            if (aligned and ty.startswith("*")) or (name in div_ints and ty.startswith(("i", "u"))):
                attrs[(i,)] = div
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs or None)
    if "constants" in params:  # triton <= 3.2, best effort, no alignment attributes
        return ASTSource(fn=fn, signature=signature, constants=constexprs)
    raise CompileReportError(f"unsupported triton {triton.__version__}: ASTSource{inspect.signature(ASTSource)}")


def _metadata_get(md, name, default=None):
    if isinstance(md, dict):
        return md.get(name, default)
    return getattr(md, name, default)


# ----------------------------------------------------------------------------------------------------
# ptxas


_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "ptxas_smem": re.compile(r"(\d+) bytes smem"),
    "barriers": re.compile(r"used (\d+) barriers"),
}


def parse_ptxas_log(log: str) -> dict:
    """Numbers from a ``ptxas -v`` log. Max over functions for registers/smem/barriers, sum for spills."""
    out = {}
    for key, rx in _RE.items():
        vals = [int(v) for v in rx.findall(log)]
        if key in ("spill_stores", "spill_loads", "stack_frame"):
            out[key] = sum(vals)
        else:
            out[key] = max(vals) if vals else (None if key == "registers" else 0)
    notes = []
    for line in log.splitlines():
        low = line.lower()
        if "warning" in low or "performance loss" in low:
            notes.append(re.sub(r"^ptxas\s+(info|warning)\s*:\s*", "", line.strip()))
    out["ptxas_notes"] = notes
    return out


def run_ptxas(ptx: str, arch: str, ptxas: Optional[str] = None) -> tuple[dict, str]:
    cap, arch = _parse_arch(arch)
    ptxas = ptxas or _ptxas_path(cap)
    with tempfile.TemporaryDirectory(prefix="pyfastpeft-ptxas-") as d:
        src = os.path.join(d, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Same flags Triton's own cubin step uses that can change code generation (-lineinfo does not).
        cmd = [ptxas, "-lineinfo", "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        raise CompileReportError(f"ptxas failed ({proc.returncode}) for {arch}:\n{log.strip()}")
    return parse_ptxas_log(log), log


def _ptxas_version(ptxas: str) -> str:
    try:
        out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release (\S+?),", out)
        return m.group(1) if m else out.strip().splitlines()[-1]
    except Exception as e:  # pragma: no cover
        return f"unknown ({e})"


# ----------------------------------------------------------------------------------------------------
# what the kernel really does: instruction counts and occupancy

# SASS opcodes counted per static instruction (``cuobjdump -sass`` of the cubin): HGMMA is Hopper's
# warpgroup MMA (PTX ``wgmma.mma_async``), HMMA the Ampere-style ``mma.sync``, UTMALDG a TMA tile load
# (PTX ``cp.async.bulk.tensor`` global -> shared), UTMASTG a TMA store, LDGSTS Ampere's ``cp.async``.
_SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDGSTS")
_SASS_RX = {op: re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?" + op + r"\b", re.M) for op in _SASS_OPS}
_PTX_RX = {
    "wgmma": re.compile(r"^\s*(?:@!?%p\d+\s+)?wgmma\.mma_async\b", re.M),
    "mma": re.compile(r"^\s*(?:@!?%p\d+\s+)?mma\.sync\b", re.M),
    # global -> shared tensor copies only (a TMA store is cp.async.bulk.tensor.<n>d.global.shared::cta)
    "tma": re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.bulk\.tensor\.\w+\.shared::(?:cta|cluster)\.global\b", re.M),
    "tma_store": re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.bulk\.tensor\.\w+\.global\.shared::(?:cta|cluster)\b",
                            re.M),
}


def count_sass(sass: str) -> dict:
    """Static instruction counts of ``_SASS_OPS`` in ``cuobjdump -sass`` text (predicated ones included)."""
    return {op.lower(): len(rx.findall(sass)) for op, rx in _SASS_RX.items()}


def count_ptx(ptx: str) -> dict:
    """Static counts in PTX: ``wgmma`` (wgmma.mma_async), ``mma`` (mma.sync), ``tma`` (cp.async.bulk.tensor
    loads) and ``tma_store``."""
    return {k: len(rx.findall(ptx)) for k, rx in _PTX_RX.items()}


def _cuobjdump_path() -> Optional[str]:
    """``cuobjdump`` next to the ptxas Triton uses, else on PATH; None if there is none."""
    try:
        cand = Path(_ptxas_path(90)).with_name("cuobjdump")
        if cand.is_file():
            return str(cand)
    except CompileReportError:
        pass
    return shutil.which("cuobjdump")


def disassemble(cubin: bytes, tool: Optional[str] = None) -> Optional[str]:
    """SASS text of a cubin via ``cuobjdump -sass``; None when no cuobjdump is available or it fails."""
    tool = tool or _cuobjdump_path()
    if not tool or not cubin:
        return None
    with tempfile.TemporaryDirectory(prefix="pyfastpeft-sass-") as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 and proc.stdout else None


def ctas_per_sm(cap: int, registers: Optional[int], num_warps: int, smem: int) -> tuple[Optional[int], str]:
    """Resident CTAs per SM of one kernel and what limits them (``"regs"``, ``"smem"``, ``"threads"``,
    ``"ctas"``): registers rounded up per warp to the allocation unit, ``smem`` bytes (dynamic + static) plus the
    driver's per-block reservation, threads, and the block limit. ``(None, "")`` for an unknown arch."""
    lim = SM_LIMITS.get(cap) or SM_LIMITS.get(max((c for c in SM_LIMITS if c <= cap), default=-1))
    if lim is None or registers is None or num_warps <= 0:
        return None, ""
    unit = lim["reg_unit"]
    per_warp = -(-registers * 32 // unit) * unit
    bounds = {
        "regs": lim["regs"] // (per_warp * num_warps),
        "threads": lim["threads"] // (32 * num_warps),
        "ctas": lim["ctas"],
        "smem": lim["smem"] // (smem + lim["smem_reserved"]),
    }
    limiter = min(bounds, key=lambda k: (bounds[k], ("regs", "smem", "threads", "ctas").index(k)))
    return bounds[limiter], limiter


# ----------------------------------------------------------------------------------------------------
# compile one spec


def _dtypes_of(signature: dict) -> str:
    ptr = sorted({t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*")})
    return ",".join(ptr)


def _judge(k, cap: int, row: dict) -> dict:
    """What the compiled kernel does: wgmma / TMA / mma.sync counts (from the SASS when cuobjdump can read
    the cubin, else from the PTX: ``counts_from`` says which), shared memory, CTAs per SM and its limiter."""
    ptx = count_ptx(k.asm.get("ptx", "") if hasattr(k.asm, "get") else k.asm["ptx"])
    out = {"ptx_wgmma": ptx["wgmma"], "ptx_tma": ptx["tma"], "ptx_tma_store": ptx["tma_store"]}
    sass = None
    try:
        sass = disassemble(k.asm["cubin"])
    except Exception:  # noqa: BLE001 - no cubin / no tool: fall back to the PTX counts
        sass = None
    if sass:
        c = count_sass(sass)
        out.update(wgmma=c["hgmma"], tma=c["utmaldg"], hmma=c["hmma"], counts_from="sass")
    else:
        out.update(wgmma=ptx["wgmma"], tma=ptx["tma"], hmma=ptx["mma"], counts_from="ptx")
    smem = int(row.get("triton_shared") or 0) + int(row.get("ptxas_smem") or 0)
    warps = int(_metadata_get(k.metadata, "num_warps", 0) or row.get("num_warps") or 0)
    ctas, limiter = ctas_per_sm(cap, row.get("registers"), warps, smem)
    out.update(smem=smem, ctas_per_sm=ctas, occupancy_limit=limiter or None)
    return out


def compile_spec(spec, arch: str, module: str = "") -> dict:
    """Compile one spec for one architecture; returns a result row (``ok`` False and ``error`` on failure)."""
    cap, arch_name = _parse_arch(arch)
    row: dict[str, Any] = {
        "module": module,
        "spec": getattr(spec, "name", repr(spec)),
        "kernel": None,
        "arch": arch_name,
        "num_warps": getattr(spec, "num_warps", None),
        "num_stages": getattr(spec, "num_stages", None),
        "dtypes": _dtypes_of(getattr(spec, "signature", {}) or {}),
        "registers": None,
        "spill_stores": None,
        "spill_loads": None,
        "stack_frame": None,
        "ptxas_smem": None,
        "triton_shared": None,
        "smem_limit": SMEM_LIMIT.get(cap),
        "barriers": None,
        "smem": None,
        "wgmma": None,
        "tma": None,
        "hmma": None,
        "counts_from": None,
        "ctas_per_sm": None,
        "occupancy_limit": None,
        "compile_s": None,
        "ptxas_notes": [],
        "ok": False,
        "error": None,
    }
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        fn = _unwrap_kernel(spec.kernel)
        row["kernel"] = fn.__name__
        target = GPUTarget("cuda", cap, 32)
        src = _make_source(spec, fn, target)
        meta = dict(getattr(spec, "meta", None) or {})
        options = {"num_warps": int(spec.num_warps), "num_stages": int(spec.num_stages)}
        options.update(meta.get("options", {}) or {})
        # On a ptxas failure Triton prints the whole PTX to stdout; the exception carries the log.
        with contextlib.redirect_stdout(io.StringIO()):
            k = triton.compile(src, target=target, options=options)
        row["compile_s"] = round(time.perf_counter() - t0, 3)
        row["triton_shared"] = int(_metadata_get(k.metadata, "shared", 0) or 0)
        stats, _ = run_ptxas(k.asm["ptx"], arch_name)
        row.update(stats)
        row.update(_judge(k, cap, row))
        problems = []
        limit = row["smem_limit"]
        total_smem = row["triton_shared"] + (row["ptxas_smem"] or 0)
        if limit is not None and total_smem > limit:
            problems.append(f"needs {total_smem} bytes of shared memory per block; {arch_name} allows {limit}")
        if row["registers"] is None:
            problems.append("ptxas -v reported no register count")
        if problems:
            row["error"] = "; ".join(problems)
        else:
            row["ok"] = True
    except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
        msg = f"{type(e).__name__}: {e}".strip()
        row["error"] = msg if len(msg) < 4000 else msg[:4000] + " ..."
    if row["compile_s"] is None:
        row["compile_s"] = round(time.perf_counter() - t0, 3)
    return row


# ----------------------------------------------------------------------------------------------------
# collection, table, entry points


def collect_specs(modules: Optional[Iterable] = None) -> tuple[list[tuple[str, Any]], list[dict]]:
    """``[(module_name, spec), ...]`` and error rows for modules that failed to import / lack specs."""
    modules = discover_modules() if modules is None else expand_modules(modules)
    pairs, errors = [], []
    for m in modules:
        if inspect.ismodule(m):
            name, mod = m.__name__, m
        else:
            name = str(m)
            try:
                name, mod = _import_kernel_module(name)
            except Exception as e:  # noqa: BLE001
                errors.append(_error_row(_qualify(name), "<import>", f"{type(e).__name__}: {e}"))
                continue
        specs = getattr(mod, "AOT_SPECS", None)
        if specs is None:
            continue  # a helper module without kernels
        try:
            specs = list(specs)
        except TypeError:
            errors.append(_error_row(name, "<AOT_SPECS>", "AOT_SPECS is not a list"))
            continue
        pairs.extend((name, s) for s in specs)
    return pairs, errors


def _import_kernel_module(name: str):
    """``"cayley"`` -> its kernel module in the table of families (or a top-level ``cayley`` if there is
    none); dotted names as given. Returns ``(qualified_name, module)``."""
    if "." in name:
        return name, importlib.import_module(name)
    _import_package()  # so that the submodule resolves from a source checkout too
    qual = _qualify(name)
    try:
        return qual, importlib.import_module(qual)
    except ModuleNotFoundError as e:
        if e.name != qual:
            raise
    return name, importlib.import_module(name)


def _error_row(module: str, spec: str, error: str) -> dict:
    return {"module": module, "spec": spec, "kernel": None, "arch": "-", "num_warps": None,
            "num_stages": None, "dtypes": "", "registers": None, "spill_stores": None, "spill_loads": None,
            "stack_frame": None, "ptxas_smem": None, "triton_shared": None, "smem_limit": None,
            "barriers": None, "smem": None, "wgmma": None, "tma": None, "hmma": None, "counts_from": None,
            "ctas_per_sm": None, "occupancy_limit": None, "compile_s": None, "ptxas_notes": [], "ok": False,
            "error": error}


def has_spill(row: dict) -> bool:
    return bool((row.get("spill_stores") or 0) > 0 or (row.get("spill_loads") or 0) > 0)


_COLUMNS = [  # header, key, align
    ("spec", "spec", "<"),
    ("arch", "arch", "<"),
    ("warps", "num_warps", ">"),
    ("stages", "num_stages", ">"),
    ("regs", "registers", ">"),
    ("spill st", "spill_stores", ">"),
    ("spill ld", "spill_loads", ">"),
    ("ptxas smem", "ptxas_smem", ">"),
    ("triton shared", "triton_shared", ">"),
    ("wgmma", "wgmma", ">"),
    ("tma", "tma", ">"),
    ("CTAs/SM", "ctas_per_sm", ">"),
    ("compile s", "compile_s", ">"),
    ("status", "status", "<"),
]


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table; ``ptxas smem`` is static shared memory from ``ptxas -v``, ``triton shared`` the
    dynamic shared memory Triton requests at launch (``metadata.shared``). ``HGMMA`` / ``UTMALDG`` count
    Hopper warpgroup MMAs and TMA tile loads in the SASS (headers ``wgmma (PTX)`` / ``tma (PTX)`` when they
    were counted in the PTX because no cuobjdump was found); ``CTAs/SM`` is the resident blocks per SM
    from registers, shared memory and threads, with the resource that limits it."""

    def status(r):
        if not r.get("ok"):
            return "FAIL"
        s = "SPILL" if has_spill(r) else "ok"
        if r.get("ptxas_notes"):
            s += " (ptxas note)"
        return s

    def cell(r, key):
        if key == "status":
            return status(r)
        v = r.get(key)
        if v is None:
            return "-"
        if key == "compile_s":
            return f"{v:.2f}"
        return str(v)

    def header(h, key):
        # say where the instruction counts come from: the SASS (HGMMA, UTMALDG) or, without cuobjdump, the PTX
        srcs = {r.get("counts_from") for r in rows if r.get("counts_from")}
        if key == "wgmma":
            return "HGMMA" if srcs == {"sass"} else "wgmma (PTX)" if srcs == {"ptx"} else "wgmma"
        if key == "tma":
            return "UTMALDG" if srcs == {"sass"} else "tma (PTX)" if srcs == {"ptx"} else "tma"
        return h

    def cell_(r, key):
        if key == "ctas_per_sm" and r.get("ctas_per_sm") is not None and r.get("occupancy_limit"):
            return f"{r['ctas_per_sm']} ({r['occupancy_limit']})"
        if key in ("wgmma", "tma") and r.get("counts_from") and len({x.get("counts_from") for x in rows
                                                                     if x.get("counts_from")}) > 1:
            return f"{r[key]} {r['counts_from']}"
        return cell(r, key)

    lines = [table([header(h, k) for h, k, _ in _COLUMNS], [[cell_(r, k) for _, k, _ in _COLUMNS] for r in rows],
                   align=[a for _, _, a in _COLUMNS])]
    details = []
    for r in rows:
        if r.get("error"):
            details.append(f"FAIL {r['module']}:{r['spec']} [{r['arch']}]: {r['error']}")
        for n in r.get("ptxas_notes") or []:
            details.append(f"note {r['spec']} [{r['arch']}]: {n}")
    if details:
        lines.append("")
        lines.extend(details)
    return "\n".join(lines)


def _versions() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
        info["ptxas"] = _ptxas_version(_ptxas_path(90))
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"unavailable ({e})"
    return info


def _write_json(path, rows, versions) -> None:
    data = {"versions": versions, "results": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _run_in_subprocess(modules, archs, json_path, fail_on_spill, spec_filter, quiet, fresh,
                       jobs) -> list[dict]:
    names = None
    if modules is not None:
        names = [m.__name__ if inspect.ismodule(m) else str(m) for m in modules]
    with tempfile.TemporaryDirectory(prefix="pyfastpeft-compile-report-") as d:
        out = json_path or os.path.join(d, "report.json")
        cmd = [sys.executable, "-m", "pyfastpeft.tools.compile_report", "--json", str(out), "--arch", *archs]
        if names is not None:
            cmd += ["--modules", *names] if names else ["--modules"]
        if fail_on_spill:
            cmd.append("--fail-on-spill")
        if spec_filter:
            cmd += ["--filter", spec_filter]
        if quiet:
            cmd.append("--quiet")
        if fresh:
            cmd.append("--fresh")
        cmd += ["--jobs", str(jobs)]
        proc = subprocess.run(cmd, env=_child_env())
        if not os.path.exists(out):
            raise CompileReportError(f"compile report subprocess exited with {proc.returncode} and wrote no "
                                     f"results ({' '.join(cmd)})")
        with open(out) as f:
            return json.load(f)["results"]


def _compile_worker(module: str, index: int, arch: str) -> dict:
    """Runs in a worker process: import the module by name and compile its ``index``-th spec."""
    if module.startswith(PACKAGE + "."):
        _import_package()
    mod = importlib.import_module(module)
    return compile_spec(list(mod.AOT_SPECS)[index], arch, module=module)


def _compile_parallel(tasks, jobs: int, progress) -> list[dict]:
    """Compile in ``jobs`` spawned processes (Triton's compiler is not thread-safe); rows in task order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    out: list[Optional[dict]] = [None] * len(tasks)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = {ex.submit(_compile_worker, m, i, a): k for k, (m, i, _, a) in enumerate(tasks)}
        from concurrent.futures import as_completed

        for fut in as_completed(futs):
            k = futs[fut]
            m, _, spec, arch = tasks[k]
            try:
                row = fut.result()
            except Exception as e:  # noqa: BLE001 - e.g. a worker killed by ptxas/LLVM crashing it
                row = _error_row(m, getattr(spec, "name", repr(spec)), f"{type(e).__name__}: {e}")
                row["arch"] = _parse_arch(arch)[1]
            progress(row)
            out[k] = row
    return [r for r in out if r is not None]


def run(modules=None, archs: Sequence[str] = DEFAULT_ARCHS, json_path=None, fail_on_spill: bool = False,
        spec_filter: Optional[str] = None, quiet: bool = False, fresh: bool = False, jobs: int = 1,
        _in_process: bool = False) -> list[dict]:
    """Compile every spec of ``modules`` (default: all kernel modules) for each arch; print the table.

    ``modules``: module names (``"lora"`` means ``pyfastpeft.triton_kernels.lora``; dotted names are used
    as given) or module objects. ``spec_filter``: only specs whose name contains this substring. Returns
    one dict per (spec, arch), plus one per module that failed to import; ``row["ok"]`` is False for
    failures (``row["error"]`` says why). ``fail_on_spill`` only affects :func:`main`'s exit code and the
    summary line. ``fresh``: bypass Triton's on-disk cache (``TRITON_ALWAYS_COMPILE=1``) so that
    ``compile_s`` is the real compile time; otherwise a cached kernel reports only the cache lookup.
    ``jobs``: compile in that many worker processes (0: one per CPU).
    With ``TRITON_INTERPRET`` set, the work is done by a subprocess without it.
    """
    archs = tuple(archs)
    for a in archs:
        _parse_arch(a)  # fail early on a typo
    if _interpret_env() and not _in_process:
        return _run_in_subprocess(modules, archs, json_path, fail_on_spill, spec_filter, quiet, fresh, jobs)
    try:
        import triton  # noqa: F401
    except Exception as e:
        raise CompileReportError(f"triton is not importable: {e}") from e
    if fresh:
        old = os.environ.get("TRITON_ALWAYS_COMPILE")
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
        try:
            return run(modules, archs, json_path, fail_on_spill, spec_filter, quiet, False, jobs,
                       _in_process=True)
        finally:
            if old is None:
                os.environ.pop("TRITON_ALWAYS_COMPILE", None)
            else:
                os.environ["TRITON_ALWAYS_COMPILE"] = old

    versions = _versions()
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    pairs, rows = collect_specs(modules)
    seen: dict[str, int] = {}
    indexed = []
    for m, s in pairs:  # (module, position in its AOT_SPECS, spec): workers look specs up by position
        seen[m] = seen.get(m, -1) + 1
        indexed.append((m, seen[m], s))
    pairs = indexed
    if spec_filter:
        pairs = [(m, i, s) for m, i, s in pairs if spec_filter in getattr(s, "name", "")]
    total = sum(_spec_wants(s, a) for (_, _, s) in pairs for a in archs)
    log(f"compile report: triton {versions.get('triton')}, ptxas {versions.get('ptxas', '?')}, "
        f"{len(pairs)} spec(s) x {len(archs)} arch(s)")
    tasks = [(m, i, s, a) for (m, i, s) in pairs for a in archs if _spec_wants(s, a)]
    done = 0

    def progress(row):
        nonlocal done
        done += 1
        state = "ok" if row["ok"] else "FAIL"
        log(f"[{done}/{total}] {row['spec']} {row['arch']}: {state}, regs {row['registers']}, "
            f"spills {row['spill_stores']}/{row['spill_loads']}, wgmma {row.get('wgmma')}, tma {row.get('tma')}, "
            f"CTAs/SM {row.get('ctas_per_sm')}, {row['compile_s']:.2f} s")

    jobs = (os.cpu_count() or 1) if not jobs or jobs < 1 else int(jobs)
    if jobs == 1 or len(tasks) < 2:
        for m, _, spec, arch in tasks:
            row = compile_spec(spec, arch, module=m)
            progress(row)
            rows.append(row)
    else:
        rows.extend(_compile_parallel(tasks, jobs, progress))
    if not quiet:
        print(format_table(rows))
        nfail = sum(not r["ok"] for r in rows)
        nspill = sum(has_spill(r) for r in rows if r["ok"])
        print(f"\n{len(rows)} row(s): {nfail} failed, {nspill} with spills"
              + (" (--fail-on-spill)" if fail_on_spill and nspill else ""))
        if not pairs and not rows:
            print("no AOT_SPECS found", file=sys.stderr)
    if json_path:
        _write_json(json_path, rows, versions)
    return rows


def _spec_wants(spec, arch: str) -> bool:
    """``meta["archs"]`` limits a spec to some architectures (a Hopper-only kernel: TMA, wgmma)."""
    only = (getattr(spec, "meta", None) or {}).get("archs")
    return not only or _parse_arch(arch)[1] in {_parse_arch(a)[1] for a in only}


def exit_code(rows: Sequence[dict], fail_on_spill: bool = False) -> int:
    if any(not r.get("ok") for r in rows):
        return 1
    if fail_on_spill and any(has_spill(r) for r in rows):
        return 1
    return 0


def build_parser(prog: str = "pyfastpeft compile-report") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="targets (default: sm_80 sm_90a)")
    p.add_argument("--modules", nargs="*", default=None,
                   help="kernel modules (short names within pyfastpeft.triton_kernels, or dotted names); "
                        "default: all")
    p.add_argument("--filter", dest="spec_filter", default=None, help="only specs whose name contains this")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    p.add_argument("--fail-on-spill", action="store_true", help="exit non-zero if any config spills")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no table")
    p.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (0: one per CPU; default 1)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore Triton's kernel cache so that 'compile s' is the real compile time")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (``pyfastpeft compile-report``). Returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        rows = run(modules=args.modules, archs=args.arch, json_path=args.json_path,
                   fail_on_spill=args.fail_on_spill, spec_filter=args.spec_filter, quiet=args.quiet,
                   fresh=args.fresh, jobs=args.jobs)
    except CompileReportError as e:
        print(f"compile report: {e}", file=sys.stderr)
        return 2
    code = exit_code(rows, args.fail_on_spill)
    if code and not args.quiet:
        bad = [f"{r['module']}:{r['spec']} [{r['arch']}]" for r in rows
               if not r.get("ok") or (args.fail_on_spill and has_spill(r))]
        print("compile report failed for: " + ", ".join(bad), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
