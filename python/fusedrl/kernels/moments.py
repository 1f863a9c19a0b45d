"""Moments of a set of values in Triton, function by function as csrc/include/fusedrl/moments.h:
the one definition of the unbiased variance and the whitening scale that the segment-statistics
and scan kernels finish with. The whitening epsilon is a runtime argument: the caller passes
:data:`fusedrl.reference.advantages.WHITEN_EPS`."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedrl.reference.advantages import WHITEN_EPS  # noqa: F401  (re-exported for the launchers)


@triton.jit
def unbiased_var(m2, n):
    """m2 / (n - 1); 0 for fewer than two values, NaN kept (moments.h unbiased_var)."""
    return tl.where(n > 1, m2 / tl.where(n > 1, n - 1.0, 1.0), tl.where(m2 == m2, 0.0, m2))


@triton.jit
def whiten_scale(var, eps):
    """1 / sqrt(var + eps) (moments.h whiten_scale)."""
    return 1.0 / tl.sqrt(var + eps)
