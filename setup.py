"""Decides whether and how to build the optional CUDA extension ``pyfastpeft._C``.

All metadata (name, version, dependencies) lives in pyproject.toml; this file adds the package list (every
family folder, found, with ``triton_kernels/`` installed as ``pyfastpeft.triton_kernels``), ``ext_modules``
and a ``build_ext`` command.

``PYFASTPEFT_BUILD_CUDA`` (build time, default ``auto``):

* ``auto``: build ``_C`` when torch (a CUDA build: ``torch.version.cuda``) and nvcc are found. Never
  fails an install: without torch/nvcc it prints why and installs the pure-Python package, and if
  the compile itself fails it prints a warning and installs without the extension. Note that with
  build isolation (plain ``pip install .``) torch is not importable, so auto skips the extension;
  build it with ``pip install --no-build-isolation .``.
* ``1``: build ``_C`` or fail loudly.
* ``0``: never build it.

Other build-time variables: ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``), ``MAX_JOBS``
(ninja parallelism, read by torch), ``NVCC_THREADS`` (``nvcc --threads``, default 2; each nvcc
thread can take several GB of memory), ``CUDA_HOME`` (else found from the ``nvcc`` on PATH, following
a wrapper script to the real toolkit), ``PYFASTPEFT_PTXAS_VERBOSE=1`` (print ptxas register/spill
reports, used by .ci/build_cuda.sh).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shlex
import shutil
import sys
from typing import Optional

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100 (+PTX: JIT for newer GPUs)


def _say(msg: str) -> None:
    print(f"pyfastpeft setup: {msg}", flush=True)


PACKAGE_DIR = {"pyfastpeft": "pyfastpeft", "pyfastpeft.triton_kernels": "triton_kernels"}


def packages() -> list:
    """``pyfastpeft`` and its subpackages, and ``triton_kernels/`` (with its family folders) installed as
    ``pyfastpeft.triton_kernels``: never a top-level ``triton_kernels``."""
    from setuptools import find_packages

    here = os.path.dirname(os.path.abspath(__file__))
    ours = find_packages(here, include=["pyfastpeft", "pyfastpeft.*"])
    kernels = ["pyfastpeft.triton_kernels"] + ["pyfastpeft.triton_kernels." + p
                                               for p in find_packages(os.path.join(here, "triton_kernels"))]
    return ours + kernels


def build_mode() -> str:
    """``auto``, ``1`` or ``0`` from ``PYFASTPEFT_BUILD_CUDA``."""
    raw = os.environ.get("PYFASTPEFT_BUILD_CUDA", "auto").strip().lower() or "auto"
    if raw in ("1", "true", "yes", "on"):
        return "1"
    if raw in ("0", "false", "no", "off"):
        return "0"
    if raw == "auto":
        return "auto"
    raise SystemExit(f"pyfastpeft setup: PYFASTPEFT_BUILD_CUDA must be auto, 1 or 0, got {raw!r}")


def _toolkit_from_nvcc(nvcc: str, depth: int = 0) -> Optional[str]:
    """The CUDA toolkit directory of an ``nvcc``: ``<home>/bin/nvcc`` -> ``<home>``.

    If ``nvcc`` is a shell script (a wrapper such as ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``),
    follow the absolute ``.../nvcc`` path it runs instead.
    """
    path = os.path.realpath(nvcc)
    try:
        with open(path, "rb") as f:
            is_script = f.read(2) == b"#!"
            text = f.read().decode("utf-8", "replace") if is_script else ""
    except OSError:
        return None
    if not is_script:
        return os.path.dirname(os.path.dirname(path))
    if depth >= 3:
        return None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        for tok in tokens:
            if (os.path.isabs(tok) and os.path.basename(tok) == "nvcc" and os.path.isfile(tok)
                    and os.path.realpath(tok) != path):
                return _toolkit_from_nvcc(tok, depth + 1)
    return None


def find_cuda_home() -> Optional[str]:
    """``CUDA_HOME`` / ``CUDA_PATH`` if set, else the toolkit of the ``nvcc`` on PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_from_nvcc(nvcc)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def wheel_cuda_include_dirs(cuda_version: str) -> list[str]:
    """``<site-packages>/nvidia/cu<major>/include`` of torch's CUDA wheels, when present.

    ATen's CUDA headers include e.g. ``cusparse.h``, which a minimal toolkit may lack; torch's own
    nvidia-* wheels ship them.
    """
    major = cuda_version.split(".")[0]
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = [os.path.join(base, f"cu{major}", "include") for base in spec.submodule_search_locations]
    return [d for d in dirs if os.path.isdir(d)]


def _fail_or_skip(mode: str, why: str):
    if mode == "1":
        raise SystemExit(f"pyfastpeft setup: PYFASTPEFT_BUILD_CUDA=1 but {why}")
    _say(f"{why}; installing without the CUDA extension pyfastpeft._C (triton/torch backends only)")
    return [], {}


def cuda_extensions(mode: str):
    """``(ext_modules, cmdclass)`` for ``setup()``."""
    if mode == "0":
        _say("PYFASTPEFT_BUILD_CUDA=0: not building the CUDA extension pyfastpeft._C")
        return [], {}
    try:
        import torch
    except ImportError as e:
        return _fail_or_skip(mode, f"torch is not importable at build time ({e}); with build isolation "
                                   "use `pip install --no-build-isolation .` to build the extension")
    if not torch.version.cuda:
        return _fail_or_skip(mode, f"torch {torch.__version__} is not a CUDA build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return _fail_or_skip(mode, "no nvcc found (set CUDA_HOME or put nvcc on PATH)")

    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, and without a GPU it does not
    # look through a wrapper script, so set it first (and on the module, in case it was imported).
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    sources = sorted(
        os.path.relpath(p, ROOT)
        for pattern in ("csrc/**/*.cpp", "csrc/**/*.cu")
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )
    nvcc_flags = ["-O3", "-lineinfo", "--threads", os.environ.get("NVCC_THREADS", "2")]
    if os.environ.get("PYFASTPEFT_PTXAS_VERBOSE", "0") == "1":
        nvcc_flags.append("-Xptxas=-v")
    ext = cpp_extension.CUDAExtension(
        name="pyfastpeft._C",
        sources=sources,
        # ninja needs absolute include paths
        include_dirs=[os.path.join(ROOT, "csrc")] + wheel_cuda_include_dirs(torch.version.cuda),
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
        # Only TORCH_LIBRARY + a PyInit stub: the stable ABI suffices, so one abi3 .so serves every
        # CPython >= 3.10 (torch adds -DPy_LIMITED_API and drops libtorch_python).
        py_limited_api=True,
    )
    _say(f"building pyfastpeft._C with CUDA_HOME={cuda_home}, "
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, torch {torch.__version__}")
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None
                                                     or importlib.util.find_spec("ninja") is not None)
    return [ext], {"build_ext": _forgiving_build_ext(base, mode)}


def _forgiving_build_ext(base, mode: str):
    """``base`` (torch's BuildExtension) that, in auto mode, turns a failed compile into a warning."""

    class PyfastpeftBuildExt(base):
        def run(self):
            try:
                super().run()
            except Exception as e:  # compile/link errors surface as RuntimeError or DistutilsError
                if mode != "auto":
                    raise
                _say(f"WARNING: building the CUDA extension pyfastpeft._C failed ({type(e).__name__}: {e}); "
                     "installing without it (triton/torch backends only). Set PYFASTPEFT_BUILD_CUDA=1 "
                     "to make this an error, or PYFASTPEFT_BUILD_CUDA=0 to skip the attempt.")
                self.extensions = []  # nothing for install/editable steps to look for

    return PyfastpeftBuildExt


def main() -> None:
    ext_modules, cmdclass = cuda_extensions(build_mode())
    options = {"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {}
    # results files of `pyfastpeft bench --device cuda --smoke` shipped with the package (core/results.py)
    setup(packages=packages(), package_dir=PACKAGE_DIR, package_data={"pyfastpeft": ["data/results/*.json"]},
          ext_modules=ext_modules, cmdclass=cmdclass, options=options)


if __name__ == "__main__":
    main()
