r"""The clipped value loss of a PPO critic: :func:`value_loss`.

The function validates its arguments (TypeError / ValueError naming the argument), picks a backend
(:mod:`fusedrl.dispatch`) and calls it: the ``cpu``, ``cuda`` and ``triton`` kernels
(:mod:`fusedrl.ops.value`) compute the per-token loss, its aggregation, the metrics and d loss /
d values in one pass; ``torch`` runs the reference (:mod:`fusedrl.reference.value`, the math;
docs/OBJECTIVES.md "Value loss"). verl's ``compute_value_loss`` and critic loss function built on it
are in :mod:`fusedrl.integrations.verl`.
"""

from __future__ import annotations

import torch

from fusedrl import _validate as check
from fusedrl import dispatch
from fusedrl.ops import value as _ops_value
from fusedrl.policy import _batch, _choice, _count, _float_tensor, _packed, _packed_to_padded, _real
from fusedrl.reference import value as _ref_value

__all__ = ["value_loss"]

VALUE_AGGREGATIONS = _ref_value.MODES
CLIP_TIES = _ref_value.CLIP_TIES
VALUE_BACKENDS = ("cpu", "cuda", "triton", "torch")  # the backends with a value_loss kernel


def _finite_on_valid(name: str, t: torch.Tensor, mask: torch.Tensor) -> None:
    """A non-finite target on a counted token makes the loss and every gradient non-finite: refuse it
    (a data-dependent check, skipped inside torch.compile and for fake tensors)."""
    if check.has_data(t, mask) and t.numel() and bool((~torch.isfinite(t) & (mask != 0)).any()):
        raise ValueError(f"{name} must be finite on valid tokens (mask != 0); got NaN or inf there")


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor | None,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = None,
    clip_ties: str = "clamp",
    aggregation: str = "token-mean",
    num_tokens=None,
    num_sequences=None,
    max_length=None,
    exclude_empty_rows: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
):
    r"""Clipped value loss (PPO critic; verl ``compute_value_loss``, OpenRLHF ``ValueLoss``) of
    predicted values, padded [B, T] or packed [1, N] with ``cu_seqlens``. Returns ``(loss, metrics)``.

    With :math:`v` = ``values`` (the only input with a gradient), :math:`v_{old}` = ``old_values``
    (the rollout's values), :math:`R` = ``returns`` and :math:`c` = ``clip``, each token's loss is

    .. math:: l = \tfrac12 \max\big((v - R)^2,\ (\mathrm{clip}(v, v_{old} - c, v_{old} + c) - R)^2\big)

    (``clip=None``: :math:`l = \tfrac12 (v - R)^2`, and ``old_values`` may be None), then
    :func:`fusedrl.aggregate` by ``aggregation`` with the global counts ``num_tokens`` /
    ``num_sequences`` / ``max_length`` and ``exclude_empty_rows`` (every mode but ``"balanced"``,
    which needs advantages). Ties follow torch's autograd; ``clip_ties`` picks the clip's gradient at
    its bounds: ``"clamp"`` (OpenRLHF's clamp; it passes there) or ``"verl"`` (verl's
    ``clip_by_value`` = max(min(v, hi), lo): 1/2 at a bound, 1/4 when c = 0 and v = v_old). The
    values agree either way; docs/OBJECTIVES.md "Value loss" compares the peers.

    **Scaling**: the losses of micro-batches and ranks computed with the global counts add up (see
    "Scaling" in :func:`fusedrl.policy_loss`): verl's loss is ``dp_size`` times this one with
    ``num_tokens=batch_num_tokens``, ``num_sequences=global_batch_size``,
    ``max_length=loss_scale_factor`` and ``exclude_empty_rows=True``
    (:func:`fusedrl.integrations.verl.compute_value_loss` applies it).

    How it runs: on the ``cpu``, ``cuda`` and ``triton`` backends one kernel pass writes the row
    loss shares, the metric sums and d loss / d values (the gradient only when ``values`` requires
    it), accumulating in float32 (float64 for float64 ``values``); the per-row normalizers come
    from :func:`fusedrl.ops.normalizers.row_coefficients` (tested against the reference's
    aggregation). The kernel runs as the torch operator ``fusedrl::value_objective`` in eager mode
    and under ``torch.compile`` alike (no graph break); the gradient is handed over without a copy,
    so one graph supports one backward. The ``torch`` backend runs
    :mod:`fusedrl.reference.value`.

    Edge cases: padded tokens (m = 0) never contribute, whatever their values (inf or NaN
    included), and get an exact zero gradient; a fully masked batch gives exactly 0. Float masks are
    per-token weights. ``old_values`` and ``returns`` must be finite on valid tokens (ValueError
    otherwise; the check reads the data, so it is skipped under torch.compile).

    Args:
        values: float [B, T], or [1, N] / [N] with ``cu_seqlens``.
        old_values: float, the shape of ``values``; None only without ``clip``.
        returns: float, the shape of ``values``.
        mask: bool, int or float, the shape of ``values``.
        clip: the clip range c >= 0 (verl ``cliprange_value``, OpenRLHF ``value_clip``), or None.
        clip_ties: ``"clamp"`` or ``"verl"`` (above).
        aggregation: ``"token-mean"``, ``"token-sum"``, ``"seq-mean-token-mean"``,
            ``"seq-mean-token-sum"`` or ``"seq-mean-token-sum-norm"``.
        num_tokens, num_sequences, max_length, exclude_empty_rows: as :func:`fusedrl.aggregate`.
        cu_seqlens: int32/int64 [S + 1] for the packed layout (as :func:`fusedrl.policy_loss`).
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (see :mod:`fusedrl.dispatch`).

    Returns:
        ``(loss, metrics)``: a 0-dim float32 loss (float64 for float64 ``values``) and a dict of
        0-dim local token means without gradient: ``clipfrac`` (with ``clip``: tokens whose clipped
        branch is strictly larger, verl's ``vf_clipfrac``) and ``values_mean`` (verl's
        ``critic/vpred_mean``).
    """
    if cu_seqlens is None:
        _batch("values", values, mask)
    else:
        _packed("values", values, mask, cu_seqlens)
    _float_tensor("returns", returns, values.shape, ref_name="values", ref=values)
    _float_tensor("old_values", old_values, values.shape, ref_name="values", ref=values, optional=True)
    clip = _real("clip", clip, minimum=0.0, optional=True)
    if clip is not None and old_values is None:
        raise ValueError(f"clip={clip} needs old_values (the rollout's values), got None")
    clip_ties = _choice("clip_ties", clip_ties, CLIP_TIES)
    aggregation = _choice("aggregation", aggregation, VALUE_AGGREGATIONS)
    exclude_empty_rows = check.boolean("exclude_empty_rows", exclude_empty_rows)
    counts = dict(
        num_tokens=_count("num_tokens", num_tokens),
        num_sequences=_count("num_sequences", num_sequences),
        max_length=_count("max_length", max_length, positive=True),
    )
    if cu_seqlens is not None and aggregation == "seq-mean-token-sum-norm" and counts["max_length"] is None:
        raise ValueError("aggregation='seq-mean-token-sum-norm' needs max_length in the packed layout")
    _finite_on_valid("returns", returns, mask)
    if clip is not None:
        _finite_on_valid("old_values", old_values, mask)

    name = dispatch.select("value_loss", VALUE_BACKENDS, values.device, values.dtype, backend)
    options = dict(clip=clip, clip_ties=clip_ties, aggregation=aggregation, exclude_empty_rows=exclude_empty_rows)
    if name != "torch":
        return _ops_value.fused_value_loss(name, values, old_values, returns, mask, cu_seqlens=cu_seqlens, **options,
                                           **counts)
    if cu_seqlens is not None:  # the reference runs on the padded layout
        values, old_values, returns, mask = _packed_to_padded(cu_seqlens, values, old_values, returns, mask)
    return _ref_value.value_loss(values, old_values, returns, mask, **options, **counts)
