r"""Reference clipped value loss (PPO critic; docs/OBJECTIVES.md "Value loss").

Notation: v = the predicted values (the differentiable input), v_old = the values of the rollout
(``old_values``), R = the returns, c = ``clip``, m the mask (0 = padding; bool/int 1 or a float
per-token weight). Per token

    l = 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)      (c given)
    l = 0.5 * (v - R)^2                                                 (c None)

then :func:`fusedrl.reference.aggregate.aggregate` by ``aggregation`` (the one place where
normalizers are written). The 1/2 sits inside the token loss; verl multiplies its aggregate by 1/2,
which is the same number (a power of two).

Ties follow torch's autograd: the outer max of two equal values sends half the gradient to each;
the clip's gradient at its bounds depends on ``clip_ties``:

- ``"clamp"`` (default; OpenRLHF's ``(v - v_old).clamp(-c, c)``): ``torch.clamp``, whose gradient
  passes at the bounds (inclusive);
- ``"verl"`` (verl's ``clip_by_value`` = ``max(min(v, v_old + c), v_old - c)``): at
  v = v_old + c or v_old - c the min (max) of two equal values passes 1/2; with c = 0 and
  v = v_old, 1/4.

The values are the same in both: clip(v, lo, hi) = max(min(v, hi), lo) for lo <= hi.

Padding: every input is selected to 0 on tokens with m = 0 before any arithmetic, so padded values
(even inf or NaN) never reach the loss and their gradient is exactly 0. The arithmetic is float32
(float64 for float64 ``values``); ``old_values`` and ``returns`` are constants (detached).

Metrics (local token means, 0-dim, no gradient; 0 for a fully masked batch): ``clipfrac`` (with c:
the tokens whose clipped branch is strictly larger, verl's ``vf_clipfrac``) and ``values_mean``
(the mean of v, verl's ``critic/vpred_mean``).
"""

from __future__ import annotations

import torch

from fusedrl.reference.aggregate import aggregate, mask_weight
from fusedrl.reference.logprobs import accumulation_dtype
from fusedrl.reference.policy import masked_mean

CLIP_TIES = ("clamp", "verl")
# balanced aggregation splits sequences by the sign of an advantage: a value loss has none
MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def clip_values(v: torch.Tensor, old: torch.Tensor, clip: float, clip_ties: str = "clamp") -> torch.Tensor:
    """clip(v, old - clip, old + clip) with the gradient convention of ``clip_ties`` (module docstring)."""
    lo, hi = old - clip, old + clip
    if clip_ties == "verl":
        return torch.max(torch.min(v, hi), lo)
    return torch.clamp(v, lo, hi)


def per_token_value_loss(values, old_values, returns, mask, *, clip=None, clip_ties="clamp"):
    """``(l, clipped)``: the per-token loss [B, T] (accumulation dtype, differentiable w.r.t.
    ``values``, 0 on padded tokens) and the clip indicator (bool, or None without ``clip``)."""
    dtype = accumulation_dtype(values.dtype)
    valid, _ = mask_weight(mask, dtype)

    def clean(t, keep_grad=False):
        t = t if keep_grad else t.detach()
        return torch.where(valid, t.to(dtype), 0.0)

    v = clean(values, keep_grad=True)
    ret = clean(returns)
    unclipped = (v - ret) ** 2
    if clip is None:
        return 0.5 * unclipped, None
    old = clean(values if old_values is None else old_values)
    clipped = (clip_values(v, old, clip, clip_ties) - ret) ** 2
    return 0.5 * torch.max(unclipped, clipped), (clipped > unclipped) & valid


def value_loss(values, old_values, returns, mask, *, clip=None, clip_ties="clamp", aggregation="token-mean",
               num_tokens=None, num_sequences=None, max_length=None, exclude_empty_rows=False):
    """``(loss, metrics)``: :func:`per_token_value_loss` aggregated by ``aggregation`` (one of
    ``MODES``) with the global counts, and the metrics of the module docstring."""
    if aggregation not in MODES:
        raise ValueError(f"aggregation must be one of {MODES}, got {aggregation!r}")
    loss_tok, clipped = per_token_value_loss(values, old_values, returns, mask, clip=clip, clip_ties=clip_ties)
    loss = aggregate(loss_tok, mask, aggregation, num_tokens=num_tokens, num_sequences=num_sequences,
                     max_length=max_length, exclude_empty_rows=exclude_empty_rows)
    valid, weight = mask_weight(mask, loss_tok.dtype)
    metrics = {}
    if clipped is not None:
        metrics["clipfrac"] = masked_mean(clipped, valid, weight)
    metrics["values_mean"] = masked_mean(values, valid, weight)
    return loss, metrics
