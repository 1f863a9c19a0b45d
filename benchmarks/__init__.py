"""fusedrl benchmarks: `python -m benchmarks` (see harness.py)."""
