#!/usr/bin/env bash
# Creates (or reuses) the virtual environment $FUSEDRL_VENV (default: .venv in the repository) and
# installs fusedrl into it with the extras given as $1 (e.g. "test,peers"). Builds the C++ CPU
# kernels always and the CUDA kernels when nvcc is on PATH (FUSEDRL_CUDA=ON), for sm_80 and sm_90.
# Usage: source-free; call as `bash scripts/setup.sh EXTRAS`; prints the venv's python at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${FUSEDRL_VENV:-.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# The CPU wheel of torch 2.13.0 (an unpinned torch would pull a multi-GB CUDA build).
"${pip[@]}" "torch==2.13.0" numpy
if [ -z "${FUSEDRL_CUDA:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then export FUSEDRL_CUDA=ON; else export FUSEDRL_CUDA=AUTO; fi
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "installing fusedrl ($spec) with FUSEDRL_CUDA=$FUSEDRL_CUDA into $venv" >&2
"${pip[@]}" -c scripts/constraints.txt "$spec"
if [[ ",$extras," == *",peers,"* ]]; then
  # verl's own dependency list pulls ~75 packages and downgrades transformers: install it without
  # them, then what importing verl.trainer.ppo.core_algos needs (shared/PEERS.md).
  "${pip[@]}" -c scripts/constraints.txt --no-deps verl
  "${pip[@]}" -c scripts/constraints.txt ray tensordict hydra-core codetiming orjson
fi
"$venv/bin/python" -c "import fusedrl; print('fusedrl', fusedrl.__version__, 'backends:', fusedrl.backends())" >&2
