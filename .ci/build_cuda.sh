#!/usr/bin/env bash
# Build the CUDA extension pyfastpeft._C with nvcc (no GPU needed) and check the result:
#   - the .so exists and embeds cubins for sm_80 and sm_90;
#   - per-kernel registers / spills (cuobjdump --dump-resource-usage, plus the ptxas -v report);
#   - it loads on this (possibly CPU-only) machine and registers torch.ops.pyfastpeft_C.*;
#   - calling an op with CPU tensors fails with an error that names the device.
# The build goes to a temporary directory (deleted on exit), never into pyfastpeft/ of the source
# tree, so the CPU test run that follows still sees "extension not built".
#
# Usage: .ci/build_cuda.sh            (PYTHON=... to pick the interpreter; KEEP_BUILD=1 keeps the dir)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python}"
START=$(date +%s)

# CUDA_HOME exactly as setup.py finds it (CUDA_HOME/CUDA_PATH, else the nvcc on PATH through its wrapper).
if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME="$("$PY" - "$ROOT/setup.py" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pyfastpeft_setup", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)  # setup() only runs under __main__
print(mod.find_cuda_home() or "")
EOF
)"
fi
if [[ -z "$CUDA_HOME" ]]; then
  echo "build_cuda.sh: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)" >&2
  exit 1
fi
export CUDA_HOME
export PYFASTPEFT_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST="8.0;9.0"
export PYFASTPEFT_PTXAS_VERBOSE=1
export NVCC_THREADS="${NVCC_THREADS:-2}"
echo "CUDA_HOME=$CUDA_HOME  TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST  NVCC_THREADS=$NVCC_THREADS  MAX_JOBS=${MAX_JOBS:-<ninja default>}"
"$CUDA_HOME/bin/nvcc" --version | tail -n 2

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pyfastpeft-cuda-build.XXXXXX")"
if [[ "${KEEP_BUILD:-0}" != "1" ]]; then
  trap 'rm -rf "$WORK"' EXIT
fi
LOG="$WORK/build.log"

echo "=== building into $WORK/lib"
set +e
"$PY" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp" >"$LOG" 2>&1
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  tail -n 80 "$LOG"
  echo "build_cuda.sh: build FAILED (rc=$rc)" >&2
  exit "$rc"
fi
BUILD_END=$(date +%s)

SO="$(find "$WORK/lib/pyfastpeft" -maxdepth 1 -name '_C*.so' | head -n 1)"
if [[ -z "$SO" || ! -f "$SO" ]]; then
  echo "build_cuda.sh: no pyfastpeft/_C*.so under $WORK/lib" >&2
  exit 1
fi
echo "=== built $(basename "$SO") ($(du -h "$SO" | cut -f1))"
# Safety: the source tree must not have picked up a built extension.
if compgen -G "$ROOT/pyfastpeft/_C*.so" >/dev/null; then
  echo "build_cuda.sh: a _C*.so appeared in $ROOT/pyfastpeft/ (in-place build?)" >&2
  exit 1
fi

# cuobjdump: the toolkit's, else PATH, else the one bundled with Triton.
CUOBJDUMP=""
for cand in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
            "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  if [[ -n "$cand" && -x "$cand" ]]; then CUOBJDUMP="$cand"; break; fi
done
if [[ -z "$CUOBJDUMP" ]]; then
  echo "build_cuda.sh: cuobjdump not found" >&2
  exit 1
fi

echo "=== embedded cubins ($CUOBJDUMP --list-elf)"
ELFS="$("$CUOBJDUMP" --list-elf "$SO")"
echo "$ELFS"
for arch in sm_80 sm_90; do
  if ! grep -q "$arch" <<<"$ELFS"; then
    echo "build_cuda.sh: no $arch cubin in $SO" >&2
    exit 1
  fi
done

demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }

echo "=== per-kernel resource usage (REG = registers/thread, STACK/LOCAL > 0 = spills or local arrays)"
"$CUOBJDUMP" --dump-resource-usage "$SO" | demangle \
  | grep -E "arch = sm_|Function|REG:" | sed -E 's/^[[:space:]]+//'

echo "=== ptxas -v summary (per kernel and arch)"
# ptxas prints: "Compiling entry function '<mangled>' for 'sm_90'" then "Used N registers, ... spill stores/loads".
awk '/Compiling entry function/ {fn=$0; sub(/.*function .*_Z/, "_Z", fn); sub(/'"'"'.*/, "", fn);
                                  arch=$0; sub(/.*for '"'"'/, "", arch); sub(/'"'"'.*/, "", arch)}
     /bytes spill stores/ {sp=$0}
     /Used [0-9]+ registers/ {n=$0; sub(/.*Used /, "", n); sub(/ registers.*/, "", n);
                              s=sp; sub(/.*bytes stack frame, /, "", s); print arch "  regs=" n "  " s "  " fn}' "$LOG" \
  | sort -u | demangle

echo "=== load check (this machine may have no GPU)"
"$PY" - "$SO" <<'EOF'
import importlib.util, sys
import torch
so = sys.argv[1]
spec = importlib.util.spec_from_file_location("pyfastpeft._C", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)  # runs PyInit__C and the static TORCH_LIBRARY registrations
import re
from pyfastpeft.families import twin_checks
import glob
schemas = [op for f in sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
           for op in re.findall(r'm\.def\(\s*"(\w+)\(', open(f).read())]
assert schemas, "no m.def(...) schema found under csrc/"
for op in schemas:  # every declared op is registered and has a first-use twin check
    assert hasattr(torch.ops.pyfastpeft_C, op), f"torch.ops.pyfastpeft_C.{op} is not registered"
    assert op in twin_checks(), f"{op} has no twin check in its family's TWIN_CHECKS (pyfastpeft/<family>/twin.py)"
    print(f"registered: torch.ops.pyfastpeft_C.{op}: {getattr(torch.ops.pyfastpeft_C, op).default._schema}")
try:
    torch.ops.pyfastpeft_C.lora_shrink(torch.zeros(2, 3), torch.zeros(1, 3))
except (NotImplementedError, RuntimeError) as e:
    assert "CPU" in str(e), str(e)
    print("CPU tensors rejected as expected:", str(e).splitlines()[0][:150])
else:
    raise AssertionError("lora_shrink accepted CPU tensors")
EOF

END=$(date +%s)
echo "=== build time: $((BUILD_END - START)) s (total with checks: $((END - START)) s)"
