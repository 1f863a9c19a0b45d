#!/usr/bin/env bash
# One command for a GPU machine: bash scripts/gpu_check.sh OUTDIR
#
# Steps (each prints a header, its time, and what it skipped and why):
#   a. versions: nvidia-smi, python, torch (+ its CUDA), triton, nvcc, cmake; stops here when torch
#      sees no CUDA device;
#   b. build: fusedrl with the CUDA kernels for this GPU only (CMAKE_CUDA_ARCHITECTURES from
#      torch.cuda.get_device_capability(), FUSEDRL_CUDA=ON) into a throwaway venv made with
#      --system-site-packages (the machine's torch and triton are used), by
#      pip install --no-build-isolation --no-deps . ; the build tools (scikit-build-core, pybind11,
#      cmake, ninja) come from the machine when importable, else from build/gpu-wheels/
#      (scripts/gpu_wheels.sh fills it on a machine with network access);
#   c. tests: python -m pytest -p no:cacheprovider tests/gpu --gpu (JUnit XML: OUTDIR/junit.xml);
#      pytest and hypothesis from the machine or build/gpu-wheels/;
#   d. bench: python -m benchmarks.gpu --out OUTDIR (OUTDIR/gpu.json, OUTDIR/gpu_summary.md).
# Each step runs under `timeout` (GPU_CHECK_BUILD_TIMEOUT=210, GPU_CHECK_TEST_TIMEOUT=150,
# GPU_CHECK_BENCH_TIMEOUT=100 seconds): the whole check stays under 8 minutes.
#
# Exit status: 0 all passed (bench failures are reported, not fatal); 1 the build or the tests
# failed; 2 usage; 3 no CUDA device (nothing built); 4 a step could not run for a missing
# requirement (torch, triton, nvcc, pip, the build or test tools): its reason is printed.
# PYTHON=<interpreter> picks the Python that has the machine's torch (default: python3).
set -uo pipefail

usage() { echo "usage: bash scripts/gpu_check.sh OUTDIR   (writes logs, junit.xml, gpu.json, gpu_summary.md there)" >&2; }
if [ $# -ne 1 ] || [ -z "$1" ] || [ "${1:0:1}" = "-" ]; then
  usage
  exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1" 2>/dev/null || { echo "gpu_check: cannot create OUTDIR '$1'" >&2; exit 2; }
out="$(cd "$1" && pwd)"
py="${PYTHON:-python3}"
build_timeout="${GPU_CHECK_BUILD_TIMEOUT:-210}"
test_timeout="${GPU_CHECK_TEST_TIMEOUT:-150}"
bench_timeout="${GPU_CHECK_BENCH_TIMEOUT:-100}"
for t in "$build_timeout" "$test_timeout" "$bench_timeout"; do
  case "$t" in ''|*[!0-9]*) echo "gpu_check: the GPU_CHECK_*_TIMEOUT values must be whole seconds, got '$t'" >&2; exit 2 ;; esac
done
wheels="$repo/build/gpu-wheels"
work="$(mktemp -d "${TMPDIR:-/tmp}/fusedrl-gpu-check.XXXXXX")"
venv="$work/venv"
trap 'rm -rf "$work"' EXIT

t_all=$(date +%s)
declare -a summary=()
status=0
header() { printf '\n==== %s ====\n' "$1"; t_step=$(date +%s); }
took() { echo "$(( $(date +%s) - t_step )) s"; }
note() { summary+=("$1"); }
skip() { echo "skipped $1"; }
finish() {
  echo
  echo "==== summary ($(( $(date +%s) - t_all )) s) ===="
  printf '%s\n' "${summary[@]}" | tee "$out/gpu_check_summary.txt"
  echo "results in $out"
  exit "$1"
}

# ---------------------------------------------------------------------------------------------
header "a. machine and versions"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || nvidia-smi 2>&1 | head -15
else
  skip "nvidia-smi: not on PATH"
fi
if ! command -v "$py" >/dev/null 2>&1; then
  echo "gpu_check: no Python interpreter '$py' (set PYTHON=...)"
  note "a. versions: FAILED to start: no interpreter '$py'"
  finish 4
fi
"$py" - <<'EOF' 2>&1 | tee "$out/versions.txt"
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "| cuda available:", torch.cuda.is_available(),
          "| devices:", torch.cuda.device_count())
    if torch.cuda.is_available():
        print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
except Exception as exc:
    print("torch: not importable:", exc)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
for name in ("scikit_build_core", "pybind11", "cmake", "ninja", "pytest", "hypothesis", "trl", "liger_kernel"):
    try:
        mod = __import__(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception:
        print(f"{name}: not importable")
EOF
nvcc_bin="$(command -v nvcc || true)"
if [ -z "$nvcc_bin" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc_bin=/usr/local/cuda/bin/nvcc
  export PATH="/usr/local/cuda/bin:$PATH"
fi
if [ -n "$nvcc_bin" ]; then "$nvcc_bin" --version | tail -2; else skip "nvcc: not on PATH nor in /usr/local/cuda/bin"; fi
command -v cmake >/dev/null 2>&1 && cmake --version | head -1
took

gpu_ok=$("$py" -c "import torch; print(int(torch.cuda.is_available() and torch.cuda.device_count() > 0))" 2>/dev/null || echo torch-missing)
if [ "$gpu_ok" = "torch-missing" ]; then
  echo "gpu_check: '$py' cannot import torch; set PYTHON to the interpreter that has the machine's torch"
  note "a. versions: torch not importable by $py: nothing built"
  finish 4
fi
if [ "$gpu_ok" != "1" ]; then
  echo "gpu_check: torch sees no CUDA device on this machine: nothing to check (no build, no tests, no benchmark)"
  note "a. versions: no CUDA device: nothing built"
  finish 3
fi
arch=$("$py" -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))")
note "a. versions: ok (CUDA device, sm_$arch)"

# ---------------------------------------------------------------------------------------------
header "b. build fusedrl (FUSEDRL_CUDA=ON, CMAKE_CUDA_ARCHITECTURES=$arch) into a throwaway venv"
built=0
build_skip=""
if [ -z "$nvcc_bin" ]; then
  build_skip="no nvcc: the CUDA kernels cannot be compiled"
elif ! "$py" -c "import triton" >/dev/null 2>&1; then
  build_skip="triton is not importable by $py (the triton backend is required here)"
fi
if [ -z "$build_skip" ]; then
  if "$py" -m venv --system-site-packages "$venv" >"$out/venv.log" 2>&1; then
    pip=("$venv/bin/python" -m pip)
  elif "$py" -m venv --system-site-packages --without-pip "$venv" >>"$out/venv.log" 2>&1 \
       && "$py" -m pip --version >/dev/null 2>&1; then
    pip=("$py" -m pip --python "$venv/bin/python")  # no ensurepip: the machine's pip, aimed at the venv
  else
    build_skip="cannot create a venv with pip (see $out/venv.log)"
  fi
fi
if [ -z "$build_skip" ]; then
  vpy="$venv/bin/python"
  # When $py is itself a venv (or conda env), --system-site-packages sees only its base
  # interpreter's packages: a .pth file adds every site folder of $py, after the venv's own.
  "$vpy" - "$py" <<'EOF'
import site, subprocess, sys
dirs = subprocess.run([sys.argv[1], "-c", "import site, sys; print('\\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))"],
                      capture_output=True, text=True, check=True).stdout.split()
with open(site.getsitepackages()[0] + "/_gpu_check_parent.pth", "w") as f:
    f.write("\n".join(dirs) + "\n")
EOF
  pipi=("${pip[@]}" install --disable-pip-version-check --no-input --no-index)
  if ! "$vpy" -c "import torch, triton; print('venv sees torch', torch.__version__, 'triton', triton.__version__)"; then
    build_skip="the throwaway venv does not see the machine's torch and triton"
  fi
fi
if [ -z "$build_skip" ]; then
  # Build tools: the machine's, else the local wheel folder.
  missing=()
  "$vpy" -c "import scikit_build_core, sys; v = tuple(map(int, scikit_build_core.__version__.split('.')[:2])); sys.exit(v < (0, 10))" 2>/dev/null || missing+=("scikit-build-core")
  "$vpy" -c "import pybind11, sys; v = tuple(map(int, pybind11.__version__.split('.')[:2])); sys.exit(v < (2, 12))" 2>/dev/null || missing+=("pybind11")
  if ! "$vpy" -c "import cmake" 2>/dev/null; then
    cm=$(cmake --version 2>/dev/null | head -1 | grep -oE '[0-9]+\.[0-9]+' | head -1)
    if [ -z "$cm" ] || ! "$vpy" -c "import sys; sys.exit(tuple(map(int, '$cm'.split('.'))) < (3, 24))"; then missing+=("cmake"); fi
  fi
  "$vpy" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null 2>&1 || missing+=("ninja")
  if [ ${#missing[@]} -gt 0 ]; then
    if [ -d "$wheels" ] && "${pipi[@]}" --quiet --find-links "$wheels" "${missing[@]}" >"$out/build-tools.log" 2>&1; then
      echo "build tools from $wheels: ${missing[*]}"
    else
      build_skip="build tools missing (${missing[*]}) and not installable from $wheels (run scripts/gpu_wheels.sh on a machine with network and copy build/gpu-wheels)"
    fi
  fi
fi
if [ -n "$build_skip" ]; then
  skip "build: $build_skip"
  note "b. build: SKIPPED: $build_skip"
  took
else
  # Host-side LTO off (pybind11 enables it by default): it only changes the CPU kernels, which
  # this check does not measure, and the LTO link is the longest part of the build.
  export FUSEDRL_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
  echo "pip install --no-build-isolation --no-deps . (log: $out/build.log)"
  if (cd "$repo" && timeout "$build_timeout" "${pipi[@]}" -v --no-build-isolation --no-deps \
        --config-settings=build-dir="$work/build" \
        --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" \
        --config-settings=cmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF \
        . >"$out/build.log" 2>&1); then
    if (cd / && "$vpy" -c "
import fusedrl, sys
from fusedrl import _ext
b = fusedrl.backends()
print('fusedrl', fusedrl.__file__, 'backends:', b)
sys.exit(0 if b['cuda'] is None and b['triton'] is None else 1)"); then
      built=1
      note "b. build: ok ($(took), sm_$arch)"
    else
      echo "gpu_check: the installed fusedrl cannot run the cuda or triton backend (above)"
      note "b. build: FAILED: built, but the cuda / triton backend is unavailable"
      status=1
    fi
  else
    rc=$?
    tail -40 "$out/build.log"
    if [ $rc -eq 124 ]; then why="timed out after ${build_timeout} s"; else why="exit $rc"; fi
    echo "gpu_check: build failed ($why); full log: $out/build.log"
    note "b. build: FAILED ($why, $(took)); log $out/build.log"
    status=1
  fi
  took
fi

# ---------------------------------------------------------------------------------------------
header "c. tests: pytest tests/gpu --gpu"
if [ $built -ne 1 ]; then
  skip "tests: fusedrl was not built"
  note "c. tests: SKIPPED: fusedrl was not built"
else
  test_skip=""
  tmissing=()
  "$vpy" -c "import pytest" 2>/dev/null || tmissing+=("pytest")
  "$vpy" -c "import hypothesis" 2>/dev/null || tmissing+=("hypothesis")
  if [ ${#tmissing[@]} -gt 0 ]; then
    if [ -d "$wheels" ] && "${pipi[@]}" --quiet --find-links "$wheels" "${tmissing[@]}" >"$out/test-tools.log" 2>&1; then
      echo "test tools from $wheels: ${tmissing[*]}"
    else
      test_skip="test tools missing (${tmissing[*]}) and not installable from $wheels"
    fi
  fi
  if [ -n "$test_skip" ]; then
    skip "tests: $test_skip"
    note "c. tests: SKIPPED: $test_skip"
  else
    (cd "$repo" && timeout "$test_timeout" "$vpy" -m pytest -p no:cacheprovider tests/gpu --gpu -q -rfEs \
        --junitxml="$out/junit.xml") 2>&1 | tee "$out/tests.log"
    rc=${PIPESTATUS[0]}
    line=$(grep -E '[0-9]+ (passed|failed|error)' "$out/tests.log" | tail -1)
    if [ "$rc" -eq 0 ]; then
      note "c. tests: ok ($(took)): $line"
    else
      [ "$rc" -eq 124 ] && line="timed out after ${test_timeout} s; $line"
      note "c. tests: FAILED (exit $rc, $(took)): $line; see $out/tests.log, $out/junit.xml"
      status=1
    fi
  fi
  took
fi

# ---------------------------------------------------------------------------------------------
header "d. benchmark: python -m benchmarks.gpu --out $out"
if [ $built -ne 1 ]; then
  skip "bench: fusedrl was not built"
  note "d. bench: SKIPPED: fusedrl was not built"
else
  # --budget-s: the benchmark stops starting implementations before the timeout and writes its files.
  (cd "$repo" && timeout "$bench_timeout" "$vpy" -m benchmarks.gpu --out "$out" \
      --budget-s $(( bench_timeout * 85 / 100 ))) 2>&1 | tee "$out/bench.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) note "d. bench: ok ($(took)): $out/gpu_summary.md" ;;
    1) note "d. bench: ran with failed implementations ($(took)): see the Failed list in $out/gpu_summary.md" ;;
    124) note "d. bench: timed out after ${bench_timeout} s (partial results in $out/gpu.json)" ;;
    *) note "d. bench: FAILED to run (exit $rc, $(took)); see $out/bench.log" ;;
  esac
  took
fi

if [ $status -eq 0 ] && { [ $built -ne 1 ] || printf '%s\n' "${summary[@]}" | grep -q 'SKIPPED'; }; then
  status=4
fi
finish $status
