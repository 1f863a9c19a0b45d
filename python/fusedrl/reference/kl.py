"""Reference per-token KL estimators between the policy and a reference policy.

With x = log pi_theta(token) (differentiable), r = log pi_ref(token) and d = r - x
(J. Schulman, "Approximating KL divergence", 2020; docs/OBJECTIVES.md "KL estimators"):

============== ============================================================= =====================
kind           value                                                         follows
============== ============================================================= =====================
``k1``         x - r                                                         verl ``kl`` / ``k1``
``abs``        |x - r|                                                       verl ``abs``
``k2``         0.5 (x - r)^2                                                 verl ``mse`` / ``k2``
``k3``         exp(d) - d - 1, unclamped                                     TRL GRPO ``beta`` term
``low_var_kl`` clamp(exp(d') - d' - 1, -10, 10), d' = clamp(d, -20, 20)       verl ``low_var_kl``
                                                                             and verl ``k3``
``<kind>+``    value of ``<kind>``, gradient of k2: k2 - sg(k2) + sg(kind)   verl straight-through
============== ============================================================= =====================

``k3`` overflows to +inf where r - x exceeds ~88 (float32) or ~709 (float64), as TRL's does; use
``low_var_kl`` for a bounded estimator. Gradients w.r.t. x: k1 -> 1, abs -> sign(x - r),
k2 and every ``+`` kind -> x - r, k3 -> 1 - exp(d), low_var_kl -> 1 - exp(d') inside both clamps
and 0 outside.
"""

from __future__ import annotations

import torch

from fusedrl.reference.logprobs import accumulation_dtype

BASE_KINDS = ("k1", "abs", "k2", "k3", "low_var_kl")
KINDS = BASE_KINDS + tuple(k + "+" for k in BASE_KINDS)

# verl's safety bounds of low_var_kl (core_algos.kl_penalty_forward).
LOW_VAR_KL_LOG_RATIO_BOUND = 20.0
LOW_VAR_KL_VALUE_BOUND = 10.0


def kl_value(diff: torch.Tensor, kind: str) -> torch.Tensor:
    """The estimator ``kind`` (a base kind, no ``+``) of the per-token log-ratio ``diff = x - r``."""
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "k2":
        return 0.5 * diff.square()
    if kind == "k3":
        d = -diff
        return torch.exp(d) - d - 1.0
    if kind == "low_var_kl":
        d = (-diff).clamp(-LOW_VAR_KL_LOG_RATIO_BOUND, LOW_VAR_KL_LOG_RATIO_BOUND)
        return (torch.exp(d) - d - 1.0).clamp(-LOW_VAR_KL_VALUE_BOUND, LOW_VAR_KL_VALUE_BOUND)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def kl_estimator(diff: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate from ``diff = x - r`` for any kind, ``+`` kinds included."""
    if kind.endswith("+"):
        forward = kl_value(diff, kind[:-1])
        backward = kl_value(diff, "k2")
        return backward - backward.detach() + forward.detach()
    return kl_value(diff, kind)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate of ``kind`` between the policy (``logp``) and the reference.

    Computed in float32 (float64 for float64 input); the gradient flows to both inputs.
    """
    dtype = accumulation_dtype(torch.promote_types(logp.dtype, ref_logp.dtype))
    return kl_estimator(logp.to(dtype) - ref_logp.to(dtype), kind)
