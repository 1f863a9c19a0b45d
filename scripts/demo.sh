#!/usr/bin/env bash
# The main job: sets up .venv (scripts/setup.sh), then trains a small Qwen2 model with GRPO on
# the CPU twice from the same seed, with TRL's GRPOTrainer and with fusedrl's
# (examples/grpo_demo.py), and writes demo-out/demo.png, demo.md and demo.json.
# Usage: bash scripts/demo.sh [--quick] [--steps N] [--out DIR] ...
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=demo-out
for arg in "$@"; do case "$arg" in --out|--out=*) out="";; esac; done
exec "${FUSEDRL_VENV:-.venv}/bin/python" examples/grpo_demo.py ${out:+--out "$out"} "$@"
