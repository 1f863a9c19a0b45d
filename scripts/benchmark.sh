#!/usr/bin/env bash
# Sets up .venv (torch CPU, fusedrl built from this checkout, the peers and the benchmark extras)
# and runs the benchmark harness: every case, fusedrl vs the reference vs the peers vs the floor.
# Writes benchmarks/results/ (JSON, PNG) and benchmarks/RESULTS.md. Arguments go to the harness
# (e.g. --quick for a one-minute smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "bench,peers"
exec "${FUSEDRL_VENV:-.venv}/bin/python" -m benchmarks "$@"
