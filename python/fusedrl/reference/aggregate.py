"""Reference aggregation of a per-token loss into a scalar: the one place where every objective is
normalized.

Notation: l_it the per-token values, m_it the mask (bool/int: 1 = the token counts; float: a
per-token weight; 0 = padding), |y_i| = sum_t m_it, B = rows of the batch, T = padded length.
Tokens with m = 0 never contribute, whatever their value (inf and NaN included: they are selected
away, not multiplied by 0), and receive an exact zero gradient.

====================== ============================================== ===========================
mode                   loss                                           follows
====================== ============================================== ===========================
token-mean             sum m l / N,  N = num_tokens or sum m          verl; TRL bnpo, dapo, cispo
token-sum              sum m l                                        verl
seq-mean-token-mean    (1/S) sum_i sum_t m l / |y_i|                  TRL grpo, sapo; verl
seq-mean-token-sum     (1/S) sum_i sum_t m l                          TRL luspo; verl
seq-mean-token-sum-norm sum m l / (S L),  L = max_length or T         TRL dr_grpo; verl
balanced               (1/G) sum_g L_g (below)                        "Balanced Aggregation"
                                                                      (our reading)
====================== ============================================== ===========================

S = num_sequences, or by default B (every row counts, as TRL), or the number of rows with
|y_i| > 0 when ``exclude_empty_rows`` (verl's rule). A count that is 0 (a fully masked batch, an
empty row's |y_i|) divides as 1, so a fully masked batch gives exactly 0 and zero gradients; this
is TRL's ``clamp(min=1)`` for integer masks and verl's ``+ 1e-8`` up to 1e-8 relative.

balanced (seed "Balanced Aggregation"; our reading): sequences are the rows with |y_i| > 0; the
sign of a sequence is the sign of its advantage (of sum_t m A for per-token advantages). Within
each group g (``group_ids``; the whole batch when None) with n+ positive and n- negative sequences,
n = n+ + n- (zero-advantage sequences take no part),

    L_g = (n+/n) * (sum m l over positive sequences) / (sum m over positive sequences)
        + (n-/n) * (sum m l over negative sequences) / (sum m over negative sequences),

an empty side contributing 0; G = num_groups, by default the number of groups with n > 0.

Invariance law: all modes are sums of per-row terms divided by counts, so splitting a batch into
micro-batches (or data-parallel ranks) and passing the global counts (num_tokens, num_sequences,
max_length; num_groups for balanced, with every group kept whole in one micro-batch) makes the
micro-batch losses sum to the full-batch loss, and their gradients to its gradient.
"""

from __future__ import annotations

import torch

from fusedrl.reference.logprobs import accumulation_dtype

MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "balanced",
)


def mask_weight(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, weight)``: the tokens that count (m != 0) and their weight m (1 for bool masks)."""
    valid = mask != 0
    weight = torch.where(valid, mask.to(dtype), 0.0)
    return valid, weight


def masked(values: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """m * values on valid tokens, exactly 0 elsewhere (padding values never leak, not even NaN)."""
    return torch.where(valid, values * weight, 0.0)


def per_row_count(count: torch.Tensor) -> torch.Tensor:
    """A count to divide by: an empty count (0) divides as 1 (its numerator is 0 anyway)."""
    return torch.where(count > 0, count, 1.0)


def normalizer(given, default: torch.Tensor) -> torch.Tensor:
    """The caller's global count when given (number or tensor), else the local ``default``;
    0 divides as 1."""
    count = default if given is None else torch.as_tensor(given, dtype=default.dtype, device=default.device)
    return per_row_count(count)


def row_sums(values: torch.Tensor, mask: torch.Tensor):
    """Per-row sums of the masked values and of the mask weights, in the accumulation dtype."""
    dtype = accumulation_dtype(values.dtype)
    valid, weight = mask_weight(mask, dtype)
    lm = masked(values.to(dtype).expand(mask.shape), valid, weight)
    return lm.sum(-1), weight.sum(-1)


def sequence_count(row_count: torch.Tensor, exclude_empty_rows: bool) -> torch.Tensor:
    """S by default: every row (TRL), or the rows with at least one valid token (verl)."""
    if exclude_empty_rows:
        return (row_count > 0).sum().to(row_count.dtype)
    return torch.tensor(float(row_count.shape[0]), dtype=row_count.dtype, device=row_count.device)


def sequence_sign(advantages: torch.Tensor, mask: torch.Tensor, row_count: torch.Tensor) -> torch.Tensor:
    """+1 / -1 / 0 per row: the sign of the row's advantage (of sum_t m A when per token); 0 for
    rows without a valid token."""
    dtype = row_count.dtype
    adv = advantages.detach().to(dtype)
    if adv.dim() == 2:
        valid, weight = mask_weight(mask, dtype)
        adv = masked(adv, valid, weight).sum(-1)
    return torch.where(row_count > 0, torch.sign(adv), 0.0)


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
    n_safe = per_row_count(n_side[0] + n_side[1])
    coef = torch.zeros_like(row_count)
    for side, n_s in zip(sides, n_side):
        share = n_s / n_safe / per_row_count(per_group(row_count * side))
        coef = coef + side * share[inverse]
    return coef / normalizer(num_groups, ((n_side[0] + n_side[1]) > 0).sum().to(dtype))


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
    ``mode`` is sum_i g_i sum_t m_it l_it (the fused kernels take g; :func:`aggregate` uses it too).

    ``row_count`` (sum_t m per row) may be None when the mode does not need it (see
    :func:`needs_row_count`); ``length`` is the padded T (None: a packed layout, where
    ``seq-mean-token-sum-norm`` needs ``max_length``); ``row_sign`` (balanced) is
    :func:`sequence_sign`.
    """
    def full(value):  # one coefficient for every row: a broadcast view
        return torch.as_tensor(value, dtype=dtype, device=device).reshape(1).expand(rows)

    if mode == "token-mean":
        local = row_count.sum() if num_tokens is None else torch.zeros((), dtype=dtype, device=device)
        return full(1.0 / normalizer(num_tokens, local))
    if mode == "token-sum":
        return full(torch.ones((), dtype=dtype, device=device))
    if mode == "balanced":
        return balanced_coefficients(row_count, row_sign, group_ids, num_groups)
    if num_sequences is not None or not exclude_empty_rows:
        default = torch.tensor(float(rows), dtype=dtype, device=device)
    else:
        default = sequence_count(row_count, exclude_empty_rows)
    sequences = normalizer(num_sequences, default)
    if mode == "seq-mean-token-mean":
        return 1.0 / (per_row_count(row_count) * sequences)
    if mode == "seq-mean-token-sum":
        return full(1.0 / sequences)
    if mode == "seq-mean-token-sum-norm":
        if max_length is None and length is None:
            raise ValueError("aggregation='seq-mean-token-sum-norm' needs max_length in the packed layout")
        padded = torch.tensor(float(1 if length is None else length), dtype=dtype, device=device)
        return full(1.0 / (sequences * normalizer(max_length, padded)))
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


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    num_tokens=None,
    num_sequences=None,
    max_length=None,
    advantages: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    num_groups=None,
    exclude_empty_rows: bool = False,
) -> torch.Tensor:
    """Scalar loss of the per-token ``values`` [B, T] under ``mask`` by ``mode`` (module docstring):
    sum_i g_i (sum_t m_it l_it) with g = :func:`row_coefficients`.

    float32 accumulation (float64 for float64 values); differentiable w.r.t. ``values``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    row_sum, row_count = row_sums(values, mask)
    row_sign = None
    if mode == "balanced":
        if advantages is None:
            raise ValueError("advantages are required by mode='balanced' (the sign of each sequence)")
        row_sign = sequence_sign(advantages, mask, row_count)
    coef = row_coefficients(
        mode, row_count, rows=row_sum.shape[0], length=mask.shape[-1], dtype=row_sum.dtype, device=row_sum.device,
        num_tokens=num_tokens, num_sequences=num_sequences, max_length=max_length, row_sign=row_sign,
        group_ids=group_ids, num_groups=num_groups, exclude_empty_rows=exclude_empty_rows,
    )
    return (row_sum * coef).sum()
