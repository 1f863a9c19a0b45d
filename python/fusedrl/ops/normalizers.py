"""The fused kernels' normalization: per-row coefficients g such that the loss of an aggregation
mode is sum_i g_i sum_t m_it l_it (the kernels weigh each token of row i with g_i, so one pass gives
the loss and its gradient). The one place where the kernel paths (:mod:`fusedrl.ops.policy`,
:mod:`fusedrl.ops.value`) normalize; the spec they are tested against is
:func:`fusedrl.reference.aggregate.aggregate`, which computes every mode from its own formula.

Conventions as the reference's (python/fusedrl/reference/aggregate.py): a count that is 0 divides
as 1; S is num_sequences, else every row, else (exclude_empty_rows) the rows with a valid token.
"""

from __future__ import annotations

import torch

from fusedrl.reference.aggregate import MODES


def divisor(count: torch.Tensor) -> torch.Tensor:
    """A count to divide by: 0 divides as 1 (its numerator is 0 anyway)."""
    return torch.where(count > 0, count, 1.0)


def _given_or(given, default: torch.Tensor) -> torch.Tensor:
    count = default if given is None else torch.as_tensor(given, dtype=default.dtype, device=default.device)
    return divisor(count)


def balanced_coefficients(row_count, row_sign, group_ids=None, num_groups=None) -> torch.Tensor:
    """Per-row coefficients of balanced aggregation (our reading; module docstring): a row of sign
    +1 in group g weighs (n+_g / n_g) / (sum m over g's positive rows) / G, likewise for -1."""
    dtype = row_count.dtype
    if group_ids is None:
        inverse = torch.zeros(row_count.shape[0], dtype=torch.long, device=row_count.device)
        n_groups = 1
    else:
        uniques, inverse = torch.unique(group_ids, return_inverse=True)
        n_groups = uniques.numel()

    def per_group(x):
        return torch.zeros(n_groups, dtype=dtype, device=row_count.device).index_add(0, inverse, x)

    sides = [(row_sign > 0).to(dtype), (row_sign < 0).to(dtype)]
    n_side = [per_group(side) for side in sides]
    n_safe = divisor(n_side[0] + n_side[1])
    coef = torch.zeros_like(row_count)
    for side, n_s in zip(sides, n_side):
        share = n_s / n_safe / divisor(per_group(row_count * side))
        coef = coef + side * share[inverse]
    return coef / _given_or(num_groups, ((n_side[0] + n_side[1]) > 0).sum().to(dtype))


def row_coefficients(
    mode: str,
    row_count: torch.Tensor | None,
    *,
    rows: int,
    length: int | None,
    dtype: torch.dtype,
    device,
    num_tokens=None,
    num_sequences=None,
    max_length=None,
    row_sign: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    num_groups=None,
    exclude_empty_rows: bool = False,
) -> torch.Tensor:
    """The normalization of every mode, written once: coefficients g [rows] such that the loss of
    ``mode`` is sum_i g_i sum_t m_it l_it.

    ``row_count`` (sum_t m per row) may be None when the mode does not need it (see
    :func:`needs_row_count`); ``length`` is the padded T (None: a packed layout, where
    ``seq-mean-token-sum-norm`` needs ``max_length``); ``row_sign`` (balanced) is
    :func:`fusedrl.reference.aggregate.sequence_sign`.
    """
    def full(value):  # one coefficient for every row: a broadcast view
        return torch.as_tensor(value, dtype=dtype, device=device).reshape(1).expand(rows)

    if mode == "token-mean":
        local = row_count.sum() if num_tokens is None else torch.zeros((), dtype=dtype, device=device)
        return full(1.0 / _given_or(num_tokens, local))
    if mode == "token-sum":
        return full(torch.ones((), dtype=dtype, device=device))
    if mode == "balanced":
        return balanced_coefficients(row_count, row_sign, group_ids, num_groups)
    if num_sequences is not None or not exclude_empty_rows:
        default = torch.tensor(float(rows), dtype=dtype, device=device)
    else:
        default = (row_count > 0).sum().to(dtype)
    sequences = _given_or(num_sequences, default)
    if mode == "seq-mean-token-mean":
        return 1.0 / (divisor(row_count) * sequences)
    if mode == "seq-mean-token-sum":
        return full(1.0 / sequences)
    if mode == "seq-mean-token-sum-norm":
        if max_length is None and length is None:
            raise ValueError("aggregation='seq-mean-token-sum-norm' needs max_length in the packed layout")
        padded = torch.tensor(float(1 if length is None else length), dtype=dtype, device=device)
        return full(1.0 / (sequences * _given_or(max_length, padded)))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def needs_row_count(mode: str, *, num_tokens=None, num_sequences=None, exclude_empty_rows: bool = False) -> bool:
    """Whether :func:`row_coefficients` of ``mode`` reads the per-row token counts."""
    if mode == "token-mean":
        return num_tokens is None
    if mode in ("token-sum",):
        return False
    if mode in ("balanced", "seq-mean-token-mean"):
        return True
    return exclude_empty_rows and num_sequences is None
