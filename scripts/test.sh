#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh: the locked versions of torch CPU, the test tools, TRL, Liger,
# verl; fusedrl built from this checkout) and runs the whole test suite. Extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${FUSEDRL_VENV:-.venv}/bin/python" -m pytest -p no:cacheprovider tests "$@"
