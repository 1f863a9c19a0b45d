r"""Policy-gradient objectives: KL estimators, loss aggregation and the policy loss.

Each public function validates its arguments (TypeError / ValueError naming the argument), freezes
its options into a params dataclass, picks a backend (:mod:`fusedrl.dispatch`) and calls it.
:func:`policy_loss` runs on the ``cpu``, ``cuda`` and ``triton`` kernels (:mod:`fusedrl.ops.policy`),
which compute the ratio, surrogate, rollout correction, KL, entropy bonus and aggregation of every
token in one pass; the standalone :func:`kl_penalty` and :func:`aggregate` run on the ``torch``
reference only (they are one elementwise op or one reduction). The math lives in
:mod:`fusedrl.reference.kl`, :mod:`fusedrl.reference.aggregate` and :mod:`fusedrl.reference.policy`.
Presets that translate TRL and verl settings into :func:`policy_loss` keywords are in
:mod:`fusedrl.presets`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from fusedrl import _validate as check
from fusedrl import dispatch
from fusedrl.reference import aggregate as _ref_aggregate
from fusedrl.reference import kl as _ref_kl
from fusedrl.reference import policy as _ref_policy
from fusedrl.ops import policy as _ops_policy

__all__ = ["kl_penalty", "aggregate", "policy_loss", "PolicyParams", "AggregateParams", "KLParams"]

KL_KINDS = _ref_kl.KINDS
AGGREGATIONS = _ref_aggregate.MODES
SURROGATES = _ref_policy.SURROGATES
RATIOS = _ref_policy.RATIOS
ROLLOUT_CORRECTIONS = _ref_policy.ROLLOUT_CORRECTIONS
POLICY_BACKENDS = ("cpu", "cuda", "triton", "torch")  # the backends with a policy_loss kernel
MASK_DTYPES = check.MASK_DTYPES


# ---------------------------------------------------------------------------------------------
# params


@dataclass(frozen=True)
class KLParams:
    """Options of :func:`kl_penalty`. kind: one of ``KL_KINDS``."""

    kind: str = "k3"


@dataclass(frozen=True)
class AggregateParams:
    """Options of :func:`aggregate`.

    mode: one of ``AGGREGATIONS``.
    exclude_empty_rows: seq-mean modes count only rows with a valid token by default (verl's rule)
        instead of every row (TRL's).
    """

    mode: str = "token-mean"
    exclude_empty_rows: bool = False


@dataclass(frozen=True)
class PolicyParams:
    """Every non-tensor option of :func:`policy_loss` (see its docstring), resolved:
    ``clip_high`` is never None here (None at the call means ``clip_low``)."""

    surrogate: str = "clip"
    ratio: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = None
    delta: float | None = None
    beta: float = 0.0
    kl: str = "k3"
    use_bias_correction_kl: bool = False
    rollout_correction: str | None = None
    rollout_cap: float | None = 3.0
    rollout_cap_low: float | None = None
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    kl_aggregation: str | None = None
    entropy_aggregation: str | None = None
    exclude_empty_rows: bool = False
    cispo_bounds: str = "upper"
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    hybrid_mixing: str = "average"
    hybrid_alpha: float = 0.5
    seq_clip_low: float | None = None
    seq_clip_high: float | None = None
    log_ratio_clamp: float | None = 20.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None


# ---------------------------------------------------------------------------------------------
# argument checks


def _choice(name, value, options):
    if not any(value is o or (isinstance(value, str) and value == o) for o in options):
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def _real(name, value, *, minimum=None, exclusive=False, maximum=None, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{' or None' if optional else ''}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _count(name, value, *, positive=False):
    """A normalizer: None, a finite real (>= 0, or > 0) or a one-element tensor (not read here, so
    no device synchronization)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.is_complex():
            raise TypeError(f"{name} must be real, got {value.dtype}")
        return value.reshape(())
    return _real(name, value, minimum=0.0, exclusive=positive)


def _float_tensor(name, value, shape=None, ref_name="logp", ref=None, optional=False):
    if value is None and optional:
        return None
    check.tensor(name, value, check.FLOAT_DTYPES, "a floating-point tensor (float32, bfloat16, float16 or float64)")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} like {ref_name}, got {tuple(value.shape)}")
    if ref is not None:
        check.same_device(name, value, ref_name, ref)
    return value


def _batch(values_name, values, mask):
    _float_tensor(values_name, values)
    if values.dim() != 2:
        raise ValueError(f"{values_name} must have shape [B, T] (padded layout), got {tuple(values.shape)}")
    check.mask_tensor("mask", mask)
    if mask.shape != values.shape:
        raise ValueError(f"mask must have shape {tuple(values.shape)} like {values_name}, got {tuple(mask.shape)}")
    check.same_device("mask", mask, values_name, values)


def _advantages(advantages, logp, required=True):
    if advantages is None:
        if required:
            raise TypeError("advantages are required by mode='balanced' (the sign of each sequence), got None")
        return None
    _float_tensor("advantages", advantages)
    B, T = logp.shape
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape [B] = ({B},) or [B, T] = ({B}, {T}), got {tuple(advantages.shape)}")
    check.same_device("advantages", advantages, "logp", logp)
    return advantages


def _group_ids(group_ids, values):
    if group_ids is None:
        return None
    check.tensor("group_ids", group_ids, check.INDEX_DTYPES)
    if tuple(group_ids.shape) != (values.shape[0],):
        raise ValueError(f"group_ids must have shape [B] = ({values.shape[0]},), got {tuple(group_ids.shape)}")
    check.same_device("group_ids", group_ids, "values", values)
    return group_ids


# ---------------------------------------------------------------------------------------------
# public functions


_PARAMS_CACHE: dict = {}  # validated PolicyParams by their raw options (trainers pass the same every step)


def _policy_params(**raw) -> PolicyParams:
    """The options of :func:`policy_loss` validated into a :class:`PolicyParams`, memoized on the
    options and their types (an unhashable option skips the memo; the validation names it)."""
    key = tuple((k, type(v), v) for k, v in raw.items())
    try:
        return _PARAMS_CACHE[key]
    except (KeyError, TypeError):
        pass
    params = _validate_params(**raw)  # raises on any bad option, before anything is stored
    if len(_PARAMS_CACHE) >= 256:
        _PARAMS_CACHE.clear()
    try:
        _PARAMS_CACHE[key] = params
    except TypeError:  # an unhashable value that still validated
        pass
    return params


def _validate_params(*, surrogate, ratio, clip_low, clip_high, clip_ratio_c, delta, beta, kl, use_bias_correction_kl,
                     rollout_correction, rollout_cap, rollout_cap_low, entropy_coef, aggregation, kl_aggregation,
                     entropy_aggregation, exclude_empty_rows, cispo_bounds, tau_pos, tau_neg, hybrid_mixing,
                     hybrid_alpha, seq_clip_low, seq_clip_high, log_ratio_clamp, vespo_k_pos, vespo_lambda_pos,
                     vespo_k_neg, vespo_lambda_neg, off_policy_mask_threshold) -> PolicyParams:
    return PolicyParams(
        surrogate=_choice("surrogate", surrogate, SURROGATES),
        ratio=_choice("ratio", ratio, RATIOS),
        clip_low=_real("clip_low", clip_low, minimum=0.0),
        clip_high=_real("clip_high", clip_low if clip_high is None else clip_high, minimum=-1.0, exclusive=True),
        clip_ratio_c=_real("clip_ratio_c", clip_ratio_c, minimum=1.0, exclusive=True, optional=True),
        delta=_real("delta", delta, minimum=0.0, exclusive=True, optional=True),
        beta=_real("beta", beta),
        kl=_choice("kl", kl, KL_KINDS),
        use_bias_correction_kl=check.boolean("use_bias_correction_kl", use_bias_correction_kl),
        rollout_correction=_choice("rollout_correction", rollout_correction, (None,) + ROLLOUT_CORRECTIONS),
        rollout_cap=_real("rollout_cap", rollout_cap, minimum=0.0, exclusive=True, optional=True),
        rollout_cap_low=_real("rollout_cap_low", rollout_cap_low, minimum=0.0, optional=True),
        entropy_coef=_real("entropy_coef", entropy_coef),
        aggregation=_choice("aggregation", aggregation, AGGREGATIONS),
        kl_aggregation=_choice("kl_aggregation", kl_aggregation, (None,) + AGGREGATIONS),
        entropy_aggregation=_choice("entropy_aggregation", entropy_aggregation, (None,) + AGGREGATIONS),
        exclude_empty_rows=check.boolean("exclude_empty_rows", exclude_empty_rows),
        cispo_bounds=_choice("cispo_bounds", cispo_bounds, _ref_policy.CISPO_BOUNDS),
        tau_pos=_real("tau_pos", tau_pos, minimum=0.0, exclusive=True),
        tau_neg=_real("tau_neg", tau_neg, minimum=0.0, exclusive=True),
        hybrid_mixing=_choice("hybrid_mixing", hybrid_mixing, _ref_policy.HYBRID_MIXINGS),
        hybrid_alpha=_real("hybrid_alpha", hybrid_alpha, minimum=0.0, maximum=1.0),
        seq_clip_low=_real("seq_clip_low", seq_clip_low, minimum=0.0, optional=True),
        seq_clip_high=_real("seq_clip_high", seq_clip_high, minimum=-1.0, exclusive=True, optional=True),
        log_ratio_clamp=_real("log_ratio_clamp", log_ratio_clamp, minimum=0.0, exclusive=True, optional=True),
        vespo_k_pos=_real("vespo_k_pos", vespo_k_pos),
        vespo_lambda_pos=_real("vespo_lambda_pos", vespo_lambda_pos),
        vespo_k_neg=_real("vespo_k_neg", vespo_k_neg),
        vespo_lambda_neg=_real("vespo_lambda_neg", vespo_lambda_neg),
        off_policy_mask_threshold=_real("off_policy_mask_threshold", off_policy_mask_threshold, optional=True),
    )


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3", *, backend: str | None = None):
    r"""Per-token KL estimate between the policy and a reference policy.

    With :math:`x` = ``logp``, :math:`r` = ``ref_logp`` and :math:`d = r - x` (Schulman's
    estimators; docs/OBJECTIVES.md):

    - ``"k1"``: :math:`x - r`; ``"abs"``: :math:`|x - r|`; ``"k2"``: :math:`\tfrac12 (x - r)^2`;
    - ``"k3"``: :math:`e^{d} - d - 1`, unclamped, as TRL's GRPO (overflows to inf for
      :math:`d \gtrsim 88` in float32);
    - ``"low_var_kl"``: verl's clamped k3 (:math:`d` clamped to [-20, 20], the value to [-10, 10]);
      verl's own names ``"k3"`` and ``"low_var_kl"`` both mean this one
      (:func:`fusedrl.presets.verl_kl` translates verl's names);
    - ``"<kind>+"`` (``k1+``, ``abs+``, ``k2+``, ``k3+``, ``low_var_kl+``): verl's straight-through
      estimator, the value of ``<kind>`` with the gradient of k2:
      :math:`k_2 - \mathrm{sg}(k_2) + \mathrm{sg}(k)`.

    Args:
        logp, ref_logp: float tensors of the same shape (any shape, any float dtype).
        kind: the estimator.
        backend: accepted for symmetry with the fused functions (see :mod:`fusedrl.dispatch`); only
            the ``torch`` reference implements this op, so any other choice warns and falls
            through to it. :func:`policy_loss` computes the same estimators inside its kernels.

    Returns:
        The per-token estimate, float32 (float64 for float64 input), differentiable w.r.t. both.
    """
    _float_tensor("logp", logp)
    _float_tensor("ref_logp", ref_logp, logp.shape, ref=logp)
    params = KLParams(kind=_choice("kind", kind, KL_KINDS))
    dispatch.select("kl_penalty", ("torch",), logp.device, logp.dtype, backend)
    return _ref_kl.kl_penalty(logp, ref_logp, params.kind)


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
    backend: str | None = None,
):
    r"""Aggregate per-token values [B, T] under a mask into a scalar loss.

    With :math:`m` the mask (bool/int, or float per-token weights) and :math:`|y_i| = \sum_t m_{it}`:

    - ``"token-mean"``: :math:`\sum m l / N`, :math:`N` = ``num_tokens`` or :math:`\sum m`
      (verl; TRL ``bnpo``, and ``dapo``/``cispo`` with ``num_tokens`` = TRL's ``num_items_in_batch``
      rescaled, see :func:`policy_loss`);
    - ``"token-sum"``: :math:`\sum m l`;
    - ``"seq-mean-token-mean"``: :math:`\frac1S \sum_i \sum_t m l / |y_i|` (TRL ``grpo``);
    - ``"seq-mean-token-sum"``: :math:`\frac1S \sum_i \sum_t m l` (TRL ``luspo``);
    - ``"seq-mean-token-sum-norm"``: :math:`\sum m l / (S L)`, :math:`L` = ``max_length`` or T
      (Dr. GRPO; TRL ``dr_grpo`` with ``max_length=max_completion_length``; verl
      ``loss_scale_factor``);
    - ``"balanced"`` (seed "Balanced Aggregation"; our reading): per group (``group_ids``, else
      the whole batch), :math:`L_g = \frac{n_+}{n} \bar l_+ + \frac{n_-}{n} \bar l_-` with
      :math:`n_\pm` the sequences of positive / negative ``advantages`` and :math:`\bar l_\pm` the
      token means over them (an empty side gives 0); the loss is :math:`\frac1G \sum_g L_g`,
      :math:`G` = ``num_groups`` or the number of groups with a signed sequence.

    :math:`S` = ``num_sequences``, else B (every row, TRL), else with ``exclude_empty_rows`` the rows
    holding a valid token (verl). A zero count divides as 1: a fully masked batch gives exactly 0
    and zero gradients.

    Invariance law: pass the global counts (``num_tokens``, ``num_sequences``, ``max_length``;
    ``num_groups`` for balanced, with each group kept whole) and the losses of the micro-batches and
    data-parallel ranks sum to the full-batch loss, their gradients to its gradient. verl's
    ``agg_loss(..., dp_size=D, batch_num_tokens=N, global_batch_size=S, loss_scale_factor=L)`` is
    ``D *`` this with ``num_tokens=N, num_sequences=S, max_length=L, exclude_empty_rows=True``.

    Args:
        values: float [B, T].
        mask: bool, integer or float [B, T].
        mode: one of the modes above.
        num_tokens, num_sequences, max_length, num_groups: global counts (numbers or one-element
            tensors); None means the local count.
        advantages: [B] or [B, T]; required by ``"balanced"`` (their signs).
        group_ids: int [B], any integer ids; used by ``"balanced"``.
        exclude_empty_rows: verl's rule for the default S of the seq-mean modes.
        backend: see :mod:`fusedrl.dispatch`; only the ``torch`` reference implements this op
            (:func:`policy_loss` aggregates inside its kernels).

    Returns:
        A 0-dim float32 tensor (float64 for float64 values).
    """
    _batch("values", values, mask)
    params = AggregateParams(
        mode=_choice("mode", mode, AGGREGATIONS), exclude_empty_rows=check.boolean("exclude_empty_rows", exclude_empty_rows)
    )
    advantages = _advantages(advantages, values, required=params.mode == "balanced")
    group_ids = _group_ids(group_ids, values)
    counts = dict(
        num_tokens=_count("num_tokens", num_tokens),
        num_sequences=_count("num_sequences", num_sequences),
        max_length=_count("max_length", max_length, positive=True),
        num_groups=_count("num_groups", num_groups),
    )
    dispatch.select("aggregate", ("torch",), values.device, values.dtype, backend)
    return _ref_aggregate.aggregate(
        values, mask, params.mode, advantages=advantages, group_ids=group_ids,
        exclude_empty_rows=params.exclude_empty_rows, **counts,
    )


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    surrogate: str = "clip",
    ratio: str = "token",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    clip_ratio_c: float | None = None,
    delta: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    use_bias_correction_kl: bool = False,
    rollout_logp: torch.Tensor | None = None,
    rollout_correction: str | None = None,
    rollout_cap: float | None = 3.0,
    rollout_cap_low: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
    num_tokens=None,
    num_sequences=None,
    max_length=None,
    group_ids: torch.Tensor | None = None,
    num_groups=None,
    exclude_empty_rows: bool = False,
    kl_aggregation: str | None = None,
    entropy_aggregation: str | None = None,
    cispo_bounds: str = "upper",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    hybrid_mixing: str = "average",
    hybrid_alpha: float = 0.5,
    seq_clip_low: float | None = None,
    seq_clip_high: float | None = None,
    log_ratio_clamp: float | None = 20.0,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    top_entropy_quantile: float = 1.0,
    entropy_mask_threshold=None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
):
    r"""Policy-gradient loss (PPO, GRPO, DAPO, Dr. GRPO, GSPO, CISPO, SAPO, GMPO, GPG, CTPO, DHPO, ...)
    of token log-probs, padded [B, T] or packed [1, N] with ``cu_seqlens``. Returns ``(loss, metrics)``.

    Notation: :math:`x` = ``logp`` (the only input with a gradient), :math:`o` = ``old_logp``,
    :math:`r` = ``ref_logp``, :math:`\mu` = ``rollout_logp``, :math:`\rho = x - o`, :math:`A` =
    ``advantages``, :math:`m` = ``mask``, :math:`|y_i| = \sum_t m_{it}`, sg = stop-gradient.
    ``old_logp``, ``ref_logp``, ``rollout_logp`` and ``advantages`` are treated as constants
    (detached); ``old_logp=None`` means ``logp.detach()`` (on-policy, as TRL). ``entropy`` keeps its
    gradient (the entropy bonus needs it). Each token's loss is, in TRL's order:

    1. **Ratio** ``ratio`` (log-weights clamped to :math:`\pm` ``log_ratio_clamp`` before every exp;
       verl/OpenRLHF clamp to 20; None disables):

       - ``"token"``: :math:`w_{it} = e^{\rho_{it}}`;
       - ``"sequence"`` (GSPO; TRL ``importance_sampling_level="sequence"``):
         :math:`s_i = \exp(\sum_t m\rho / \max(|y_i|, 1))` for every token of row i;
       - ``"sequence-token"`` (GSPO-token, verl ``gspo``):
         :math:`\log w_{it} = \min(\mathrm{sg}(\log s_i) + x_{it} - \mathrm{sg}(x_{it}), 10)`;
       - ``"cumulative"`` (CTPO; our reading): :math:`w_{it} = e^{c_{it}}`,
         :math:`c_{it} = \sum_{t' \le t} m \rho_{it'}`, its trust region the position-adaptive clip
         of :math:`c_{it}` to :math:`[\sqrt{n_{it}} \log(1 - \epsilon_{low}),
         \sqrt{n_{it}} \log(1 + \epsilon_{high})]`, :math:`n_{it} = \sum_{t' \le t} m`;
       - ``"hybrid"`` (DHPO; our reading): :math:`w = a w_{token} + (1 - a) s_i`, its trust region
         :math:`a\,\mathrm{clip}(w_{token}, 1 \mp \epsilon) + (1 - a)\,\mathrm{clip}(s_i, 1 \mp
         \epsilon_{seq})` (``seq_clip_low`` / ``seq_clip_high``, default ``clip_low`` /
         ``clip_high``); ``hybrid_mixing="average"``: :math:`a` = ``hybrid_alpha`` (0.5);
         ``"entropy"``: :math:`a_{it} = H_{it} / \max_{t'} H_{it'}` from ``entropy`` (no gradient).

       Elsewhere the trust region is :math:`\mathrm{clip}(w, 1 - \epsilon_{low}, 1 + \epsilon_{high})`
       with :math:`\epsilon_{low}` = ``clip_low``, :math:`\epsilon_{high}` = ``clip_high`` (None:
       ``clip_low``).
    2. **Surrogate** ``surrogate``:

       - ``"clip"``: :math:`-\min(\tilde w A, \mathrm{clip}(w) A)`, :math:`\tilde w = \min(w, \delta)`
         when ``delta`` is set (TRL's two-sided clip); dual clip (verl ``vanilla``) with
         ``clip_ratio_c`` = c > 1: :math:`\min(\cdot, -A c)` where :math:`A < 0`;
       - ``"cispo"``: :math:`-\mathrm{sg}(\mathrm{clip}(w)) A x`; ``cispo_bounds="upper"`` (TRL):
         :math:`\min(w, 1 + \epsilon_{high})`; ``"both"`` (verl): the two-sided clip;
       - ``"sapo"`` (TRL, verl): :math:`-\frac{4}{\tau}\sigma(\tau (w - 1)) A`, :math:`\tau` =
         ``tau_pos`` if :math:`A > 0` else ``tau_neg``;
       - ``"geo_mean"`` (GMPO, verl ``geo_mean``; ``ratio="token"`` only): every token of row i
         carries :math:`-\bar A_i \exp(\mathrm{mean}_t \tilde\rho)`, :math:`\tilde\rho =
         \mathrm{sgn}(A)\min(\mathrm{sgn}(A)\rho, \mathrm{sgn}(A)\mathrm{clip}(\rho, -\epsilon_{low},
         \epsilon_{high}))`, :math:`\bar A_i` the row mean of A; with
         ``aggregation="seq-mean-token-mean"`` it is verl's mean over rows;
       - ``"reinforce"``: :math:`-w A`; ``"gpg"`` (verl ``gpg``): :math:`-A x`;
       - ``"vespo"`` (TRL ``loss_type="vespo"``; ``ratio="token"``, no ``rollout_correction``):
         :math:`-\mathrm{sg}(\phi_{it}) A x` with the gamma weight :math:`\phi = e^{\lambda + k
         \log W_i - \lambda W_i}` of the sequence weight :math:`W_i = \exp(\mathrm{clamp}(\sum_t m
         \,\mathrm{clamp}(\rho, \pm 20), \log 10^{-8}, 20))` (a sum over the row, not a mean);
         :math:`(k, \lambda)` = (``vespo_k_pos``, ``vespo_lambda_pos``) where :math:`A \ge 0`,
         else (``vespo_k_neg``, ``vespo_lambda_neg``), :math:`\lambda \ge 10^{-4}`; a non-finite
         :math:`\phi` is 0 (TRL).

       Then the masks (TRL's order; each multiplies the surrogate only, not the normalizers, the KL
       or the entropy term): ``off_policy_mask_threshold`` = :math:`\delta` (DeepSeek-V3.2, TRL):
       a token is kept where :math:`A \ge 0` or its row's mean :math:`\mathrm{sg}(\mu - x)` (the
       sampler's log-probs ``rollout_logp``, else ``old_logp``) is :math:`\le \delta`;
       ``top_entropy_quantile`` = q < 1 (TRL): only tokens with :math:`H \ge` the (1 - q)-quantile
       of ``entropy`` over the valid tokens of this call are kept (computed here with
       ``torch.quantile``: one device synchronization); ``entropy_mask_threshold`` gives that
       threshold instead (e.g. the quantile over every rank, as TRL gathers it).
    3. **Rollout correction** ``rollout_correction`` (train/inference mismatch; TRL
       ``vllm_importance_sampling_mode``, verl ``rollout_is``), a weight without gradient from
       :math:`q = e^{o - \mu}` per token or :math:`Q_i = e^{\sum_t m (o - \mu)}` per row:
       ``"token_truncate"`` / ``"sequence_truncate"``: clamp(q, ``rollout_cap_low``,
       ``rollout_cap``); ``"token_mask"`` / ``"sequence_mask"``: q where ``rollout_cap_low``
       :math:`\le q \le` ``rollout_cap``, else 0 (TRL keeps the ratio on kept tokens);
       ``"icepop"``: ``token_mask`` with both bounds required (verl ``"lower_upper"``).
       For ``geo_mean`` the weights enter as the row's geometric mean (verl).
    4. **KL**: :math:`+\beta\,\mathrm{KL}` with the estimator ``kl`` (:func:`kl_penalty`; ``"k3"`` is
       TRL's unclamped one, verl's ``"k3"`` is ``"low_var_kl"``), times :math:`w` when
       ``use_bias_correction_kl`` (TRL; its gradient is then :math:`w (x - r)`).
    5. **Entropy**: :math:`-` ``entropy_coef`` :math:`\cdot H`.

    Then :func:`aggregate` by ``aggregation`` with ``num_tokens`` / ``num_sequences`` /
    ``max_length`` / ``group_ids`` / ``num_groups`` / ``exclude_empty_rows``. When
    ``kl_aggregation`` (``entropy_aggregation``) is set, that term is left out of step 4 (5) and
    aggregated on its own by that mode (verl aggregates both with ``loss_agg_mode``; TRL's entropy
    bonus is a token mean whatever the loss type).

    **Scaling: fusedrl losses add up.** With global counts, the losses of the micro-batches and
    data-parallel ranks sum to the full-batch loss (and gradients). DDP averages gradients over the
    D ranks, so TRL and verl multiply by D to undo it; fusedrl's core does not:

    - verl: ``fusedrl = verl(dp_size=D) / D`` with ``num_tokens`` = verl's ``batch_num_tokens``
      (global valid tokens), ``num_sequences`` = ``global_batch_size``, ``max_length`` =
      ``loss_scale_factor``, and ``exclude_empty_rows=True`` (:func:`fusedrl.presets.verl` sets it).
    - TRL (per rank, gradient-accumulation steps G, D processes): ``grpo``/``sapo``/``dr_grpo``/
      ``luspo`` divide the local loss by G: ``num_sequences`` = B G (``dr_grpo`` also
      ``max_length`` = ``max_completion_length``); ``bnpo``: ``num_tokens`` = G times the local
      token count; ``dapo``/``cispo``: TRL divides by ``num_items_in_batch / D * G /
      steps_per_generation``, i.e. ``num_tokens = num_items_in_batch * G / (D *
      steps_per_generation)`` reproduces one rank's TRL loss; when ``steps_per_generation`` = G,
      ``num_items_in_batch`` is the global token count of the optimizer step and
      ``num_tokens=num_items_in_batch`` (the invariant choice) gives TRL's loss divided by D.

    How it runs: on the ``cpu``, ``cuda`` and ``triton`` backends one fused kernel computes the
    ratio, surrogate, rollout weight, KL, entropy bonus and aggregation with at most two passes over
    the tokens (a statistics pass when the ratio level or the aggregation needs per-row sums or
    counts; then one pass writing the loss shares, the metrics and d loss / d logp together, the
    gradient only when ``logp`` requires it), accumulating in float32 (float64 for float64 input).
    The per-row normalizers come from :func:`fusedrl.ops.normalizers.row_coefficients` (tested
    against the reference's aggregation). The kernels run as the torch operators
    ``fusedrl::policy_stats`` and ``fusedrl::policy_objective`` (:mod:`fusedrl.ops.library`), in
    eager mode and under ``torch.compile`` alike (no graph break). The gradient written in the
    forward is handed to autograd without a copy (scaled by the upstream gradient unless that is
    1), so one graph supports one backward (a second raises a RuntimeError). The ``torch`` backend
    runs the reference (:mod:`fusedrl.reference.policy`).

    Layouts: padded [B, T] with ``mask``, or verl's remove-padding layout: ``logp`` and the other
    per-token tensors [1, N] (or [N]), ``cu_seqlens`` int32/int64 [S + 1] (starting at 0,
    non-decreasing, ending at most at N) delimiting S sequences, ``advantages`` [S] or per token;
    tokens outside every segment get no loss and a zero gradient. Both layouts run through the
    same kernel (the reference pads the packed input). ``aggregation="seq-mean-token-sum-norm"``
    needs ``max_length`` in the packed layout.

    Edge cases: padded tokens
    (m = 0) never contribute, whatever their values (inf or NaN included), and get an exact zero
    gradient; a fully masked batch gives exactly 0 with zero gradients; log-ratios of
    :math:`\pm 10^4` give a finite loss and gradient for every surrogate and ratio level (the
    clamp zeroes the gradient through a saturated weight). Float masks are per-token weights
    (counts become sums of weights). A NaN in an operand of a valid token gives a NaN loss, as the
    reference's torch ops do (the kernels' minima and maxima propagate NaN like
    ``torch.minimum`` / ``torch.maximum``), except where the objective itself drops it (vespo's
    weight maps a non-finite value to 0, TRL's ``nan_to_num``; a masking comparison with NaN is
    false, as in torch). The metrics and gradients of a call whose loss is NaN are not specified:
    they may be NaN or finite and differ between backends (a kernel spreads the NaN to every token
    of the rows whose statistics it enters; torch's backward may not).

    Args:
        logp, old_logp: float [B, T], or [1, N] / [N] with ``cu_seqlens`` (``old_logp`` may be None).
        advantages: float [B] (per sequence) or [B, T] (per token).
        mask: bool, int or float [B, T].
        ref_logp, rollout_logp, entropy: float [B, T] or None.
        group_ids: int [B] (``aggregation="balanced"``).
        cu_seqlens: int32/int64 [S + 1] for the packed layout (see Layouts), or None.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (see :mod:`fusedrl.dispatch`);
            None picks the first that accepts the call.
        Other keywords: as described above.

    Returns:
        ``(loss, metrics)``: a 0-dim float32 loss (float64 for float64 ``logp``) and a dict of
        0-dim local token means without gradient: ``clipfrac_low`` (tokens with A < 0 whose
        trust region is active from below), ``clipfrac_high`` (A > 0, from above), ``ratio_mean``,
        ``kl_mean`` (with ``ref_logp``; the estimate after bias correction), ``entropy_mean`` (with
        ``entropy``), ``clipfrac_dual`` (with ``clip_ratio_c``), ``rollout_weight_mean`` (with a
        rollout correction).
    """
    if cu_seqlens is None:
        _batch("logp", logp, mask)
        _advantages(advantages, logp)
        group_ids = _group_ids(group_ids, logp)
    else:
        num_rows = _packed("logp", logp, mask, cu_seqlens)
        _packed_advantages(advantages, logp, num_rows)
        group_ids = _group_ids(group_ids, torch.empty((num_rows, 0), device=logp.device))
    _float_tensor("old_logp", old_logp, logp.shape, ref=logp, optional=True)
    _float_tensor("ref_logp", ref_logp, logp.shape, ref=logp, optional=True)
    _float_tensor("rollout_logp", rollout_logp, logp.shape, ref=logp, optional=True)
    _float_tensor("entropy", entropy, logp.shape, ref=logp, optional=True)

    params = _policy_params(
        surrogate=surrogate, ratio=ratio, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
        delta=delta, beta=beta, kl=kl, use_bias_correction_kl=use_bias_correction_kl,
        rollout_correction=rollout_correction, rollout_cap=rollout_cap, rollout_cap_low=rollout_cap_low,
        entropy_coef=entropy_coef, aggregation=aggregation, kl_aggregation=kl_aggregation,
        entropy_aggregation=entropy_aggregation, exclude_empty_rows=exclude_empty_rows, cispo_bounds=cispo_bounds,
        tau_pos=tau_pos, tau_neg=tau_neg, hybrid_mixing=hybrid_mixing, hybrid_alpha=hybrid_alpha,
        seq_clip_low=seq_clip_low, seq_clip_high=seq_clip_high, log_ratio_clamp=log_ratio_clamp,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, off_policy_mask_threshold=off_policy_mask_threshold,
    )
    _check_policy_combination(params, ref_logp, rollout_logp, entropy)
    entropy_threshold = _entropy_threshold(top_entropy_quantile, entropy_mask_threshold, entropy, mask, cu_seqlens)
    if params.surrogate == "geo_mean" and (entropy_threshold is not None or params.off_policy_mask_threshold is not None):
        raise ValueError("the off-policy and entropy masks (off_policy_mask_threshold, top_entropy_quantile, "
                         "entropy_mask_threshold) act on per-token surrogates; surrogate='geo_mean' gives every token "
                         "its row's value")
    counts = dict(
        num_tokens=_count("num_tokens", num_tokens),
        num_sequences=_count("num_sequences", num_sequences),
        max_length=_count("max_length", max_length, positive=True),
        num_groups=_count("num_groups", num_groups),
    )
    name = dispatch.select("policy_loss", POLICY_BACKENDS, logp.device, logp.dtype, backend)
    if name != "torch":
        return _ops_policy.fused_policy_loss(
            name, logp, old_logp, advantages, mask, ref_logp=ref_logp, rollout_logp=rollout_logp, entropy=entropy,
            cu_seqlens=cu_seqlens, group_ids=group_ids, params=params, entropy_mask_threshold=entropy_threshold,
            **counts,
        )
    if cu_seqlens is not None:  # the reference runs on the padded layout
        if params.aggregation == "seq-mean-token-sum-norm" and counts["max_length"] is None:
            raise ValueError("aggregation='seq-mean-token-sum-norm' needs max_length in the packed layout")
        padded = _packed_to_padded(cu_seqlens, logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy)
        logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy = padded
    return _ref_policy.policy_loss(
        logp, old_logp, advantages, mask, ref_logp=ref_logp, rollout_logp=rollout_logp, entropy=entropy,
        group_ids=group_ids, entropy_mask_threshold=entropy_threshold, **counts, **dataclasses.asdict(params),
    )


def _packed(values_name, values, mask, cu_seqlens) -> int:
    """Checks the packed layout ([1, N] or [N] with cu_seqlens [S + 1]); returns S."""
    _float_tensor(values_name, values)
    if not (values.dim() == 1 or (values.dim() == 2 and values.shape[0] == 1)):
        raise ValueError(f"{values_name} must have shape [1, N] or [N] with cu_seqlens (packed layout), "
                         f"got {tuple(values.shape)}")
    check.mask_tensor("mask", mask)
    if mask.shape != values.shape:
        raise ValueError(f"mask must have shape {tuple(values.shape)} like {values_name}, got {tuple(mask.shape)}")
    check.same_device("mask", mask, values_name, values)
    check.tensor("cu_seqlens", cu_seqlens, (torch.int32, torch.int64), "an int32 or int64 tensor")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape [S + 1] with S >= 0, got {tuple(cu_seqlens.shape)}")
    check.same_device("cu_seqlens", cu_seqlens, values_name, values)
    n = values.shape[-1]
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if check.has_data(cu_seqlens) and (int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > n):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at most at N = {n}, got "
                         f"{cu.tolist() if cu.numel() <= 16 else '...'}")
    return cu.numel() - 1


def _packed_advantages(advantages, logp, num_rows):
    _float_tensor("advantages", advantages)
    if tuple(advantages.shape) not in ((num_rows,), tuple(logp.shape)):
        raise ValueError(f"advantages must have shape [S] = ({num_rows},) or {tuple(logp.shape)} like logp "
                         f"(packed layout), got {tuple(advantages.shape)}")
    check.same_device("advantages", advantages, "logp", logp)


def _packed_to_padded(cu_seqlens, logp, *others):
    """The packed operands as padded [S, max length] tensors (padding masked; gradients flow back)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    S = lengths.numel()
    T = int(lengths.max()) if S else 0
    pos = torch.arange(T, device=logp.device)
    valid = pos[None, :] < lengths[:, None]
    index = torch.where(valid, cu[:-1, None] + pos[None, :], 0)

    def pad(t, is_mask=False):
        if t is None:
            return None
        if t.shape[0] == S and t.dim() == 1 and t.shape != logp.shape:
            return t  # per-sequence advantages
        flat = t.reshape(-1)
        out = flat[index] if flat.numel() else flat.new_zeros(index.shape)
        return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device)) if is_mask else out

    mask = others[2]
    padded = [pad(logp)] + [pad(t, is_mask=t is mask) for t in others]
    return tuple(padded)


def _entropy_threshold(quantile, threshold, entropy, mask, cu_seqlens) -> float | None:
    """The entropy mask's threshold (None: no mask) from ``top_entropy_quantile`` or
    ``entropy_mask_threshold``; +inf when no token is valid (TRL then masks every token)."""
    quantile = _real("top_entropy_quantile", quantile, minimum=0.0, exclusive=True, maximum=1.0)
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1 or threshold.is_complex():
            raise ValueError(f"entropy_mask_threshold must be a real number or a one-element tensor, got shape "
                             f"{tuple(threshold.shape)}")
        threshold = float(threshold)
    threshold = _real("entropy_mask_threshold", threshold, optional=True)
    if quantile == 1.0 and threshold is None:
        return None
    if quantile < 1.0 and threshold is not None:
        raise ValueError("give top_entropy_quantile or entropy_mask_threshold, not both")
    if entropy is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_mask_threshold need entropy")
    if threshold is not None:
        return threshold
    if not check.has_data(entropy):
        raise ValueError("top_entropy_quantile < 1 reads the entropies (a quantile): pass entropy_mask_threshold "
                         "under torch.compile or on fake tensors")
    valid = mask != 0
    if cu_seqlens is not None:  # tokens outside every segment are not valid
        inside = torch.zeros(entropy.shape[-1], dtype=torch.bool, device=entropy.device)
        inside[: int(cu_seqlens[-1])] = True
        valid = valid & inside
    values = entropy.detach()[valid].float()
    if values.numel() == 0:
        return math.inf
    return float(torch.quantile(values, 1.0 - quantile))


def _check_policy_combination(p: PolicyParams, ref_logp, rollout_logp, entropy) -> None:
    """Options that only make sense together."""
    if p.surrogate == "vespo":
        if p.ratio != "token":
            raise ValueError(f"surrogate='vespo' defines its own sequence weight: ratio must be 'token', got {p.ratio!r}")
        if p.rollout_correction is not None:
            raise ValueError("surrogate='vespo' takes no rollout_correction (TRL folds the sampler's weights into its "
                             "sequence weight; not supported)")
    if p.delta is not None and p.surrogate != "clip":
        raise ValueError(f"delta applies to surrogate='clip' only, got surrogate={p.surrogate!r}")
    if p.clip_ratio_c is not None and p.surrogate != "clip":
        raise ValueError(f"clip_ratio_c (dual clip) applies to surrogate='clip' only, got surrogate={p.surrogate!r}")
    if p.surrogate == "geo_mean" and p.ratio != "token":
        raise ValueError(f"surrogate='geo_mean' defines its own sequence ratio: ratio must be 'token', got {p.ratio!r}")
    two_sided = p.surrogate in ("clip", "geo_mean") or (p.surrogate == "cispo" and p.cispo_bounds == "both")
    if two_sided and p.clip_low + p.clip_high < 0:
        raise ValueError(
            f"clip_high must be >= -clip_low (the interval [1 - clip_low, 1 + clip_high] is empty), got {p.clip_high}"
        )
    if p.ratio == "hybrid" and two_sided:
        lo = p.clip_low if p.seq_clip_low is None else p.seq_clip_low
        hi = p.clip_high if p.seq_clip_high is None else p.seq_clip_high
        if lo + hi < 0:
            raise ValueError(f"seq_clip_high must be >= -seq_clip_low, got seq_clip_low={lo}, seq_clip_high={hi}")
    if p.ratio == "cumulative" and p.clip_low >= 1.0:
        raise ValueError(f"ratio='cumulative' needs clip_low < 1 (its bound is log(1 - clip_low)), got {p.clip_low}")
    if p.beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={p.beta} needs ref_logp")
    if p.entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={p.entropy_coef} needs entropy")
    if p.ratio == "hybrid" and p.hybrid_mixing == "entropy" and entropy is None:
        raise ValueError("hybrid_mixing='entropy' needs entropy")
    if p.rollout_correction is not None:
        if rollout_logp is None:
            raise ValueError(f"rollout_correction={p.rollout_correction!r} needs rollout_logp")
        if p.rollout_correction == "icepop" and (p.rollout_cap is None or p.rollout_cap_low is None):
            raise ValueError("rollout_correction='icepop' needs both rollout_cap_low and rollout_cap")
        if p.rollout_correction.endswith("truncate") and p.rollout_cap is None and p.rollout_cap_low is None:
            raise ValueError(f"rollout_correction={p.rollout_correction!r} needs rollout_cap or rollout_cap_low")
        if p.rollout_cap is not None and p.rollout_cap_low is not None and p.rollout_cap_low > p.rollout_cap:
            raise ValueError(f"rollout_cap_low must be <= rollout_cap, got {p.rollout_cap_low} > {p.rollout_cap}")


from fusedrl import presets  # noqa: E402, F401  (makes fusedrl.presets reachable after `import fusedrl`)
