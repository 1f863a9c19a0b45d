"""Hypothesis strategies of RL batches, preference pairs and lists, and logits with labels (see
:mod:`fusedrl.testing`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

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
