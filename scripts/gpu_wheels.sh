#!/usr/bin/env bash
# Downloads into build/gpu-wheels/ the wheels scripts/gpu_check.sh needs on a GPU machine without
# network (CPython 3.12, manylinux x86_64) when the machine lacks them: the build tools
# (scikit-build-core, pybind11, cmake, ninja) and the test tools (pytest, hypothesis), with their
# dependencies. Binary wheels only (cp312 manylinux or py3-none-any). Versions: the ones pinned in
# scripts/requirements.lock when it pins them, else the latest. The folder is replaced, its size
# printed and kept under 60 MB (it is copied to the GPU machine); build/ is not committed.
# Usage: bash scripts/gpu_wheels.sh   (run on a machine with access to PyPI; PYTHON=<interpreter>
# picks the pip that downloads, default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=build/gpu-wheels
limit_mb=60
lock=scripts/requirements.lock
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if ! "$py" -m pip --version >/dev/null 2>&1; then
  echo "gpu_wheels: '$py' has no pip (set PYTHON=<an interpreter with pip>)" >&2
  exit 2
fi

pkgs=()
for name in scikit-build-core pybind11 cmake ninja pytest hypothesis; do
  # The lock spells names either way (scikit_build_core / scikit-build-core); match both, any case.
  pattern="^$(echo "$name" | sed 's/[-_]/[-_]/g')=="
  pin=$(grep -iE "$pattern" "$lock" 2>/dev/null | head -1 | cut -d'=' -f3 | cut -d' ' -f1 || true)
  if [ -n "$pin" ]; then pkgs+=("$name==$pin"); else pkgs+=("$name"); fi
done
echo "gpu_wheels: downloading ${pkgs[*]} (+ dependencies) for CPython 3.12, manylinux x86_64"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --disable-pip-version-check --quiet --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$tmp" "${pkgs[@]}"

size=$(du -sb "$tmp" | cut -f1)
mb=$(( (size + 1048575) / 1048576 ))
if [ "$mb" -gt "$limit_mb" ]; then
  echo "gpu_wheels: the wheels take $mb MB, more than the $limit_mb MB limit; $dest left unchanged" >&2
  ls -l "$tmp" >&2
  exit 1
fi
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
trap - EXIT
ls -1 "$dest"
echo "gpu_wheels: $(ls "$dest" | wc -l) wheels, $mb MB ($size bytes) in $dest"
echo "copy it to the GPU machine's checkout as build/gpu-wheels/, then: bash scripts/gpu_check.sh OUTDIR"
