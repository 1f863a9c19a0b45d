#!/usr/bin/env bash
# Sets up .venv (torch CPU, fusedrl built from this checkout with the test and peers extras, verl)
# and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test,peers,bench"
exec "${FUSEDRL_VENV:-.venv}/bin/python" -m pytest -p no:cacheprovider tests "$@"
