r"""Advantages and returns: group estimators (GRPO, RLOO, REINFORCE++, pass@k, OPO, ReMax, GPG),
multi-objective rewards, phase- and segment-level advantages, GAE and discounted returns.

Each public function validates its arguments (TypeError / ValueError naming the argument), freezes
its options into a params dataclass, normalizes the group layout to dense indices, picks a backend
(the group estimators run as one CPU kernel call, ``fusedrl::group_advantages``, or take their
group statistics from the segment-statistics kernels ``cpu``, ``cuda``, ``triton`` of
:mod:`fusedrl.ops.segments`; :func:`gae` and :func:`discounted_returns` run the
scan kernels of :mod:`fusedrl.ops.scan`; ``torch`` is the reference in
:mod:`fusedrl.reference.advantages`) and runs it under ``torch.no_grad()``: advantages and returns are constants for the policy loss, as
in verl and TRL, so the outputs never require grad.

Group layouts: either ``group_size`` (contiguous fixed-size groups, TRL's layout: rows
``[k g, (k + 1) g)`` are the completions of prompt k) or ``group_ids`` (any integers in any order,
verl's ``uid`` layout). Nested groups (e.g. budget subgroups, seed HBPO) are expressed by passing the
subgroup ids.

Dtypes: float32 accumulation (float64 for float64 input); outputs are float32 (float64).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from fusedrl import _validate as check
from fusedrl import dispatch
from fusedrl.reference import advantages as ref

__all__ = [
    "group_advantages",
    "phase_advantages",
    "segment_advantages",
    "gae",
    "discounted_returns",
    "GroupAdvantageParams",
    "PhaseAdvantageParams",
    "SegmentAdvantageParams",
    "GAEParams",
    "DiscountParams",
]

# group_advantages, phase_advantages, segment_advantages: the segment-statistics kernels
SEGMENT_BACKENDS = ("cpu", "cuda", "triton", "torch")
SCAN_BACKENDS = ("cpu", "cuda", "triton", "torch")  # gae, discounted_returns (fusedrl.ops.scan)
ESTIMATORS = ("grpo", "rloo", "reinforce++", "reinforce++-baseline", "grpo_passk", "opo", "remax", "gpg")
ESTIMATOR_ALIASES = {"reinforce_plus_plus": "reinforce++", "reinforce_plus_plus_baseline": "reinforce++-baseline"}
SEQUENCE_ESTIMATORS = ("grpo", "rloo")  # phase_advantages / segment_advantages
SCALES = ("group", "batch", "none")
COMBINES = ("sum_then_normalize", "normalize_then_sum", "chebyshev", "min", "mean_minus_var")
SINGLETONS = ("verl", "zero")
MASK_DTYPES = check.MASK_DTYPES


# ----------------------------------------------------------------------------------------------
# params
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupAdvantageParams:
    """Options of :func:`group_advantages` (see its docstring for each one's meaning)."""

    estimator: str = "grpo"
    scale: str = "group"
    eps: float = 1e-6
    combine: str | None = None
    weights: tuple[float, ...] | None = None
    ideal: tuple[float, ...] | None = None
    var_coef: float = 1.0
    gamma: float = 1.0
    singleton: str = "verl"


@dataclass(frozen=True)
class PhaseAdvantageParams:
    """Options of :func:`phase_advantages`."""

    estimator: str = "grpo"
    scale: str = "group"
    eps: float = 1e-6
    singleton: str = "verl"


@dataclass(frozen=True)
class SegmentAdvantageParams:
    """Options of :func:`segment_advantages`; ``lam`` weighs the segment-level advantage."""

    estimator: str = "grpo"
    scale: str = "group"
    eps: float = 1e-6
    singleton: str = "verl"
    lam: float = 1.0


@dataclass(frozen=True)
class GAEParams:
    """Options of :func:`gae`."""

    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = False


@dataclass(frozen=True)
class DiscountParams:
    """Options of :func:`discounted_returns`."""

    gamma: float = 1.0


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------


def _choice(name: str, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _real(name: str, value, low: float | None = None, high: float | None = None) -> float:
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {value}")
    return value


def _floats(name: str, value, length: int) -> tuple[float, ...]:
    """A sequence of ``length`` finite numbers (list, tuple or 1-D tensor) as a tuple of floats."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
        value = value.detach().cpu().tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list, tuple or 1-D tensor of numbers, got {type(value).__name__}")
    if len(value) != length:
        raise ValueError(f"{name} must have {length} entries (one per objective), got {len(value)}")
    return tuple(_real(f"{name}[{k}]", v) for k, v in enumerate(value))


def _estimator(name: str, value, choices) -> str:
    value = ESTIMATOR_ALIASES.get(value, value) if isinstance(value, str) else value
    return _choice(name, value, choices)


def _mask(name: str, mask, rows: int, ref_name: str, ref_tensor: torch.Tensor, shape=None) -> torch.Tensor:
    check.mask_tensor(name, mask)
    if shape is not None:
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    elif mask.dim() != 2 or mask.shape[0] != rows:
        raise ValueError(f"{name} must have shape [N, T] with N = {rows}, got {tuple(mask.shape)}")
    check.same_device(name, mask, ref_name, ref_tensor)
    return mask


def _layout(rows: int, group_ids, group_size, like: torch.Tensor, required: bool = True) -> int | None:
    """Validate the group layout: the group size for ``group_size``, 0 for ``group_ids``, None for
    neither (allowed when not ``required``)."""
    if group_ids is not None and group_size is not None:
        raise ValueError("pass either group_ids or group_size, not both")
    if group_ids is not None:
        check.tensor("group_ids", group_ids, check.INDEX_DTYPES)
        if group_ids.dim() != 1 or group_ids.shape[0] != rows:
            raise ValueError(f"group_ids must have shape [N] with N = {rows}, got {tuple(group_ids.shape)}")
        check.same_device("group_ids", group_ids, "rewards", like)
        return 0
    if group_size is not None:
        size = check.integer("group_size", group_size)
        if size < 1:
            raise ValueError(f"group_size must be >= 1, got {size}")
        if rows % size:
            raise ValueError(f"group_size must divide the number of rows N = {rows}, got {size}")
        return size
    if required:
        raise ValueError("pass group_ids (any integer ids, verl's layout) or group_size (TRL's contiguous layout)")
    return None


def _groups(rows: int, group_ids, group_size, like: torch.Tensor, required: bool = True):
    """Validate the layout and return the dense ``(index, num_groups)`` (or ``(None, 0)``)."""
    return _dense_groups(rows, group_ids, _layout(rows, group_ids, group_size, like, required), like)


def _dense_groups(rows: int, group_ids, size: int | None, like: torch.Tensor):
    """The dense ``(index, num_groups)`` of a validated layout (``size`` from :func:`_layout`)."""
    if size is None:
        return None, 0
    if size == 0:
        return ref.group_index(rows, group_ids=group_ids)
    return ref.group_index(rows, group_size=size, device=like.device)


def _segment_stats(op: str, tensor: torch.Tensor, backend, index, group_size):
    """The ``group_stats`` implementation of the backend chosen for ``op``: the reference's for
    ``torch``, else the segment-statistics kernel (:mod:`fusedrl.ops.segments`). Statistics over
    the call's own layout built from ``group_size`` read no index (contiguous groups)."""
    name = dispatch.select(op, SEGMENT_BACKENDS, tensor.device, tensor.dtype, backend)
    if name == "torch":
        return ref.group_stats
    from fusedrl.ops import segments  # noqa: PLC0415

    def stats(values, idx, num_groups, *, weight=None, singleton="verl", need_loo=True):
        size = group_size if (group_size is not None and idx is index) else None
        return segments.group_stats(
            values, None if size else idx, num_groups, weight=weight, singleton=singleton, group_size=size,
            need_loo=need_loo, backend=name,
        )

    return stats


# ----------------------------------------------------------------------------------------------
# group advantages
# ----------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
    weights=None,
    combine: str | None = None,
    ideal=None,
    var_coef: float = 1.0,
    mask: torch.Tensor | None = None,
    baseline: torch.Tensor | None = None,
    gamma: float = 1.0,
    singleton: str = "verl",
    backend: str | None = None,
) -> torch.Tensor:
    r"""Outcome advantages from one reward per completion, normalized within groups.

    Row i in group g (n_g rows, mean :math:`\bar R_g`, unbiased std :math:`s_g`):

    ==========================  ====================================================================
    estimator                   advantage (peer it matches)
    ==========================  ====================================================================
    ``"grpo"``                  :math:`(R_i - \bar R_g) / d_g` (verl ``grpo``, TRL ``GRPOTrainer``)
    ``"rloo"``                  :math:`R_i - \frac{1}{n_g - 1}\sum_{j \ne i} R_j` (verl ``rloo``)
    ``"reinforce++-baseline"``  whiten(:math:`R_i - \bar R_g`) over the batch (verl
                                ``reinforce_plus_plus_baseline``)
    ``"reinforce++"``           whiten(discounted return of R placed at the row's last valid
                                token), no groups (verl ``reinforce_plus_plus``; uses ``gamma``)
    ``"grpo_passk"``            the first best row of each group gets :math:`(R_{max} - R_{2nd})
                                / d_g`, the others 0 (verl ``grpo_passk``; groups need >= 2 rows)
    ``"opo"``                   :math:`R_i - \sum_j |y_j| R_j / \sum_j |y_j|`, |y| the response
                                lengths from ``mask`` (verl ``opo``; needs ``mask``)
    ``"remax"``                 :math:`R_i - b_i`, b = ``baseline`` (the greedy response's reward),
                                no groups (verl ``remax``)
    ``"gpg"``                   :math:`\frac{N}{\max(\#\{R_j \ne 0\}, 1)} (R_i - \bar R_g)` (verl
                                ``gpg``)
    ==========================  ====================================================================

    ``d_g`` follows ``scale``: ``"group"``: :math:`s_g + \epsilon`; ``"batch"``: the unbiased std of
    all N rewards + eps (TRL ``scale_rewards="batch"``; the mean stays per group); ``"none"``: 1
    (Dr.GRPO; verl ``norm_adv_by_std_in_grpo=False``); eps > 0. Only grpo and grpo_passk divide by a std: the
    other estimators accept ``"group"`` (the default) or ``"none"`` and ignore it, and reject
    ``"batch"``. ``eps``: 1e-6 as verl; TRL uses 1e-4. whiten is verl's ``masked_whiten``:
    :math:`(x - \bar x)/\sqrt{s^2 + 10^{-8}}` with the unbiased variance over the valid tokens (over
    the N rows without ``mask``). verl's aliases ``"reinforce_plus_plus"`` and
    ``"reinforce_plus_plus_baseline"`` are accepted. verl's ``grpo_vectorized`` equals ``"grpo"``;
    its ``rloo_vectorized`` equals ``"rloo"`` with ``singleton="zero"``. verl's
    ``optimal_token_baseline`` estimators need per-token policy statistics and are not outcome
    estimators: not offered here.

    Singleton groups: ``singleton="verl"`` (default) gives a one-row group mean 0, std 1 and
    leave-one-out mean 0, as verl (so grpo gives :math:`R/(1+\epsilon)`, rloo gives R);
    ``singleton="zero"`` gives it a centred reward of 0, as TRL's GRPO and RLOO trainers (which meet
    it only in evaluation with ``num_generations_eval=1``) and verl's ``rloo_vectorized``.
    Zero-variance groups give exactly 0 (the group mean is computed shifted by the group max, so the
    centred rewards are exact zeros; the peers leave a rounding residue divided by eps).

    Multi-objective rewards ``[N, K]`` need ``combine`` (w = ``weights``, default all ones):

    - ``"sum_then_normalize"``: :math:`R = \sum_k w_k R_k`, then the estimator (TRL's default
      ``multi_objective_aggregation``).
    - ``"normalize_then_sum"`` (GDPO): grpo per objective (with ``scale``, ``eps``), weighted sum S,
      then a batch normalization: without ``mask`` TRL's :math:`(S - \bar S)/(s_S + \epsilon)` over
      the rows (TRL ``multi_objective_aggregation="normalize_then_sum"``); with ``mask`` verl's
      whiten over the valid tokens (verl ``gdpo``). Needs ``estimator="grpo"``.
    - ``"chebyshev"`` (seed MOCHA): :math:`R = -\max_k w_k |z_k - R_k|`, z = ``ideal`` (required).
    - ``"min"`` (seeds MaxMin-RLHF, reward-ensemble WCO): :math:`R = \min_k w_k R_k`.
    - ``"mean_minus_var"`` (seed reward-ensemble UWO; our reading): :math:`R = \bar m - \lambda
      \frac1K\sum_k (m_k - \bar m)^2` with members :math:`m_k = w_k R_k`, :math:`\lambda` =
      ``var_coef``.

    Args:
        rewards: ``[N]`` or ``[N, K]`` floating point, one row per completion.
        group_ids: ``[N]`` int64 / int32, any ids in any order (verl). Or ``group_size``.
        group_size: rows per group, contiguous (TRL); must divide N. Not needed by remax and
            reinforce++ (ignored when given).
        estimator, scale, eps, weights, combine, ideal, var_coef, singleton: see above.
        mask: ``[N, T]`` response mask (nonzero = valid token). When given, the output is per token
            ``[N, T]`` (0 at masked tokens) and batch whitening runs over the valid tokens, as verl.
            Required by ``"opo"``.
        baseline: ``[N]`` floating point, the ReMax baseline rewards (``"remax"`` only).
        gamma: discount in [0, 1] of ``"reinforce++"`` (masked tokens are skipped, not discounted).
        backend: see :mod:`fusedrl.dispatch`. ``"cpu"``: one kernel call (``fusedrl::group_advantages``:
            the ids keyed through a byte map or a hash, no sort; each group's statistics, every
            row's advantage, the combine and the batch whitening / normalization fused) for every
            group estimator (not remax, reinforce++) except, with ``mask``, reinforce++-baseline
            and normalize_then_sum, which whiten over tokens and are composed as on the other
            backends: the group statistics from the segment-statistics kernels (``"cuda"``,
            ``"triton"``, ``"cpu"``) or the reference (``"torch"``), with elementwise torch ops.

    Returns:
        advantages ``[N]``, or ``[N, T]`` when ``mask`` is given; float32 (float64 for float64
        rewards).
    """
    check.tensor("rewards", rewards, check.FLOAT_DTYPES)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must have shape [N] or [N, K], got {tuple(rewards.shape)}")
    N = rewards.shape[0]
    est = _estimator("estimator", estimator, ESTIMATORS)
    scale = _choice("scale", scale, SCALES)
    if scale == "batch" and est not in ("grpo", "grpo_passk"):
        raise ValueError(f"scale='batch' divides by a std, which estimator={est!r} does not; use 'group' or 'none'")
    eps = check.positive_float("eps", eps)
    singleton = _choice("singleton", singleton, SINGLETONS)
    gamma = _real("gamma", gamma, 0.0, 1.0)
    var_coef = _real("var_coef", var_coef)

    K = rewards.shape[1] if rewards.dim() == 2 else None
    if combine is not None:
        combine = _choice("combine", combine, COMBINES)
        if K is None:
            raise ValueError("combine needs rewards of shape [N, K] (one column per objective), got rewards [N]")
        if K < 1:
            raise ValueError("rewards must have K >= 1 objectives")
    elif K is not None:
        raise ValueError(
            f"rewards [N, K] = {tuple(rewards.shape)} needs combine= (one of {COMBINES}); pass [N] otherwise"
        )
    if weights is not None and combine is None:
        raise ValueError("weights needs rewards [N, K] and combine=")
    weights_t = None if weights is None else _floats("weights", weights, K)
    ideal_t = None
    if combine == "chebyshev":
        if ideal is None:
            raise ValueError("combine='chebyshev' needs ideal= (the ideal point z, one value per objective)")
        ideal_t = _floats("ideal", ideal, K)
    elif ideal is not None:
        raise ValueError("ideal is only used by combine='chebyshev'")
    if combine == "normalize_then_sum" and est != "grpo":
        raise ValueError(
            f"combine='normalize_then_sum' group-normalizes each objective with grpo; got estimator={est!r}"
        )

    if mask is not None:
        _mask("mask", mask, N, "rewards", rewards)
    elif est == "opo":
        raise ValueError("estimator='opo' needs mask= (its baseline weighs rewards by response length)")
    if est == "remax":
        if baseline is None:
            raise ValueError("estimator='remax' needs baseline= (the reward of each prompt's greedy response, [N])")
        check.tensor("baseline", baseline, check.FLOAT_DTYPES)
        if tuple(baseline.shape) != (N,):
            raise ValueError(f"baseline must have shape [N] = ({N},), got {tuple(baseline.shape)}")
        check.same_device("baseline", baseline, "rewards", rewards)
    elif baseline is not None:
        raise ValueError(f"baseline is only used by estimator='remax', got estimator={est!r}")

    if est == "grpo_passk" and check.has_data(rewards) and bool(torch.isnan(rewards).any()):
        # a group's first best row is undefined: the kernel gave 0 to every row, the reference crashed
        raise ValueError("rewards must not hold NaN for estimator='grpo_passk' (a group's best row is undefined)")

    needs_groups = est not in ("remax", "reinforce++")
    params = GroupAdvantageParams(
        estimator=est, scale=scale, eps=eps, combine=combine, weights=weights_t, ideal=ideal_t,
        var_coef=var_coef, gamma=gamma, singleton=singleton,
    )
    size = _layout(N, group_ids, group_size, rewards, required=needs_groups)
    if needs_groups:
        name = dispatch.select("group_advantages", SEGMENT_BACKENDS, rewards.device, rewards.dtype, backend)
        if name == "cpu" and _fused_declines(params, mask) is None:
            return _fused_group_advantages(rewards, group_ids, size, mask, params)
    index, num_groups = _dense_groups(N, group_ids, size, rewards)
    if est == "grpo_passk" and N:
        counts = torch.bincount(index, minlength=num_groups)
        if int(counts.min()) < 2:
            raise ValueError("estimator='grpo_passk' needs at least 2 rows in every group (verl raises too)")

    stats = _segment_stats("group_advantages", rewards, backend, index, group_size)
    dtype = ref.accumulation_dtype(rewards.dtype)

    def as_tensor(values):
        return None if values is None else torch.tensor(values, dtype=dtype, device=rewards.device)

    with torch.no_grad():
        return ref.group_advantages(
            rewards, index, num_groups,
            estimator=params.estimator, scale=params.scale, eps=params.eps,
            weights=as_tensor(params.weights), combine=params.combine, ideal=as_tensor(params.ideal),
            var_coef=params.var_coef, mask=mask, baseline=baseline, gamma=params.gamma, singleton=params.singleton,
            stats=stats,
        )


def _fused_declines(params: GroupAdvantageParams, mask) -> str | None:
    """Why the one-call CPU kernel (``fusedrl::group_advantages``) does not run this configuration
    (then the segment-statistics kernel and the reference's composition do), or None."""
    from fusedrl.ops import segments as seg_ops  # noqa: PLC0415

    if params.estimator not in seg_ops.ESTIMATOR_CODES:
        return f"estimator={params.estimator!r} has no groups"
    if mask is not None and (params.estimator == "reinforce++-baseline" or params.combine == "normalize_then_sum"):
        return "whitening over the valid tokens of a mask"
    return None


def _fused_group_advantages(rewards, group_ids, size: int, mask, params: GroupAdvantageParams) -> torch.Tensor:
    """group_advantages in one kernel call (``size`` from :func:`_layout`): raw ids are keyed by the
    kernel (no sort), the statistics, estimator, combine and batch finish are fused; the result is
    broadcast over the mask's tokens as the reference does."""
    from fusedrl.ops import segments as seg_ops  # noqa: PLC0415

    N = rewards.shape[0]
    if params.estimator == "grpo_passk" and size == 1 and N:
        raise ValueError("estimator='grpo_passk' needs at least 2 rows in every group (verl raises too)")
    dtype = ref.accumulation_dtype(rewards.dtype)
    valid = None if mask is None else mask != 0
    lengths = valid.sum(-1).to(dtype) if params.estimator == "opo" else None
    K = rewards.shape[1] if rewards.dim() == 2 else 1
    weights = list(params.weights) if params.weights is not None else ([1.0] * K if params.combine else [])
    finish = {"reinforce++-baseline": "whiten"}.get(params.estimator)
    if params.combine == "normalize_then_sum":
        finish = "batch_normalize"
    # no torch.no_grad() needed: the kernel's output is a fresh tensor outside autograd
    adv = seg_ops.GROUP_ADVANTAGES(
        "cpu", rewards, group_ids, size, lengths, params.estimator, params.scale, params.eps, params.singleton,
        params.combine, finish, weights, list(params.ideal or ()), params.var_coef,
    )
    return adv if valid is None else torch.where(valid, adv.unsqueeze(-1), 0.0)


# ----------------------------------------------------------------------------------------------
# phase and segment advantages
# ----------------------------------------------------------------------------------------------


def _sequence_options(estimator, scale, eps, singleton):
    est = _estimator("estimator", estimator, SEQUENCE_ESTIMATORS)
    scale = _choice("scale", scale, SCALES)
    if scale == "batch" and est != "grpo":
        raise ValueError(f"scale='batch' divides by a std, which estimator={est!r} does not; use 'group' or 'none'")
    return est, scale, check.positive_float("eps", eps), _choice("singleton", singleton, SINGLETONS)


def _token_ids(name: str, ids, rows: int, like: torch.Tensor, mask, low: int, high: int) -> torch.Tensor:
    """Integer token ids ``[N, T]``, each valid token's id in ``[low, high)``."""
    check.tensor(name, ids, check.INDEX_DTYPES)
    if ids.dim() != 2 or ids.shape[0] != rows:
        raise ValueError(f"{name} must have shape [N, T] with N = {rows}, got {tuple(ids.shape)}")
    check.same_device(name, ids, "rewards", like)
    if mask is not None:
        _mask("mask", mask, rows, name, ids, shape=ids.shape)
        valid = mask != 0
    else:
        valid = torch.ones_like(ids, dtype=torch.bool)
    bad = valid & ((ids < low) | (ids >= high))
    if check.has_data(ids) and bool(bad.any()):
        raise ValueError(f"{name} must be in [{low}, {high}) at every valid token, got {int(ids[bad][0])}")
    return ids


def phase_advantages(
    rewards: torch.Tensor,
    phase_ids: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    mask: torch.Tensor | None = None,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "verl",
    backend: str | None = None,
) -> torch.Tensor:
    r"""Phase-factorized advantages (seed F-GRPO): one reward per phase, each phase normalized on
    its own, each token taking its phase's advantage.

    .. math::
        A^{(p)}_i = \mathrm{estimator}(R_{\cdot p})_i \ \ \text{(over the group of row i)},\qquad
        A_{it} = A^{(\mathrm{phase}_{it})}_i

    Args:
        rewards: ``[N, P]`` floating point, the reward of each of the P phases of each completion.
        phase_ids: ``[N, T]`` int64 / int32, the phase of each token, in ``[0, P)`` at valid tokens
            (anything at masked tokens).
        group_ids / group_size: the group layout, as :func:`group_advantages`.
        mask: ``[N, T]`` response mask (nonzero = valid); masked tokens get 0. Default: all valid.
        estimator: ``"grpo"`` or ``"rloo"``; scale, eps, singleton: as :func:`group_advantages`.

    Returns:
        ``[N, T]`` float32 (float64 for float64 rewards).
    """
    check.tensor("rewards", rewards, check.FLOAT_DTYPES)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [N, P] (one column per phase), got {tuple(rewards.shape)}")
    N, P = rewards.shape
    if P < 1:
        raise ValueError("rewards must have at least one phase column, got P = 0")
    _token_ids("phase_ids", phase_ids, N, rewards, mask, 0, P)
    est, scale, eps, singleton = _sequence_options(estimator, scale, eps, singleton)
    index, num_groups = _groups(N, group_ids, group_size, rewards)
    params = PhaseAdvantageParams(estimator=est, scale=scale, eps=eps, singleton=singleton)
    stats = _segment_stats("phase_advantages", rewards, backend, index, group_size)
    with torch.no_grad():
        return ref.phase_advantages(
            rewards, phase_ids, index, num_groups, mask=mask,
            estimator=params.estimator, scale=params.scale, eps=params.eps, singleton=params.singleton, stats=stats,
        )


def segment_advantages(
    trajectory_rewards: torch.Tensor,
    segment_rewards: torch.Tensor,
    segment_ids: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    mask: torch.Tensor | None = None,
    lam: float = 1.0,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "verl",
    backend: str | None = None,
) -> torch.Tensor:
    r"""Dual-level (trajectory + segment) advantages (seed MatchTIR; our reading).

    Completion i has a trajectory reward and up to S segment rewards (e.g. one per tool call);
    token t belongs to segment ``segment_ids[i, t]`` (or -1: to no segment). Segment (i, s) exists
    when at least one valid token of row i has id s; the existing segments of all rows of a group
    form that group's segment sample, normalized by the estimator:

    .. math::
        A_{it} = A^{traj}_i + \lambda\, A^{seg}_{i, s_{it}}
        \quad(\text{just } A^{traj}_i \text{ when } s_{it} = -1)

    with :math:`A^{traj}` the estimator over the trajectory rewards of the group and
    :math:`A^{seg}` the estimator over the group's segment rewards (grpo: :math:`(r_{is} -
    \bar r_g)/(s_g + \epsilon)` with mean and std over every segment of group g).

    Args:
        trajectory_rewards: ``[N]`` floating point.
        segment_rewards: ``[N, S]`` floating point; entries of segments that do not exist are ignored.
        segment_ids: ``[N, T]`` int64 / int32 in ``[-1, S)`` at valid tokens.
        group_ids / group_size: the group layout, as :func:`group_advantages`.
        mask: ``[N, T]`` response mask (nonzero = valid); masked tokens get 0. Default: all valid.
        lam: weight of the segment advantage (finite).
        estimator: ``"grpo"`` or ``"rloo"`` (both levels); scale, eps, singleton: as
            :func:`group_advantages` (a group with a single segment in all is a singleton).

    Returns:
        ``[N, T]`` float32 (float64 for float64 trajectory rewards).
    """
    check.tensor("trajectory_rewards", trajectory_rewards, check.FLOAT_DTYPES)
    if trajectory_rewards.dim() != 1:
        raise ValueError(f"trajectory_rewards must have shape [N], got {tuple(trajectory_rewards.shape)}")
    N = trajectory_rewards.shape[0]
    check.tensor("segment_rewards", segment_rewards, check.FLOAT_DTYPES)
    if segment_rewards.dim() != 2 or segment_rewards.shape[0] != N:
        raise ValueError(f"segment_rewards must have shape [N, S] with N = {N}, got {tuple(segment_rewards.shape)}")
    check.same_device("segment_rewards", segment_rewards, "trajectory_rewards", trajectory_rewards)
    _token_ids("segment_ids", segment_ids, N, trajectory_rewards, mask, -1, segment_rewards.shape[1])
    est, scale, eps, singleton = _sequence_options(estimator, scale, eps, singleton)
    lam = _real("lam", lam)
    index, num_groups = _groups(N, group_ids, group_size, trajectory_rewards)
    params = SegmentAdvantageParams(estimator=est, scale=scale, eps=eps, singleton=singleton, lam=lam)
    stats = _segment_stats("segment_advantages", trajectory_rewards, backend, index, group_size)
    with torch.no_grad():
        return ref.segment_advantages(
            trajectory_rewards, segment_rewards, segment_ids, index, num_groups, mask=mask, lam=params.lam,
            estimator=params.estimator, scale=params.scale, eps=params.eps, singleton=params.singleton,
            stats=stats,
        )


# ----------------------------------------------------------------------------------------------
# scans: GAE and discounted returns
# ----------------------------------------------------------------------------------------------


def _token_tensor(name: str, value, like_name: str | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
    check.tensor(name, value, check.FLOAT_DTYPES)
    if like is None:
        if value.dim() != 2:
            raise ValueError(f"{name} must have shape [B, T], got {tuple(value.shape)}")
    else:
        if value.shape != like.shape:
            raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(value.shape)}")
        check.same_device(name, value, like_name, like)
    return value


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    bootstrap: torch.Tensor | None = None,
    whiten: bool = False,
    backend: str | None = None,
):
    r"""Generalized advantage estimation over the valid tokens (verl ``compute_gae_advantage_return``).

    .. math::
        \delta_t = r_t + \gamma V_{t'} - V_t,\qquad A_t = \delta_t + \gamma\lambda A_{t'},\qquad
        \mathrm{returns}_t = A_t + V_t

    where t' is the next *valid* token after t (masked tokens, e.g. tool observations inside a
    multi-turn response, are skipped without discounting and their rewards and values are unused,
    as verl), and :math:`V_{t'} = b_i` past the row's last valid token: ``bootstrap[i]`` for a
    truncated response (seed T-PPO: the value of the state the truncated response stopped in), 0
    by default. ``whiten=True`` replaces the advantages by verl's ``masked_whiten``:
    :math:`(A - \bar A)/\sqrt{s^2 + 10^{-8}}`, mean and unbiased variance over all valid tokens of
    the batch (verl always whitens; fusedrl defaults to off). The returns are never whitened.

    Args:
        rewards: ``[B, T]`` floating point token rewards (the outcome reward on the last token).
        values: ``[B, T]`` floating point value estimates.
        mask: ``[B, T]`` response mask (nonzero = valid).
        gamma, lam: in [0, 1].
        bootstrap: ``[B]`` floating point or None.
        whiten: whiten the advantages over the valid tokens.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (see :mod:`fusedrl.dispatch`);
            default: the first that runs here (C++ CPU kernel for CPU tensors).

    Returns:
        ``(advantages, returns)``, each ``[B, T]`` with 0 at masked tokens; float32 (float64 for
        float64 rewards). verl leaves carried values at masked tokens, which no loss reads.
    """
    _token_tensor("rewards", rewards)
    _token_tensor("values", values, "rewards", rewards)
    _mask("mask", mask, rewards.shape[0], "rewards", rewards, shape=rewards.shape)
    if bootstrap is not None:
        check.tensor("bootstrap", bootstrap, check.FLOAT_DTYPES)
        if tuple(bootstrap.shape) != (rewards.shape[0],):
            raise ValueError(f"bootstrap must have shape [B] = ({rewards.shape[0]},), got {tuple(bootstrap.shape)}")
        check.same_device("bootstrap", bootstrap, "rewards", rewards)
    params = GAEParams(
        gamma=_real("gamma", gamma, 0.0, 1.0), lam=_real("lam", lam, 0.0, 1.0), whiten=check.boolean("whiten", whiten)
    )
    name = dispatch.select("gae", SCAN_BACKENDS, rewards.device, rewards.dtype, backend)
    with torch.no_grad():
        if name != "torch":
            from fusedrl.ops import scan  # noqa: PLC0415

            return scan.GAE(name, rewards, values, mask, bootstrap, params.gamma, params.lam, params.whiten)
        return ref.gae(
            rewards, values, mask, gamma=params.gamma, lam=params.lam, bootstrap=bootstrap,
            whiten_advantages=params.whiten,
        )


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Discounted returns along the valid tokens (reinforce++ token returns).

    .. math:: G_t = r_t + \gamma\, G_{t'}

    t' the next valid token after t (masked tokens are skipped without discounting; their rewards
    are unused), :math:`G = 0` past the last valid token and at masked tokens. Equal to the
    ``returns`` of verl ``compute_reinforce_plus_plus_outcome_advantage``; its advantages are
    ``gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, whiten=True)[0]`` (GAE with
    V = 0 and lambda = 1 is the discounted return), or, for an outcome reward per row,
    ``group_advantages(R, estimator="reinforce++", mask=mask, gamma=gamma)``.

    Args:
        rewards: ``[B, T]`` floating point token rewards.
        mask: ``[B, T]`` response mask (nonzero = valid).
        gamma: in [0, 1].
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``, as :func:`gae`.

    Returns:
        ``[B, T]`` float32 (float64 for float64 rewards).
    """
    _token_tensor("rewards", rewards)
    _mask("mask", mask, rewards.shape[0], "rewards", rewards, shape=rewards.shape)
    params = DiscountParams(gamma=_real("gamma", gamma, 0.0, 1.0))
    name = dispatch.select("discounted_returns", SCAN_BACKENDS, rewards.device, rewards.dtype, backend)
    with torch.no_grad():
        if name != "torch":
            from fusedrl.ops import scan  # noqa: PLC0415

            return scan.DISCOUNTED_RETURNS(name, rewards, mask, params.gamma)
        return ref.discounted_returns(rewards, mask, gamma=params.gamma)
