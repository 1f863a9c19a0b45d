"""Numerics-testing helpers for fusedrl's own tests and for users who test their losses and kernels.

Tolerances follow one rule: a float32 (or float64) computation must be within ``1e-5`` (``1e-10``)
of a float64 gold, relative to the gold's largest magnitude, and at least on the unit scale
(``floor=1``): a log-prob, entropy or loss of magnitude below one is held to an absolute ``1e-5``,
since its float32 rounding comes from the O(1) terms it is computed from. A bfloat16 or float16
computation must be no worse than twice the error of the same computation done by eager torch in
that dtype.

Contents:

- tolerances: :data:`RTOL`, :func:`max_error`, :func:`scale_of`, :func:`assert_close_to_reference`;
- hypothesis strategies (hypothesis is imported only when one is built): :func:`rl_batches`
  (:class:`RLBatch`), :func:`preference_pairs` (:class:`PreferencePairs`),
  :func:`preference_lists` (:class:`PreferenceLists`), :func:`logits_with_labels`
  (:class:`LogitsBatch`), each with knobs for dtype, extremes and degenerate layouts;
- invariance checkers for any loss function ``loss_fn(batch, **counts)``:
  :func:`check_microbatch_invariance`, :func:`check_permutation_invariance`,
  :func:`check_padding_invariance`, with :func:`default_counts`. They raise AssertionError saying
  what differs; run them on float64 batches (their default tolerance is 1e-6).

>>> from hypothesis import given
>>> from fusedrl.testing import rl_batches, check_microbatch_invariance
>>> @given(rl_batches(dtype=torch.float64))
... def test_my_loss_adds_up(batch):
...     check_microbatch_invariance(my_loss, batch, splits=2, ranks=2)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

__all__ = [
    "RTOL",
    "max_error",
    "scale_of",
    "assert_close_to_reference",
    "RLBatch",
    "PreferencePairs",
    "PreferenceLists",
    "LogitsBatch",
    "AWKWARD_VOCAB_SIZES",
    "rl_batches",
    "preference_pairs",
    "preference_lists",
    "logits_with_labels",
    "default_counts",
    "check_microbatch_invariance",
    "check_permutation_invariance",
    "check_padding_invariance",
]

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


# =============================================================================================
# hypothesis strategies
#
# Each strategy draws the sizes, dtype and layout (which rows are masked, where the extreme values
# go, how the groups are laid out) with hypothesis, and the values from a torch.Generator seeded by
# a drawn seed: examples are fast to build and shrink toward small shapes and simple layouts.
# hypothesis is imported only when a strategy is built, so ``import fusedrl.testing`` works
# without it.


def _strategies():
    try:
        from hypothesis import strategies as st  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            "fusedrl.testing strategies need hypothesis (pip install hypothesis); the checkers and "
            "assert_close_to_reference do not"
        ) from exc
    return st


def _range(name: str, value, low: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a (min, max) pair of ints, got {value!r}")
    lo, hi = value
    if not low <= lo <= hi:
        raise ValueError(f"{name} must satisfy {low} <= min <= max, got {value!r}")
    return lo, hi


def _dtypes(dtype) -> tuple[torch.dtype, ...]:
    dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype) if isinstance(dtype, (list, tuple)) else ()
    if not dtypes or not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        raise TypeError(f"dtype must be a floating torch.dtype or a sequence of them, got {dtype!r}")
    return dtypes


def _extremes(extremes) -> tuple[float, ...]:
    values = tuple(float(e) for e in extremes)
    if any(not e > 0 for e in values):
        raise ValueError(f"extremes must be positive magnitudes, got {extremes!r}")
    return values


def _place_extremes(draw, st, g, shape, extremes, where=None):
    """A tensor of ``shape`` holding 0 or +-m (m drawn from ``extremes``) at some drawn positions
    (inside ``where`` when given), or None when the draw places none."""
    if not extremes or not draw(st.booleans()):
        return None
    magnitude = draw(st.sampled_from(extremes))
    hit = torch.rand(shape, generator=g) < draw(st.sampled_from((0.3, 1.0)))
    if where is not None:
        hit &= where
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    return hit.double() * sign * magnitude


@dataclass
class RLBatch:
    """A padded RL batch of B sequences by T tokens, drawn by :func:`rl_batches`.

    Fields (float tensors in the drawn dtype; rows are sequences):

    - ``logp``, ``old_logp``, ``ref_logp``, ``rollout_logp``: [B, T] token log-probs of the policy,
      the behaviour policy, the reference and the sampler (log-ratios ``logp - old_logp`` are what
      the strategy controls, so at extremes the values need not be valid log-probs);
    - ``entropy``: [B, T], >= 0;
    - ``advantages``: [B] (per sequence) or [B, T] (per token);
    - ``mask``: [B, T], 1 on valid tokens (``mask_dtype``);
    - ``group_ids``: int64 [B] (prompt groups);
    - ``rewards``: [B], mostly 0/1 (so zero-variance groups occur).

    Padded positions (mask 0) hold finite values. ``to_dict()`` gives the fields as a dict; the
    invariance checkers take the dataclass or the dict.
    """

    logp: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    rollout_logp: torch.Tensor
    entropy: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    group_ids: torch.Tensor
    rewards: torch.Tensor

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)


_ROW_KINDS = ("full", "prefix", "random")


def rl_batches(
    *,
    batch_size=(1, 6),
    seq_len=(1, 8),
    dtype=torch.float32,
    per_token_advantages: bool | None = None,
    log_ratio_scale: float = 0.5,
    extremes=(),
    degenerate: bool = True,
    mask_layout: str = "any",
    group_layout: str = "any",
    max_groups: int | None = None,
    mask_dtype: torch.dtype = torch.bool,
):
    """Hypothesis strategy of :class:`RLBatch`.

    Args:
        batch_size, seq_len: B and T, an int or a (min, max) range (B = 1 and T = 1 are in the
            default ranges).
        dtype: float dtype of the values, or a sequence of dtypes to draw from.
        per_token_advantages: advantages [B, T] (True), [B] (False) or either (None).
        log_ratio_scale: standard deviation of the ordinary log-ratios ``logp - old_logp``.
        extremes: magnitudes (e.g. ``(50, 1e4)``) that some drawn log-ratios take, with a random
            sign; some examples place them on a few tokens, some on all, some nowhere.
        degenerate: allow fully masked rows (so also fully masked batches), zero advantages and
            singleton groups; False: every row has a valid token and advantages are nonzero.
        mask_layout: ``"any"`` (rows full, right-padded or with holes) or ``"right_padded"``.
        group_layout: ``"any"`` (any integer ids, any order: verl's layout) or ``"contiguous"``
            (ids 0..G-1 in row order, groups of varying size: TRL's layout when sizes are equal).
        max_groups: upper bound on the number of groups (default B).
        mask_dtype: dtype of the mask (bool, an integer or a float dtype of 0/1 values).
    """
    st = _strategies()
    b_range = _range("batch_size", batch_size, 1)
    t_range = _range("seq_len", seq_len, 1)
    dtypes = _dtypes(dtype)
    extremes = _extremes(extremes)
    if mask_layout not in ("any", "right_padded"):
        raise ValueError(f"mask_layout must be 'any' or 'right_padded', got {mask_layout!r}")
    if group_layout not in ("any", "contiguous"):
        raise ValueError(f"group_layout must be 'any' or 'contiguous', got {group_layout!r}")
    kinds = _ROW_KINDS if mask_layout == "any" else _ROW_KINDS[:2]
    if degenerate:
        kinds = kinds + ("empty",)

    @st.composite
    def draw_batch(draw):
        B = draw(st.integers(*b_range))
        T = draw(st.integers(*t_range))
        dt = draw(st.sampled_from(dtypes))
        per_token = draw(st.booleans()) if per_token_advantages is None else bool(per_token_advantages)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

        rows = draw(st.lists(st.sampled_from(kinds), min_size=B, max_size=B))
        mask = torch.zeros(B, T, dtype=torch.bool)
        for i, kind in enumerate(rows):
            if kind == "full":
                mask[i] = True
            elif kind == "prefix":
                mask[i, : int(torch.randint(1, T + 1, (), generator=g))] = True
            elif kind == "random":
                mask[i] = torch.rand(T, generator=g) < 0.6
                if not degenerate and not mask[i].any():
                    mask[i, int(torch.randint(0, T, (), generator=g))] = True

        logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
        log_ratio = torch.randn(B, T, generator=g, dtype=torch.float64) * log_ratio_scale
        extreme = _place_extremes(draw, st, g, (B, T), extremes, where=mask)
        if extreme is not None:
            log_ratio = torch.where(extreme != 0, extreme, log_ratio)
        old_logp = logp - log_ratio
        ref_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
        rollout_logp = old_logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
        entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
        shape = (B, T) if per_token else (B,)
        advantages = torch.randn(shape, generator=g, dtype=torch.float64)
        if degenerate:
            advantages = advantages.masked_fill(torch.rand(shape, generator=g) < 0.15, 0.0)
        else:
            advantages = torch.where(advantages == 0, 1.0, advantages)

        G = draw(st.integers(1, min(B, max_groups or B)))
        cuts = (torch.randperm(B - 1, generator=g)[: G - 1] + 1).sort().values.tolist()
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [B])]
        group_ids = torch.repeat_interleave(torch.arange(G), torch.tensor(sizes))
        if group_layout == "any":
            labels = torch.randperm(10 * G + 10, generator=g)[:G]  # any distinct non-negative ids
            group_ids = labels[group_ids][torch.randperm(B, generator=g)]
        rewards = (torch.rand(B, generator=g) < 0.5).double()
        graded = torch.rand(B, generator=g, dtype=torch.float64)
        rewards = torch.where(torch.rand(B, generator=g) < 0.2, graded, rewards)

        return RLBatch(
            logp=logp.to(dt), old_logp=old_logp.to(dt), ref_logp=ref_logp.to(dt), rollout_logp=rollout_logp.to(dt),
            entropy=entropy.to(dt), advantages=advantages.to(dt), mask=mask.to(mask_dtype),
            group_ids=group_ids.to(torch.int64), rewards=rewards.to(dt),
        )

    return draw_batch()


@dataclass
class PreferencePairs:
    """B preference pairs of sequence log-probs, drawn by :func:`preference_pairs`.

    ``policy_chosen_logps``, ``policy_rejected_logps``: [B] (sums of token log-probs, <= 0 away from
    extremes); ``ref_chosen_logps``, ``ref_rejected_logps``: [B] or both None (reference-free);
    ``chosen_lengths``, ``rejected_lengths``: int64 [B] token counts (0 possible when degenerate;
    a zero-length response has log-prob 0); ``weights``: [B] > 0; ``soft_labels``: [B] in [0, 1].
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    weights: torch.Tensor
    soft_labels: torch.Tensor

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def preference_pairs(
    *,
    batch_size=(1, 8),
    dtype=torch.float32,
    reference: bool | None = None,
    log_ratio_scale: float = 1.0,
    extremes=(),
    degenerate: bool = True,
    max_length: int = 32,
):
    """Hypothesis strategy of :class:`PreferencePairs`.

    Args:
        batch_size: B, an int or a (min, max) range.
        dtype: float dtype, or a sequence of dtypes to draw from.
        reference: with reference log-probs (True), without (False) or either (None).
        log_ratio_scale: spread of the policy/reference log-ratios.
        extremes: magnitudes (e.g. ``(50, 1e4)``) some log-ratios take (chosen or rejected, either
            sign); without a reference they shift the policy log-probs.
        degenerate: allow zero lengths and ties (pairs whose chosen and rejected log-probs, and
            log-ratios, are equal).
        max_length: largest response length.
    """
    st = _strategies()
    b_range = _range("batch_size", batch_size, 1)
    dtypes = _dtypes(dtype)
    extremes = _extremes(extremes)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")

    @st.composite
    def draw_pairs(draw):
        B = draw(st.integers(*b_range))
        dt = draw(st.sampled_from(dtypes))
        with_ref = draw(st.booleans()) if reference is None else bool(reference)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        low = 0 if degenerate else 1
        lengths = torch.randint(low, max_length + 1, (2, B), generator=g)
        per_token = -torch.rand(2, B, generator=g, dtype=torch.float64) * 2 - 0.05
        policy = per_token * lengths
        ratio = torch.randn(2, B, generator=g, dtype=torch.float64) * log_ratio_scale
        extreme = _place_extremes(draw, st, g, (2, B), extremes)
        if extreme is not None:
            ratio = torch.where(extreme != 0, extreme, ratio)
        if degenerate and draw(st.booleans()):  # ties: rejected == chosen on some pairs
            tie = torch.rand(B, generator=g) < 0.5
            policy[1] = torch.where(tie, policy[0], policy[1])
            ratio[1] = torch.where(tie, ratio[0], ratio[1])
            lengths[1] = torch.where(tie, lengths[0], lengths[1])
        ref = None
        if with_ref:
            ref = policy - ratio
        elif extreme is not None:  # reference-free: the extremes shift the policy log-probs
            policy = policy + extreme
        return PreferencePairs(
            policy_chosen_logps=policy[0].to(dt), policy_rejected_logps=policy[1].to(dt),
            ref_chosen_logps=None if ref is None else ref[0].to(dt),
            ref_rejected_logps=None if ref is None else ref[1].to(dt),
            chosen_lengths=lengths[0], rejected_lengths=lengths[1],
            weights=(torch.rand(B, generator=g, dtype=torch.float64) * 2 + 0.05).to(dt),
            soft_labels=torch.rand(B, generator=g, dtype=torch.float64).to(dt),
        )

    return draw_pairs()


@dataclass
class PreferenceLists:
    """P prompts with K responses each, drawn by :func:`preference_lists`.

    ``policy_logps``: [P, K] sequence log-probs; ``ref_logps``: [P, K] or None; ``labels``: [P, K]
    relevance labels (binary 0/1 or graded 0..4, ties frequent); ``mask``: bool [P, K], False on
    the missing responses of ragged lists.
    """

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor | None
    labels: torch.Tensor
    mask: torch.Tensor

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def preference_lists(
    *,
    num_prompts=(1, 4),
    list_size=(1, 6),
    dtype=torch.float32,
    reference: bool | None = None,
    graded: bool | None = None,
    log_ratio_scale: float = 1.0,
    extremes=(),
    degenerate: bool = True,
):
    """Hypothesis strategy of :class:`PreferenceLists`.

    Args:
        num_prompts, list_size: P and K, ints or (min, max) ranges.
        dtype: float dtype, or a sequence of dtypes to draw from.
        reference: with reference log-probs, without, or either (None).
        graded: labels graded 0..4 (True), binary (False) or either (None).
        log_ratio_scale: spread of the log-ratios; extremes: magnitudes some log-ratios take.
        degenerate: allow ragged lists with one or no valid response and lists whose labels all tie;
            False: every list has at least two valid responses with two distinct labels (when K >= 2).
    """
    st = _strategies()
    p_range = _range("num_prompts", num_prompts, 1)
    k_range = _range("list_size", list_size, 1)
    dtypes = _dtypes(dtype)
    extremes = _extremes(extremes)

    @st.composite
    def draw_lists(draw):
        P = draw(st.integers(*p_range))
        K = draw(st.integers(*k_range))
        dt = draw(st.sampled_from(dtypes))
        with_ref = draw(st.booleans()) if reference is None else bool(reference)
        is_graded = draw(st.booleans()) if graded is None else bool(graded)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        labels = torch.randint(0, 5 if is_graded else 2, (P, K), generator=g).double()
        if degenerate:
            ragged = draw(st.sampled_from((0.0, 0.3, 0.8)))
            mask = torch.rand(P, K, generator=g) >= ragged
            if draw(st.booleans()):
                labels[0] = labels[0, 0]  # the first list ties everywhere
        else:
            mask = torch.ones(P, K, dtype=torch.bool)
            if K >= 2:
                labels[:, 0], labels[:, 1] = 1.0, 0.0
        policy = -torch.rand(P, K, generator=g, dtype=torch.float64) * 20
        ratio = torch.randn(P, K, generator=g, dtype=torch.float64) * log_ratio_scale
        extreme = _place_extremes(draw, st, g, (P, K), extremes)
        if extreme is not None:
            ratio = torch.where(extreme != 0, extreme, ratio)
        ref = policy - ratio if with_ref else None
        return PreferenceLists(
            policy_logps=policy.to(dt), ref_logps=None if ref is None else ref.to(dt),
            labels=labels.to(dt), mask=mask,
        )

    return draw_lists()


@dataclass
class LogitsBatch:
    """Logits and labels, drawn by :func:`logits_with_labels`.

    ``logits``: [N, V] (or [B, T, V]), possibly a non-contiguous view; ``labels``: int64 shaped like
    ``logits[..., 0]``, each in [0, V) or ``ignore_index``; ``ignore_index``: the label value of
    ignored rows.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    ignore_index: int = -100

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: Vocabulary sizes next to powers of two: off by one from any block size a kernel may use.
AWKWARD_VOCAB_SIZES = (31, 33, 63, 65, 127, 129, 255, 257, 511, 513, 1023, 1025, 2047, 2049, 4095, 4097)


def logits_with_labels(
    *,
    rows=(1, 16),
    vocab_size=(1, 1100),
    dtype=torch.float32,
    scale: float = 3.0,
    extremes=(),
    ignore: bool = True,
    ignore_index: int = -100,
    masked_vocab: bool = False,
    batch_dims: bool | None = False,
    contiguous: bool | None = True,
    degenerate: bool = True,
):
    """Hypothesis strategy of :class:`LogitsBatch`.

    Args:
        rows: number of label positions N (B x T when ``batch_dims``), an int or a (min, max) range.
        vocab_size: V range; besides uniform draws, V is often one of ``AWKWARD_VOCAB_SIZES`` within
            the range (V not a multiple of any block size), and V = min is drawn too.
        dtype: float dtype, or a sequence of dtypes to draw from.
        scale: standard deviation of ordinary logits.
        extremes: logit magnitudes (e.g. ``(100, 1e4)``) some examples scale their logits to.
        ignore: some labels are ``ignore_index`` (the fraction is drawn: none, some or, when
            ``degenerate``, all).
        ignore_index: the ignored label value.
        masked_vocab: some logits are -inf (never at a row's label).
        batch_dims: logits [B, T, V] (True), [N, V] (False) or either (None).
        contiguous: contiguous logits (True), a non-contiguous view (False: a column slice or a
            transpose of a larger buffer) or either (None).
        degenerate: allow fully ignored batches (with ``ignore``) and V = 1 when the range holds it.
    """
    st = _strategies()
    n_range = _range("rows", rows, 1)
    v_range = _range("vocab_size", vocab_size, 1)
    dtypes = _dtypes(dtype)
    extremes = _extremes(extremes)
    awkward = [v for v in AWKWARD_VOCAB_SIZES if v_range[0] <= v <= v_range[1]]
    v_choices = [st.integers(*v_range), st.just(v_range[0])] + ([st.sampled_from(awkward)] if awkward else [])
    fractions = ((0.0, 0.3) + ((1.0,) if degenerate else ())) if ignore else (0.0,)

    @st.composite
    def draw_logits(draw):
        N = draw(st.integers(*n_range))
        V = draw(st.one_of(*v_choices))
        if not degenerate and V == 1 and v_range[1] > 1:
            V = 2
        dt = draw(st.sampled_from(dtypes))
        shaped = draw(st.booleans()) if batch_dims is None else bool(batch_dims)
        is_contiguous = draw(st.booleans()) if contiguous is None else bool(contiguous)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        magnitude = scale
        if extremes and draw(st.booleans()):
            magnitude = draw(st.sampled_from(extremes))
        values = torch.randn(N, V, generator=g, dtype=torch.float64) * magnitude
        labels = torch.randint(0, V, (N,), generator=g)
        if masked_vocab and V > 1:
            hole = torch.rand(N, V, generator=g) < 0.3
            hole[torch.arange(N), labels] = False
            values = values.masked_fill(hole, float("-inf"))
        fraction = draw(st.sampled_from(fractions))
        if fraction:
            labels = torch.where(torch.rand(N, generator=g) < fraction, ignore_index, labels)
        if is_contiguous:
            logits = values.to(dt)
        elif draw(st.booleans()):
            wide = torch.zeros(N, V + 3, dtype=dt)
            wide[:, :V] = values.to(dt)
            logits = wide[:, :V]
        else:
            logits = values.t().contiguous().to(dt).t()
        if shaped:
            B = draw(st.sampled_from([d for d in range(1, N + 1) if N % d == 0]))
            logits, labels = logits.unflatten(0, (B, N // B)), labels.view(B, N // B)
        return LogitsBatch(logits=logits, labels=labels, ignore_index=ignore_index)

    return draw_logits()


# =============================================================================================
# invariance checkers
#
# A checker calls ``loss_fn(batch, **counts)`` on the batch and on transformed batches. ``batch``
# is a mapping (or a dataclass such as RLBatch) of tensors whose first dimension is the sequence
# (row); other values are passed through. ``loss_fn`` gets a batch of the same type and returns a
# scalar loss tensor or a tuple whose first element is it. Gradients are taken w.r.t. the floating
# tensors named by ``wrt``.


def default_counts(batch, mask_key: str = "mask") -> dict:
    """The global counts of a padded batch, as keywords of a loss: ``num_tokens`` (the mask's sum),
    ``num_sequences`` (B) and ``max_length`` (T), Python numbers. The keywords of
    :func:`fusedrl.policy_loss` and :func:`fusedrl.aggregate`."""
    mask = _as_dict(batch)[0][mask_key]
    total = mask.sum().item()
    return {"num_tokens": total, "num_sequences": int(mask.shape[0]), "max_length": int(mask.shape[1])}


def _as_dict(batch):
    """(dict of fields, function rebuilding a batch of the caller's type from such a dict)."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in fields(batch)}, lambda d: dataclasses.replace(batch, **d)
    if isinstance(batch, Mapping):
        return dict(batch), dict
    raise TypeError(f"batch must be a mapping or a dataclass of tensors, got {type(batch).__name__}")


def _num_rows(d: dict, mask_key: str) -> int:
    if isinstance(d.get(mask_key), torch.Tensor) and d[mask_key].dim() >= 1:
        return int(d[mask_key].shape[0])
    for v in d.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    raise ValueError("batch holds no tensor with a row dimension")


def _take(d: dict, index: torch.Tensor, B: int) -> dict:
    return {k: (v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
            for k, v in d.items()}


def _resolve_counts(counts, batch, mask_key: str) -> dict:
    if counts is None:
        return default_counts(batch, mask_key)
    if callable(counts):
        counts = counts(batch)
    if not isinstance(counts, Mapping):
        raise TypeError(
            f"counts must be None, a mapping of keywords or a callable returning one, got {type(counts).__name__}"
        )
    return dict(counts)


def _loss_and_grads(loss_fn, d: dict, rebuild, counts: dict, wrt) -> tuple[torch.Tensor, dict]:
    d = dict(d)
    leaves = {}
    for key in wrt:
        if key not in d:
            raise ValueError(f"wrt names {key!r}, which the batch does not hold (keys: {', '.join(d)})")
        value = d[key]
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"wrt names {key!r}, which is not a floating-point tensor")
        leaves[key] = d[key] = value.detach().clone().requires_grad_(True)
    out = loss_fn(rebuild(d), **counts)
    loss = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("loss_fn must return a one-element loss tensor or a tuple whose first element is one")
    loss = loss.reshape(())
    grads = dict.fromkeys(leaves)
    if loss.requires_grad and leaves:
        got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = dict(zip(leaves, got))
    grads = {k: (torch.zeros_like(leaves[k]) if g is None else g.detach()) for k, g in grads.items()}
    return loss.detach(), grads


def _bound(want: torch.Tensor, rtol: float, atol: float) -> float:
    w = want.detach().double()
    w = w[torch.isfinite(w)]
    return atol + rtol * (float(w.abs().max()) if w.numel() else 0.0)


def _fmt(t: torch.Tensor) -> str:
    return f"{float(t):.10g}" if t.numel() == 1 else str(t)


def _worst(got: torch.Tensor, want: torch.Tensor) -> str:
    diff = (got.detach().double() - want.detach().double()).abs().nan_to_num(nan=float("inf"))
    same = (torch.isnan(got) & torch.isnan(want)) | (got == want)
    diff = diff.masked_fill(same, 0.0)
    at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"at {at}: {float(got[at]):.10g} vs {float(want[at]):.10g}"


def _compare_all(what: str, loss, want_loss, grads, want_grads, rtol, atol, hint: str) -> None:
    err, bound = max_error(loss, want_loss), _bound(want_loss, rtol, atol)
    if not err <= bound:
        raise AssertionError(
            f"{what}: loss {_fmt(loss)} differs from {_fmt(want_loss)} by {err:.3g} > {bound:.3g} "
            f"(atol {atol:g} + rtol {rtol:g} x |loss|). {hint}"
        )
    for key, g in grads.items():
        err, bound = max_error(g, want_grads[key]), _bound(want_grads[key], rtol, atol)
        if not err <= bound:
            raise AssertionError(
                f"{what}: gradient w.r.t. {key} differs by {err:.3g} > {bound:.3g} "
                f"({_worst(g, want_grads[key])}). {hint}"
            )


def _chunks(index: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [c for c in torch.tensor_split(index, min(n, max(len(index), 1))) if len(c)]


def _group_chunks(index: torch.Tensor, groups: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``index`` cut into at most n pieces, each holding whole groups (order of first appearance)."""
    ids = groups[index]
    order = []
    for gid in ids.tolist():
        if gid not in order:
            order.append(gid)
    pieces = []
    for chunk in _chunks(torch.arange(len(order)), n):
        members = torch.isin(ids, torch.tensor([order[i] for i in chunk.tolist()], dtype=ids.dtype))
        pieces.append(index[members])
    return pieces


def _partition(B: int, splits, ranks: int, groups: torch.Tensor | None) -> list[list[torch.Tensor]]:
    """``[rank][micro-batch] -> row indices``."""
    rows = torch.arange(B)
    if isinstance(splits, int) and not isinstance(splits, bool):
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        cut = _chunks if groups is None else (lambda idx, n: _group_chunks(idx, groups, n))
        shards = cut(rows, ranks)
        if len(shards) < ranks:
            raise ValueError(f"cannot deal the batch to {ranks} ranks: it holds {B} rows"
                             + ("" if groups is None else f" in {len(shards)} whole groups"))
        return [cut(shard, splits) for shard in shards]
    splits = list(splits)
    if splits and all(isinstance(s, int) and not isinstance(s, bool) for s in splits):
        if ranks != 1:
            raise ValueError("splits as micro-batch sizes apply to ranks=1; pass an int or explicit row indices")
        if any(s < 0 for s in splits) or sum(splits) != B:
            raise ValueError(f"splits as sizes must be >= 0 and sum to the batch's {B} rows, got {splits}")
        pieces = [p for p in torch.split(rows, splits) if len(p)]
    else:
        pieces = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in splits]
        seen = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
        if len(seen) != B or not torch.equal(seen.sort().values, rows):
            raise ValueError(f"splits as row indices must cover each of the {B} rows exactly once")
        pieces = [p for p in pieces if len(p)]
    if groups is not None:
        for p in pieces:
            inside = torch.isin(groups, groups[p]).sum()
            if int(inside) != len(p):
                raise ValueError("keep_groups=True: a micro-batch of splits holds part of a group")
    return [pieces[r::ranks] for r in range(ranks)]


def check_microbatch_invariance(
    loss_fn,
    batch,
    splits=2,
    *,
    ranks: int = 1,
    counts=None,
    wrt=("logp",),
    keep_groups: bool = False,
    group_key: str = "group_ids",
    mask_key: str = "mask",
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
    """Assert the micro-batch / data-parallel law: with global counts, the losses of the pieces add
    up to the full-batch loss, and their gradients to its gradient.

    The rows are dealt to ``ranks`` simulated ranks (contiguous shards), each rank's shard is cut
    into micro-batches, ``loss_fn(piece, **counts)`` runs on every piece with the full batch's
    counts, and the result is compared with ``loss_fn(batch, **counts)``: loss and gradients (w.r.t.
    ``wrt``, scattered back to the full batch's rows) within ``atol + rtol * max|full|``.

    Args:
        loss_fn: ``loss_fn(batch, **counts) -> loss`` or ``(loss, ...)``.
        batch: a mapping or dataclass of tensors with the rows first (e.g. :class:`RLBatch`).
        splits: micro-batches per rank (int; near-equal contiguous pieces, empty ones dropped), a
            list of micro-batch sizes summing to B (``ranks=1``), or a list of row-index sequences
            partitioning the rows (dealt round-robin to the ranks).
        ranks: number of simulated data-parallel ranks.
        counts: keywords passed to every call: None (:func:`default_counts` of the full batch:
            ``num_tokens``, ``num_sequences``, ``max_length``), a mapping, or a callable of the
            full batch returning one (e.g. to add ``num_groups``).
        wrt: keys of the tensors whose gradients are compared.
        keep_groups: every piece holds whole groups of ``batch[group_key]`` (needed by losses
            normalized per group, e.g. ``aggregation="balanced"``).

    Ranks are summed like micro-batches: fusedrl's convention that losses add up (DDP averages
    gradients over D ranks, so TRL and verl multiply each rank's loss by D; check such a loss
    without that factor).

    Raises:
        AssertionError naming what differs; ValueError for a bad partition.
    """
    d, rebuild = _as_dict(batch)
    B = _num_rows(d, mask_key)
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an int >= 1, got {ranks!r}")
    groups = None
    if keep_groups:
        if not isinstance(d.get(group_key), torch.Tensor):
            raise ValueError(f"keep_groups=True needs the batch's {group_key!r} tensor")
        groups = d[group_key].detach().cpu()
    plan = _partition(B, splits, ranks, groups)
    kw = _resolve_counts(counts, batch, mask_key)
    full_loss, full_grads = _loss_and_grads(loss_fn, d, rebuild, kw, wrt)

    total = torch.zeros((), dtype=torch.float64)
    grads = {k: torch.zeros_like(g, dtype=torch.float64) for k, g in full_grads.items()}
    for shard in plan:
        for index in shard:
            loss, g = _loss_and_grads(loss_fn, _take(d, index, B), rebuild, kw, wrt)
            total = total + loss.double().cpu()
            for k in grads:
                grads[k].index_add_(0, index.to(grads[k].device), g[k].double())
    sizes = [[len(i) for i in shard] for shard in plan]
    where = f"{sum(map(len, sizes))} micro-batches over {ranks} rank(s), rows per micro-batch {sizes}"
    _compare_all(
        f"micro-batch invariance ({where})",
        total, full_loss, grads, full_grads, rtol, atol,
        f"The pieces must add up to the full batch when given its global counts ({', '.join(kw) or 'none'}): "
        "a loss normalized by a count of its own micro-batch (tokens, sequences, groups) instead of the "
        "global one breaks this law.",
    )


def _relabelled(ids: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    unique = torch.unique(ids)
    new = (torch.randperm(3 * len(unique) + 5, generator=g)[: len(unique)] * 7 + 11).to(ids.dtype)
    mapped = new.to(ids.device)[torch.searchsorted(unique, ids)]
    return mapped, dict(zip(unique.tolist(), new.tolist()))


def check_permutation_invariance(
    loss_fn,
    batch,
    *,
    perm=None,
    relabel_groups: bool = True,
    seed: int = 0,
    counts=None,
    wrt=("logp",),
    group_key: str = "group_ids",
    mask_key: str = "mask",
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
    """Assert that permuting the sequences (rows) and relabelling the group ids changes nothing:
    the loss is the same and each row's gradient moves with its row.

    Args:
        loss_fn, batch, counts, wrt, mask_key: as :func:`check_microbatch_invariance` (counts: the
            batch's own by default).
        perm: the row permutation (default: a random one from ``seed``).
        relabel_groups: map the ids in ``batch[group_key]`` (when present) through a random
            bijection onto other, non-contiguous integers: a loss must depend on which rows share
            a group, not on the ids' values or order.
        seed: seeds the random permutation and relabelling.

    Raises:
        AssertionError naming what differs.
    """
    d, rebuild = _as_dict(batch)
    B = _num_rows(d, mask_key)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B, generator=g) if perm is None else torch.as_tensor(perm, dtype=torch.int64)
    if len(perm) != B or not torch.equal(perm.sort().values, torch.arange(B)):
        raise ValueError(f"perm must be a permutation of range({B}), got {perm.tolist()}")
    kw = _resolve_counts(counts, batch, mask_key)
    loss, grads = _loss_and_grads(loss_fn, d, rebuild, kw, wrt)
    moved = _take(d, perm, B)
    relabel = ""
    if relabel_groups and isinstance(moved.get(group_key), torch.Tensor):
        moved[group_key], mapping = _relabelled(moved[group_key], g)
        relabel = f" and relabelling {group_key} {mapping}"
    p_loss, p_grads = _loss_and_grads(loss_fn, moved, rebuild, kw, wrt)
    _compare_all(
        f"permutation invariance (rows permuted by {perm.tolist()}{relabel})",
        p_loss, loss, p_grads, {k: v[perm.to(v.device)] for k, v in grads.items()}, rtol, atol,
        "A loss must not depend on the order of the sequences nor on the values of the group ids.",
    )


def _is_token_tensor(v, B: int, T: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (B, T)


def _broadcast(where: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B, T] boolean broadcast over the trailing dimensions of ``like``."""
    return where.reshape(tuple(where.shape) + (1,) * (like.dim() - 2)).expand(like.shape)


def check_padding_invariance(
    loss_fn,
    batch,
    *,
    extra: int = 3,
    pad_value="random",
    refill: bool = True,
    seed: int = 0,
    counts=None,
    wrt=("logp",),
    mask_key: str = "mask",
    token_keys=None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
    """Assert that padded tokens change nothing: appending ``extra`` padded positions to every row
    (mask 0) and, with ``refill``, overwriting the values at the existing padded positions leave
    the loss and the gradients at the valid positions unchanged, and give zero gradient at every
    padded position.

    Args:
        loss_fn, batch, wrt, mask_key: as :func:`check_microbatch_invariance`.
        extra: padded positions appended to each row.
        pad_value: the values written at padded positions of the floating token tensors:
            ``"random"`` (finite garbage, standard deviation 10) or a number (``float("nan")`` is
            the strict test: a loss that multiplies padded values by a zero mask fails it, one that
            selects with ``torch.where`` passes). Integer token tensors are padded with 0.
        refill: also overwrite the values at the batch's own padded positions.
        seed: seeds the random garbage.
        counts: keywords passed to both calls; default :func:`default_counts` of the unpadded batch
            (so ``max_length`` stays the original T: a loss normalized by the padded length fails).
        token_keys: the [B, T, ...] tensors to pad; default: every tensor whose first two
            dimensions are the mask's.

    Raises:
        AssertionError naming what differs.
    """
    d, rebuild = _as_dict(batch)
    mask = d[mask_key]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"batch[{mask_key!r}] must be a [B, T] mask tensor")
    if not isinstance(extra, int) or extra < 0:
        raise ValueError(f"extra must be an int >= 0, got {extra!r}")
    B, T = mask.shape
    if token_keys is None:
        token_keys = [k for k, v in d.items() if _is_token_tensor(v, B, T)]
    g = torch.Generator().manual_seed(seed)
    pad = mask == 0
    new_pad = torch.ones(B, extra, dtype=torch.bool, device=pad.device)
    all_pad = torch.cat([pad, new_pad], 1)  # every padded position of the padded batch
    garbage_at = torch.cat([pad if refill else torch.zeros_like(pad), new_pad], 1)
    padded = dict(d)
    for key in token_keys:
        v = d[key]
        wide = torch.cat([v, v.new_zeros((B, extra) + tuple(v.shape[2:]))], 1)
        if key != mask_key:
            where = _broadcast(garbage_at, wide)
            if not v.is_floating_point():
                wide = wide.masked_fill(where, 0)
            elif pad_value == "random":
                garbage = torch.randn(wide.shape, generator=g, dtype=torch.float64) * 10
                wide = torch.where(where, garbage.to(device=v.device, dtype=v.dtype), wide)
            else:
                wide = wide.masked_fill(where, float(pad_value))
        padded[key] = wide
    kw = _resolve_counts(counts, batch, mask_key)
    loss, grads = _loss_and_grads(loss_fn, d, rebuild, kw, wrt)
    p_loss, p_grads = _loss_and_grads(loss_fn, padded, rebuild, kw, wrt)

    desc = "random finite values" if pad_value == "random" else f"{pad_value!r}"
    refilled = f", {int(pad.sum())} existing padded position(s) refilled" if refill else ""
    what = f"padding invariance ({extra} padded position(s) appended per row{refilled}, values {desc})"
    hint = ("A loss must not read padded positions: a mean over T instead of over the mask, a "
            "normalization by the padded length, or (for NaN/inf padding) a product of padded values "
            "with a zero mask breaks this.")
    clean, valid = {}, {}
    for key, gk in p_grads.items():
        if _is_token_tensor(gk, B, T + extra):
            leak = gk[all_pad]
            if leak.numel() and not bool((leak.abs() <= atol).all()):
                worst = float(leak.abs().nan_to_num(nan=float("inf")).max())
                raise AssertionError(
                    f"{what}: gradient w.r.t. {key} is nonzero at padded positions (max |grad| {worst:.3g}). {hint}"
                )
            # compared at the valid positions (the padded ones of the original batch are zero above)
            valid[key] = gk[:, :T].masked_fill(_broadcast(pad, gk[:, :T]), 0.0)
            clean[key] = grads[key].masked_fill(_broadcast(pad, grads[key]), 0.0)
        else:
            valid[key], clean[key] = gk, grads[key]
    _compare_all(what, p_loss, loss, valid, clean, rtol, atol, hint)
