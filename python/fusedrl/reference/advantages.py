r"""Reference advantage estimators and scans (docs/OBJECTIVES.md, "Advantages").

Two primitives carry every estimator here, and they are the spec of the future segment kernels:

- :func:`group_stats`: per-group statistics of ``values [M, C]`` over dense group indices
  (count, mean, unbiased std, leave-one-out mean, max, second max, weighted mean), computed with
  ``index_add_`` / ``scatter_reduce`` -- no Python loop over groups. Every group estimator, every
  whitening and every batch normalization reads its statistics from it.
- :func:`reverse_scan`: the masked reverse linear scan ``out_t = x_t + decay * out_{next valid}``
  along T, used by the discounted returns (reinforce++) and by GAE.

Conventions (all functions):

- Group layouts arrive *dense*: ``index [M]`` int64 in ``[0, G)`` (:func:`group_index` builds it
  from TRL's ``group_size`` or verl's arbitrary ``group_ids``); an empty group has zero statistics.
- ``valid`` is a bool tensor; masked entries are ignored by every statistic and come out as 0.
  Padding values never leak: masked entries are selected away with ``torch.where``, so even NaN
  padding gives finite outputs.
- Accumulation in float32 (float64 for float64 input); the output has the accumulation dtype.
- Advantages are constants for the policy loss: the public functions run these under
  ``torch.no_grad()``, as verl and TRL do.
- Singleton groups: ``singleton="verl"`` gives a group of one row mean 0, std 1 and leave-one-out
  mean 0 (verl ``compute_grpo_outcome_advantage``, ``compute_rloo_outcome_advantage``, ...);
  ``singleton="zero"`` gives it its natural statistics -- mean = its own value, std 0,
  leave-one-out mean = its own value -- so its centred reward is exactly 0 (TRL's GRPO and RLOO
  with ``num_generations=1``, verl's ``rloo_vectorized``).
- Group means are computed shifted by the group maximum, ``mean = max + sum(x - max) / n``: the
  same number mathematically, but a zero-variance group gives centred rewards of *exactly* 0 in
  every dtype (the plain ``sum / n`` can leave a rounding residue of ~1e-8 that ``/ (0 + eps)``
  blows up to ~1e-2 in float32; the peers have that residue).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedrl.reference.logprobs import accumulation_dtype

WHITEN_EPS = 1e-8  # verl masked_whiten: (x - mean) * rsqrt(var + 1e-8)


# ----------------------------------------------------------------------------------------------
# group layouts and statistics
# ----------------------------------------------------------------------------------------------


def group_index(n: int, group_ids: torch.Tensor | None = None, group_size: int | None = None, device=None):
    """Dense group indices ``[n]`` int64 in ``[0, G)`` and ``G``.

    ``group_size`` (TRL's layout): rows ``[k * group_size, (k + 1) * group_size)`` form group k.
    ``group_ids`` (verl's layout): any integers in any order; equal ids form a group
    (``torch.unique(return_inverse=True)``, so group k is the k-th smallest id).
    """
    if group_ids is not None:
        unique, inverse = torch.unique(group_ids.reshape(-1), return_inverse=True)
        return inverse.to(torch.int64), int(unique.numel())
    # (arange(G) repeated group_size times: the same ids as arange(n) // group_size, built faster)
    return torch.arange(n // group_size, device=device).repeat_interleave(group_size), n // group_size


class GroupStats(NamedTuple):
    """Statistics of ``values [M, C]`` per group (``[G, C]``) or per row (``[M, C]``)."""

    count: torch.Tensor  # [G, 1] rows in the group (float)
    mean: torch.Tensor  # [G, C] (singleton rule applied)
    var: torch.Tensor  # [G, C] unbiased: sum (x - mean)^2 / (n - 1); singleton rule applied
    std: torch.Tensor  # [G, C] sqrt(var)
    loo_mean: torch.Tensor  # [M, C] mean of the other rows of the row's group (singleton rule applied)
    max: torch.Tensor  # [G, C]
    second_max: torch.Tensor  # [G, C] largest value after removing one maximum; -inf for singletons
    argmax: torch.Tensor  # [G, C] int64 row index of the first (lowest-index) maximum
    weighted_mean: torch.Tensor  # [G, C] sum w x / sum w (= mean when no weight); singleton rule applied


def _scatter(values: torch.Tensor, index: torch.Tensor, num_groups: int, reduce: str) -> torch.Tensor:
    """Per-group reduction of ``values [M, C]`` along rows: "sum", "amax" or "amin"."""
    out_shape = (num_groups,) + tuple(values.shape[1:])
    idx = index.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    if reduce == "sum":
        return values.new_zeros(out_shape).index_add_(0, index, values)
    return values.new_zeros(out_shape).scatter_reduce_(0, idx, values, reduce, include_self=False)


def group_stats(
    values: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    *,
    weight: torch.Tensor | None = None,
    singleton: str = "verl",
    need_loo: bool = True,
) -> GroupStats:
    r"""Per-group statistics of ``values [M, C]`` (each column independent) for dense ``index [M]``.

    For group g with rows S_g, n_g = |S_g|, and column values x:

    .. math::
        \mathrm{max}_g = \max_{i \in S_g} x_i,\quad
        \bar x_g = \mathrm{max}_g + \tfrac{1}{n_g}\sum_{i \in S_g} (x_i - \mathrm{max}_g),\quad
        s_g^2 = \tfrac{1}{n_g - 1}\sum_{i \in S_g} (x_i - \bar x_g)^2,\quad
        \bar x_{-i} = \frac{\sum_{j \in S_g} x_j - x_i}{n_g - 1}

    second max: the largest value once the first maximum row (``argmax``) is removed (ties: equal
    to the max). weighted mean (OPO's length-weighted baseline): ``sum w x / sum w`` over the group
    (0 when ``sum w = 0``). Singleton groups (n_g = 1): ``singleton="verl"``: mean, weighted mean
    and leave-one-out mean 0, std 1; ``singleton="zero"``: mean, weighted mean and leave-one-out
    mean = the row's value, std 0. ``need_loo=False`` is a hint that the caller does not read
    ``loo_mean`` (the kernels then skip that ``[M, C]`` output; the reference computes it anyway).
    Everything is vectorized with ``index_add_`` /
    ``scatter_reduce_`` over the dense index.
    """
    M = values.shape[0]
    idx = index
    ones = values.new_ones(M, 1)
    count = _scatter(ones, idx, num_groups, "sum")  # [G, 1]
    single = count == 1
    several = count > 1

    gmax = _scatter(values, idx, num_groups, "amax")
    shift = gmax[idx]
    shifted_sum = _scatter(values - shift, idx, num_groups, "sum")  # sum_g (x - max_g)
    mean = gmax + shifted_sum / count.clamp_min(1)
    centered = values - mean[idx]
    var = _scatter(centered * centered, idx, num_groups, "sum") / (count - 1).clamp_min(1)
    # leave-one-out: (sum_g - x_i) / (n_g - 1), from the same shifted sum
    loo = shift + (shifted_sum[idx] - (values - shift)) / (count[idx] - 1).clamp_min(1)

    # first maximum row of each group, then the maximum of the rest
    rows = torch.arange(M, device=values.device).view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    is_max = values == shift
    first = torch.where(is_max, rows, M)
    argmax = _scatter(first, idx, num_groups, "amin")
    removed = rows == argmax[idx]
    rest = torch.where(removed, torch.full_like(values, float("-inf")), values)
    second = _scatter(rest, idx, num_groups, "amax")

    if weight is None:
        wmean = mean
    else:
        w = weight.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
        wsum = _scatter(w.expand_as(values), idx, num_groups, "sum")
        wx = _scatter(w * (values - shift), idx, num_groups, "sum")
        wmean = torch.where(wsum > 0, gmax + wx / torch.where(wsum > 0, wsum, 1), 0.0)

    if singleton == "verl":
        mean = torch.where(single, 0.0, mean)
        wmean = torch.where(single, 0.0, wmean)
        var = torch.where(single, 1.0, var)
        loo = torch.where(several[idx], loo, 0.0)
    elif singleton == "zero":
        # natural statistics: mean = the value, var 0 (the n - 1 = 0 sum is 0), loo = the value
        wmean = torch.where(single, mean, wmean)
        loo = torch.where(several[idx], loo, values)
    else:
        raise ValueError(f"singleton must be 'verl' or 'zero', got {singleton!r}")
    return GroupStats(count, mean, var, var.sqrt(), loo, gmax, second, argmax, wmean)


def whiten(values: torch.Tensor, valid: torch.Tensor | None = None, *, stats=None) -> torch.Tensor:
    r"""verl's ``masked_whiten``: :math:`(x - \bar x) / \sqrt{s^2 + 10^{-8}}` over the valid entries.

    :math:`\bar x` and the unbiased :math:`s^2` are taken over every valid entry of ``values`` (any
    shape) at once; invalid entries come out 0. verl also adds 1e-8 to the token count inside its
    mean (a relative change of 1e-8 / n, not reproduced). verl raises for fewer than 2 valid
    entries; here one valid entry whitens to 0 and none gives all zeros. ``stats``: the
    :func:`group_stats` implementation to use (default this module's; the public functions pass a
    kernel's).
    """
    stats = group_stats if stats is None else stats
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    x = values[valid].unsqueeze(-1)
    st = stats(x, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device), 1, singleton="zero")
    out = torch.zeros_like(values)
    out[valid] = ((x - st.mean) * torch.rsqrt(st.var + WHITEN_EPS)).squeeze(-1)
    return out


def batch_normalize(values: torch.Tensor, eps: float, *, stats=None) -> torch.Tensor:
    r"""TRL's batch normalization of ``values [N]``: :math:`(x - \bar x) / (s + \epsilon)`, unbiased
    :math:`s` over the batch (``normalize_then_sum``'s last step; a batch of one gives 0)."""
    x = values.unsqueeze(-1)
    stats = group_stats if stats is None else stats
    st = stats(x, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device), 1, singleton="zero")
    return ((x - st.mean) / (st.std + eps)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# outcome estimators
# ----------------------------------------------------------------------------------------------

GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce++-baseline", "grpo_passk", "opo", "gpg")


def _denominator(values, index, num_groups, stats, scale, eps, singleton, stats_fn):
    """The divisor of grpo / grpo_passk per group ``[G, C]``: std + eps ("group"), batch std + eps
    ("batch", the batch counted as one group), or 1 ("none")."""
    if scale == "group":
        return stats.std + eps
    if scale == "batch":
        one = torch.zeros_like(index)
        batch = stats_fn(values, one, 1, singleton=singleton)
        return (batch.std + eps).expand_as(stats.std)
    return torch.ones_like(stats.std)


def outcome_advantages(
    rewards: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    *,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "verl",
    lengths: torch.Tensor | None = None,
    stats=None,
) -> torch.Tensor:
    r"""Per-row advantages of the group estimators for rewards ``[M, C]`` (columns independent).

    With group statistics from :func:`group_stats` (row i in group g, n_g rows):

    - ``grpo``: :math:`(R_i - \bar R_g) / d_g` with :math:`d_g = s_g + \epsilon` (scale "group"),
      :math:`s_{batch} + \epsilon` ("batch", TRL ``scale_rewards="batch"``) or 1 ("none", Dr.GRPO;
      verl ``norm_adv_by_std_in_grpo=False``).
    - ``rloo``: :math:`R_i - \bar R_{-i}` (verl ``compute_rloo_outcome_advantage``).
    - ``reinforce++-baseline``: :math:`R_i - \bar R_g` (the caller whitens it, as verl).
    - ``grpo_passk``: the first maximum row of each group gets :math:`(\max_g - \mathrm{2nd}\max_g)
      / d_g`, every other row 0 (verl ``compute_grpo_passk_outcome_advantage``; needs n_g >= 2).
    - ``opo``: :math:`R_i - \sum_{j} |y_j| R_j / \sum_j |y_j|` over the group, ``lengths`` = |y|
      (verl ``compute_opo_outcome_advantage``).
    - ``gpg``: :math:`\alpha (R_i - \bar R_g)` with :math:`\alpha = M / \max(\#\{j: R_j \ne 0\}, 1)`
      counted over the whole batch (verl ``compute_gpg_outcome_advantage``, ``f_norm = 1``).

    ``stats``: the :func:`group_stats` implementation (default this module's; the public functions
    pass the segment-statistics kernel of the chosen backend, so the estimators exist once).
    """
    stats = group_stats if stats is None else stats
    st = stats(rewards, index, num_groups, weight=lengths, singleton=singleton, need_loo=estimator == "rloo")
    if estimator in ("grpo", "reinforce++-baseline", "gpg"):
        centered = rewards - st.mean[index]
        if estimator == "grpo":
            return centered / _denominator(rewards, index, num_groups, st, scale, eps, singleton, stats)[index]
        if estimator == "gpg":
            nonzero = (rewards != 0).sum(0, keepdim=True).to(rewards.dtype)
            return centered * (rewards.shape[0] / nonzero.clamp_min(1))
        return centered
    if estimator == "rloo":
        return rewards - st.loo_mean
    if estimator == "opo":
        return rewards - st.weighted_mean[index]
    if estimator == "grpo_passk":
        gap = (st.max - st.second_max) / _denominator(rewards, index, num_groups, st, scale, eps, singleton, stats)
        out = torch.zeros_like(rewards)
        return out.scatter_(0, st.argmax, gap)
    raise ValueError(f"estimator must be one of {GROUP_ESTIMATORS}, got {estimator!r}")


# ----------------------------------------------------------------------------------------------
# multi-objective combines
# ----------------------------------------------------------------------------------------------


def combine_objectives(
    rewards: torch.Tensor,
    combine: str,
    weights: torch.Tensor,
    *,
    ideal: torch.Tensor | None = None,
    var_coef: float = 1.0,
) -> torch.Tensor:
    r"""Scalarize rewards ``[N, K]`` into ``[N]`` before the estimator (w = ``weights [K]``).

    - ``sum_then_normalize``: :math:`\sum_k w_k R_k` (TRL's default ``multi_objective_aggregation``).
    - ``chebyshev`` (seed MOCHA): :math:`-\max_k w_k |z_k - R_k|`, z = ``ideal``.
    - ``min`` (seeds MaxMin-RLHF, reward-ensemble WCO): :math:`\min_k w_k R_k` (w = 1: min_k R_k).
    - ``mean_minus_var`` (seed reward-ensemble UWO, our reading):
      :math:`\bar R - \lambda \frac{1}{K}\sum_k (R_k - \bar R)^2` with :math:`\bar R = \frac{1}{K}
      \sum_k w_k R_k` over the (weighted) members, population variance across the K members,
      :math:`\lambda` = ``var_coef``.

    ``normalize_then_sum`` is not a scalarization (it normalizes each objective first): see
    :func:`group_advantages`.
    """
    if combine == "sum_then_normalize":
        return rewards @ weights
    if combine == "chebyshev":
        return -(weights * (ideal - rewards).abs()).amax(dim=-1)
    if combine == "min":
        return (weights * rewards).amin(dim=-1)
    if combine == "mean_minus_var":
        members = weights * rewards
        mean = members.mean(dim=-1, keepdim=True)
        return (mean - var_coef * ((members - mean) ** 2).mean(dim=-1, keepdim=True)).squeeze(-1)
    raise ValueError(f"combine {combine!r} is not a scalarization")


# ----------------------------------------------------------------------------------------------
# scans along T
# ----------------------------------------------------------------------------------------------


def reverse_scan(x: torch.Tensor, valid: torch.Tensor, decay: float, init: torch.Tensor | None = None) -> torch.Tensor:
    r"""Masked reverse linear scan over the last dim of ``x [B, T]``.

    :math:`c \leftarrow \mathrm{init}` (0 by default); for t = T-1 .. 0, at valid t:
    :math:`\mathrm{out}_t = x_t + \mathrm{decay}\, c` and :math:`c \leftarrow \mathrm{out}_t`; at
    invalid t: :math:`\mathrm{out}_t = 0` and c is carried unchanged (masked positions are skipped,
    not discounted: verl's "observation tokens").
    """
    carry = x.new_zeros(x.shape[0]) if init is None else init.to(x.dtype)
    out = torch.zeros_like(x)
    for t in range(x.shape[-1] - 1, -1, -1):
        step = x[:, t] + decay * carry
        m = valid[:, t]
        out[:, t] = torch.where(m, step, 0.0)
        carry = torch.where(m, step, carry)
    return out


def prefix_sum(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    r"""Masked prefix sum over the last dim of ``x [B, T]``: :math:`\mathrm{out}_t = \sum_{t' \le t,
    t' \text{ valid}} x_{t'}` at valid t, 0 at invalid t (whose x is never used). The cumulative
    log-ratio of the policy primitive (CTPO) is this scan of :math:`\rho`. Accumulates in the
    accumulation dtype (float32; float64 for float64)."""
    xs = torch.where(valid, x.to(accumulation_dtype(x.dtype)), 0.0)
    return torch.where(valid, xs.cumsum(-1), 0.0)


def next_valid(values: torch.Tensor, valid: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``out[b, t]`` = ``values[b, t']`` at the first valid t' > t, or ``fill[b]`` when there is none."""
    B, T = values.shape
    pos = torch.arange(T, device=values.device).expand(B, T)
    at = torch.where(valid, pos, T)  # T = "none"
    # first valid position >= t (reverse cumulative min), then shifted by one: first valid > t
    from_t = at.flip(-1).cummin(-1).values.flip(-1)
    after_t = torch.cat([from_t[:, 1:], from_t.new_full((B, 1), T)], dim=-1)
    padded = torch.cat([torch.where(valid, values, 0.0), fill.to(values.dtype).unsqueeze(-1)], dim=-1)
    return padded.gather(-1, after_t)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    r"""Reinforce++ token returns: :math:`G_t = r_t + \gamma G_{t'}`, t' the next valid token
    (verl ``compute_reinforce_plus_plus_outcome_advantage``'s ``returns``); 0 at masked tokens,
    whose rewards are ignored and which are skipped without discounting."""
    valid = mask != 0
    r = torch.where(valid, rewards.to(accumulation_dtype(rewards.dtype)), 0.0)
    return reverse_scan(r, valid, gamma)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    bootstrap: torch.Tensor | None = None,
    whiten_advantages: bool = False,
):
    r"""Generalized advantage estimation over the valid tokens (verl ``compute_gae_advantage_return``).

    With t' the next valid token after t and :math:`V_{t'} = b` (``bootstrap``, default 0) past the
    last valid token:

    .. math::
        \delta_t = r_t + \gamma V_{t'} - V_t,\quad A_t = \delta_t + \gamma\lambda A_{t'},\quad
        \mathrm{returns}_t = A_t + V_t

    ``bootstrap [B]`` (seed T-PPO) is the value of the state after a truncated response; pass 0 for
    rows that ended. ``whiten_advantages`` applies :func:`whiten` (verl always does) to the
    advantages after the returns are formed. Masked tokens are 0 in both outputs (verl leaves the
    carried values there, which no loss reads).
    """
    dtype = accumulation_dtype(rewards.dtype)
    valid = mask != 0
    r = torch.where(valid, rewards.to(dtype), 0.0)
    v = torch.where(valid, values.to(dtype), 0.0)
    fill = v.new_zeros(v.shape[0]) if bootstrap is None else bootstrap.to(dtype)
    delta = torch.where(valid, r + gamma * next_valid(v, valid, fill) - v, 0.0)
    adv = reverse_scan(delta, valid, gamma * lam)
    returns = torch.where(valid, adv + v, 0.0)
    if whiten_advantages:
        adv = whiten(adv, valid)
    return adv, returns


def last_valid_scatter(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` holding ``values [B]`` at each row's last valid token (verl's reward managers put
    the outcome score there), 0 elsewhere and on rows with no valid token."""
    B, T = valid.shape
    pos = torch.arange(T, device=valid.device).expand(B, T)
    last = torch.where(valid, pos, -1).amax(-1)
    return torch.where((pos == last.unsqueeze(-1)) & valid, values.unsqueeze(-1), 0.0)


# ----------------------------------------------------------------------------------------------
# the public estimators
# ----------------------------------------------------------------------------------------------


def _broadcast(adv: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``[N]`` -> ``[N]`` (no mask) or ``[N, T]`` with 0 at masked tokens."""
    if valid is None:
        return adv
    return torch.where(valid, adv.unsqueeze(-1), 0.0)


def group_advantages(
    rewards: torch.Tensor,
    index: torch.Tensor | None,
    num_groups: int,
    *,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
    weights: torch.Tensor | None = None,
    combine: str | None = None,
    ideal: torch.Tensor | None = None,
    var_coef: float = 1.0,
    mask: torch.Tensor | None = None,
    baseline: torch.Tensor | None = None,
    gamma: float = 1.0,
    singleton: str = "verl",
    stats=None,
) -> torch.Tensor:
    r"""Outcome advantages from rewards ``[N]`` or ``[N, K]`` (see :func:`fusedrl.group_advantages`).

    1. ``[N, K]`` rewards are scalarized by :func:`combine_objectives`, except
       ``combine="normalize_then_sum"`` (GDPO): :math:`S = \sum_k w_k A^{grpo}(R_k)`, then
       :func:`batch_normalize` (TRL) without ``mask``, or :func:`whiten` over the valid tokens of
       ``S`` broadcast to ``[N, T]`` (verl ``compute_gdpo_outcome_advantage``) with ``mask``.
    2. The estimator: :func:`outcome_advantages` for the group estimators; ``remax``:
       :math:`R - b` (``baseline``); ``reinforce++``: :func:`whiten` of the discounted returns of
       the reward placed at the last valid token (without ``mask``: of R over the batch);
       ``reinforce++-baseline``: :func:`whiten` of :math:`R - \bar R_g` over valid tokens.
    3. With ``mask`` the result is broadcast to ``[N, T]`` with 0 at masked tokens.

    ``stats``: the :func:`group_stats` implementation used for every statistic (default this
    module's).
    """
    dtype = accumulation_dtype(rewards.dtype)
    R = rewards.to(dtype)
    valid = None if mask is None else mask != 0
    lengths = valid.sum(-1) if estimator == "opo" else None  # OPO weighs rewards by response length

    if R.dim() == 2:
        w = torch.ones(R.shape[1], dtype=dtype, device=R.device) if weights is None else weights.to(R.device, dtype)
        if combine == "normalize_then_sum":
            per_objective = outcome_advantages(
                R, index, num_groups, estimator="grpo", scale=scale, eps=eps, singleton=singleton, stats=stats
            )
            summed = per_objective @ w
            if valid is None:
                return batch_normalize(summed, eps, stats=stats)
            return whiten(_broadcast(summed, valid), valid, stats=stats)
        z = None if ideal is None else ideal.to(R.device, dtype)
        R = combine_objectives(R, combine, w, ideal=z, var_coef=var_coef)

    if estimator == "remax":
        return _broadcast(R - baseline.to(dtype), valid)
    if estimator == "reinforce++":
        if valid is None:
            return whiten(R, stats=stats)
        return whiten(discounted_returns(last_valid_scatter(R, valid), valid, gamma=gamma), valid, stats=stats)
    adv = outcome_advantages(
        R.unsqueeze(-1), index, num_groups, estimator=estimator, scale=scale, eps=eps, singleton=singleton,
        lengths=lengths, stats=stats,
    ).squeeze(-1)
    if estimator == "reinforce++-baseline":
        return whiten(_broadcast(adv, valid), valid, stats=stats) if valid is not None else whiten(adv, stats=stats)
    return _broadcast(adv, valid)


def phase_advantages(
    rewards: torch.Tensor,
    phase_ids: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    *,
    mask: torch.Tensor | None = None,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "verl",
    stats=None,
) -> torch.Tensor:
    r"""Phase-factorized advantages (seed F-GRPO): rewards ``[N, P]``, token phase ids ``[N, T]``.

    :math:`A^{(p)} = ` the estimator applied to column p (each phase group-normalized on its own),
    and token t of row i takes :math:`A^{(\mathrm{phase}_{it})}_i`; masked tokens 0.
    """
    R = rewards.to(accumulation_dtype(rewards.dtype))
    per_phase = outcome_advantages(
        R, index, num_groups, estimator=estimator, scale=scale, eps=eps, singleton=singleton, stats=stats
    )
    valid = torch.ones_like(phase_ids, dtype=torch.bool) if mask is None else mask != 0
    safe = torch.where(valid, phase_ids, 0).long()
    return torch.where(valid, per_phase.gather(1, safe), 0.0)


def segment_advantages(
    trajectory_rewards: torch.Tensor,
    segment_rewards: torch.Tensor,
    segment_ids: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    *,
    mask: torch.Tensor | None = None,
    lam: float = 1.0,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "verl",
    stats=None,
) -> torch.Tensor:
    r"""Dual-level advantages (seed MatchTIR; our reading).

    Segment (i, s) *exists* when some valid token of row i has segment id s. The estimator runs on
    the trajectory rewards over the rows of each group, and on the rewards of the existing segments
    over all segments of each group (every segment of every row of group g is one sample of g).
    Token t of row i with segment id s: :math:`A = A^{traj}_i + \lambda A^{seg}_{i,s}`; a token with
    segment id -1 (outside every segment) takes :math:`A^{traj}_i`; masked tokens 0.
    """
    dtype = accumulation_dtype(trajectory_rewards.dtype)
    N, S = segment_rewards.shape
    valid = torch.ones_like(segment_ids, dtype=torch.bool) if mask is None else mask != 0
    traj = outcome_advantages(
        trajectory_rewards.to(dtype).unsqueeze(-1), index, num_groups, estimator=estimator, scale=scale, eps=eps,
        singleton=singleton, stats=stats,
    ).squeeze(-1)

    in_segment = valid & (segment_ids >= 0)
    safe = torch.where(in_segment, segment_ids, 0).long()
    rows = torch.arange(N, device=segment_ids.device).unsqueeze(-1).expand_as(segment_ids)
    exists = torch.zeros(N, S, dtype=torch.bool, device=segment_ids.device)
    exists[rows[in_segment], safe[in_segment]] = True
    seg_values = segment_rewards.to(dtype)[exists].unsqueeze(-1)
    seg_index = index.unsqueeze(-1).expand(N, S)[exists]
    seg_adv = torch.zeros(N, S, dtype=dtype, device=segment_rewards.device)
    if seg_values.numel():
        seg_adv[exists] = outcome_advantages(
            seg_values, seg_index, num_groups, estimator=estimator, scale=scale, eps=eps, singleton=singleton,
            stats=stats,
        ).squeeze(-1)
    token_seg = torch.where(in_segment, seg_adv.gather(1, safe), 0.0) if S else torch.zeros_like(valid, dtype=dtype)
    return torch.where(valid, traj.unsqueeze(-1) + lam * token_seg, 0.0)
