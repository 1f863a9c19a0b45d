"""Reference aggregation of a per-token loss into a scalar: the spec of every normalization (the
reference objectives all aggregate here; the fused kernels' per-row coefficients are written once in
python/fusedrl/ops/normalizers.py and tested against this).

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
    """Scalar loss of the per-token ``values`` [B, T] under ``mask`` by ``mode``: each mode computed
    from its formula in the module docstring (the spec the kernels' per-row coefficients,
    python/fusedrl/ops/normalizers.py, are tested against).

    float32 accumulation (float64 for float64 values); differentiable w.r.t. ``values``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    row_sum, row_count = row_sums(values, mask)
    dtype, device = row_sum.dtype, row_sum.device
    if mode == "token-mean":
        return row_sum.sum() / normalizer(num_tokens, row_count.sum())
    if mode == "token-sum":
        return row_sum.sum()
    if mode == "balanced":
        if advantages is None:
            raise ValueError("advantages are required by mode='balanced' (the sign of each sequence)")
        return balanced(row_sum, row_count, sequence_sign(advantages, mask, row_count), group_ids, num_groups)
    rows = torch.tensor(float(row_sum.shape[0]), dtype=dtype, device=device)
    default = sequence_count(row_count, exclude_empty_rows) if num_sequences is None else rows
    sequences = normalizer(num_sequences, default)
    if mode == "seq-mean-token-mean":
        return (row_sum / per_row_count(row_count)).sum() / sequences
    if mode == "seq-mean-token-sum":
        return row_sum.sum() / sequences
    length = torch.tensor(float(mask.shape[-1]), dtype=dtype, device=device)
    return row_sum.sum() / (sequences * normalizer(max_length, length))  # seq-mean-token-sum-norm


def balanced(row_sum, row_count, row_sign, group_ids=None, num_groups=None) -> torch.Tensor:
    """(1/G) sum_g L_g of balanced aggregation (module docstring) from the per-row sums, counts and
    signs; ``group_ids`` None: one group."""
    dtype = row_sum.dtype
    if group_ids is None:
        inverse, n_groups = torch.zeros(row_sum.shape[0], dtype=torch.long, device=row_sum.device), 1
    else:
        uniques, inverse = torch.unique(group_ids, return_inverse=True)
        n_groups = uniques.numel()

    def group_sum(x):
        return torch.zeros(n_groups, dtype=dtype, device=row_sum.device).index_add(0, inverse, x)

    pos, neg = (row_sign > 0).to(dtype), (row_sign < 0).to(dtype)
    n_pos, n_neg = group_sum(pos), group_sum(neg)
    n = per_row_count(n_pos + n_neg)
    loss_g = (n_pos / n) * group_sum(row_sum * pos) / per_row_count(group_sum(row_count * pos)) + (
        n_neg / n) * group_sum(row_sum * neg) / per_row_count(group_sum(row_count * neg))
    return loss_g.sum() / normalizer(num_groups, ((n_pos + n_neg) > 0).sum().to(dtype))
