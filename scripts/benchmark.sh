#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh: the locked versions of torch CPU, the peers and the benchmark
# tools; fusedrl built from this checkout) and runs the benchmark harness: every case, fusedrl vs
# the reference vs the peers vs the floor. Writes benchmarks/results/ (JSON, PNG; not in git) and
# benchmarks/RESULTS.md (the summary kept in git). Arguments go to the harness (e.g. --quick for a one-minute smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${FUSEDRL_VENV:-.venv}/bin/python" -m benchmarks "$@"
