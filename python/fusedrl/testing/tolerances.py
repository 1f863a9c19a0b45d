"""Tolerances: a float32 (float64) result within 1e-5 (1e-10) of a float64 gold, relative to the
gold's largest magnitude and at least on the unit scale (see :mod:`fusedrl.testing`)."""

from __future__ import annotations

import torch

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def max_error(actual: torch.Tensor, gold: torch.Tensor) -> float:
    """Largest absolute difference, NaN-aware: NaN where the gold is NaN is equal, elsewhere inf."""
    a, g = actual.detach().double(), gold.detach().double()
    if a.shape != g.shape:
        raise ValueError(f"actual must have the gold's shape {tuple(g.shape)}, got {tuple(a.shape)}")
    both_nan = torch.isnan(a) & torch.isnan(g)
    same_inf = torch.isinf(a) & torch.isinf(g) & (a == g)
    diff = (a - g).abs().masked_fill(both_nan | same_inf, 0.0)
    diff = diff.masked_fill(torch.isnan(diff), float("inf"))
    return float(diff.max()) if diff.numel() else 0.0


def scale_of(gold: torch.Tensor, floor: float = 1.0) -> float:
    """max |gold| over its finite elements, at least ``floor``."""
    g = gold.detach().double()
    g = g[torch.isfinite(g)]
    return max(float(g.abs().max()) if g.numel() else 0.0, floor, 1e-30)


def assert_close_to_reference(
    actual: torch.Tensor,
    gold: torch.Tensor,
    *,
    dtype: torch.dtype,
    torch_error: float | None = None,
    name: str = "value",
    floor: float = 1.0,
) -> None:
    """Assert ``actual`` is close to the float64 ``gold`` for a computation on ``dtype`` inputs.

    float32/float64: ``max|actual - gold| <= rtol * max(max|gold|, floor)`` (rtol 1e-5 / 1e-10).
    bfloat16/float16: ``max|actual - gold| <= 2 * torch_error``, where ``torch_error`` is the
    error of eager torch doing the same computation in that dtype (measured by the caller).
    """
    err = max_error(actual, gold)
    scale = scale_of(gold, floor)
    if dtype in RTOL:
        bound = RTOL[dtype] * scale
        rule = f"{RTOL[dtype]:g} x max(max|gold|, {floor:g}) ({scale:.3g})"
    else:
        if torch_error is None:
            raise ValueError(f"torch_error is required for dtype {dtype}")
        bound = 2.0 * torch_error + 1e-12 * scale
        rule = f"2 x the eager-torch {dtype} error ({torch_error:.3g})"
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3g} exceeds {bound:.3g} = {rule}")
