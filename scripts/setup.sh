#!/usr/bin/env bash
# Creates (or reuses) the virtual environment $FUSEDRL_VENV (default: .venv in the repository),
# installs exactly the versions of scripts/requirements.lock into it (no resolution: a release
# upstream cannot change what CI runs), then builds and installs fusedrl from this checkout: the
# C++ CPU kernels always, the CUDA kernels when nvcc is on PATH (FUSEDRL_CUDA=ON), for sm_80 and
# sm_90 unless CMAKE_CUDA_ARCHITECTURES / CUDAARCHS say otherwise.
#
# A second run does nothing when the lock, the sources and the build settings are unchanged: the
# venv keeps a stamp of their hash. FUSEDRL_LOCK=<file> installs another lock (scripts/latest.sh).
# Usage: bash scripts/setup.sh   (prints the backends fusedrl sees at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FUSEDRL_VENV:-.venv}"
lock="${FUSEDRL_LOCK:-scripts/requirements.lock}"
py="${PYTHON:-python3}"

if [ -z "${FUSEDRL_CUDA:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then export FUSEDRL_CUDA=ON; else export FUSEDRL_CUDA=AUTO; fi
fi

# What the installed environment depends on: the lock, the build settings and every build input.
hash_of() { sha256sum | cut -c1-64; }
lock_hash=$(hash_of < "$lock")
src_hash=$(
  {
    echo "FUSEDRL_CUDA=$FUSEDRL_CUDA CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-} CUDAARCHS=${CUDAARCHS:-}"
    find csrc python/fusedrl CMakeLists.txt pyproject.toml -type f \
      ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
  } | hash_of
)
stamp="$venv/.fusedrl-setup"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$lock_hash $src_hash" ]; then
  echo "setup: $venv is up to date (lock and sources unchanged)" >&2
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps)
installed_lock=$(cut -d' ' -f1 "$stamp" 2>/dev/null || true)
if [ "$installed_lock" != "$lock_hash" ]; then
  echo "setup: installing $lock into $venv" >&2
  # --no-deps: the lock lists every package; torch==2.13.0+cpu is the CPU wheel (an unpinned torch
  # would pull a multi-GB CUDA build).
  "${pip[@]}" -r "$lock"
fi
echo "setup: building fusedrl with FUSEDRL_CUDA=$FUSEDRL_CUDA into $venv" >&2
# No build isolation: scikit-build-core, pybind11, cmake and ninja come from the lock, and the
# build folder (one per venv: its CMake cache names that venv's tools) is reused, so a changed
# source rebuilds incrementally.
"${pip[@]}" --no-build-isolation --config-settings=build-dir="build/$(basename "$venv")" .
# Import from / so that nothing in the checkout can shadow the installed package.
vpy=$(realpath -s "$venv/bin/python")
(cd / && "$vpy" -c "import fusedrl; print('fusedrl', fusedrl.__version__, 'backends:', fusedrl.backends())") >&2
echo "$lock_hash $src_hash" > "$stamp"
