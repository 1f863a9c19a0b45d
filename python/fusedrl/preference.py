r"""Preference losses: sequence log-probs, the DPO family (every TRL ``loss_type``, SimPO, CPO, RPO, f-DPO,
soft labels, per-pair weights), LiPO-lambda, CPL, KTO and ORPO.

Every function validates its arguments (TypeError / ValueError naming the argument), freezes its
options into a params dataclass, picks a backend (only ``torch``, the reference, exists for this
family for now) and returns float32 (float64 for float64 input). The inputs are sequence-level
log-probs: make them from token log-probs with :func:`sequence_logps`.

Reduction (all losses): the mean over the pairs (or examples, or prompts) of the call, as TRL and
Liger. Under gradient accumulation or data parallelism, scale by ``B / B_total`` yourself.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch

from fusedrl import _validate as check
from fusedrl import dispatch
from fusedrl.reference import preference as ref

__all__ = [
    "sequence_logps",
    "preference_loss",
    "listwise_preference_loss",
    "cpl_loss",
    "kto_loss",
    "orpo_loss",
    "SequenceLogpsParams",
    "PreferenceParams",
    "ListwiseParams",
    "CPLParams",
    "KTOParams",
    "ORPOParams",
]

#: Backends implementing the preference family (kernels come in later issues).
BACKENDS = ("torch",)
_REAL_DTYPES = check.FLOAT_DTYPES + (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ---------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceLogpsParams:
    """Options of :func:`sequence_logps`. average: divide the masked sum by the number of valid tokens."""

    average: bool = False


@dataclass(frozen=True)
class PreferenceParams:
    """Options of :func:`preference_loss` (see its docstring for each).

    loss_type: tuple of loss type names; loss_weights: one weight per loss type.
    """

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    average_log_prob: bool = True
    rpo_alpha: float | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05


@dataclass(frozen=True)
class ListwiseParams:
    """Options of :func:`listwise_preference_loss`. beta: scale of the log-ratio scores."""

    beta: float = 0.1


@dataclass(frozen=True)
class CPLParams:
    """Options of :func:`cpl_loss`: temperature alpha, discount gamma in (0, 1], conservative bias lam in (0, 1]."""

    alpha: float = 0.1
    gamma: float = 1.0
    lam: float = 1.0


@dataclass(frozen=True)
class KTOParams:
    """Options of :func:`kto_loss` (TRL ``KTOConfig`` names)."""

    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass(frozen=True)
class ORPOParams:
    """Options of :func:`orpo_loss`: beta weighs the odds-ratio term; compute_nll_loss adds the chosen NLL."""

    beta: float = 0.1
    compute_nll_loss: bool = True


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _real(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def _float_tensor(name, value, shape=None, like=None, like_name=None) -> torch.Tensor:
    check.tensor(name, value, check.FLOAT_DTYPES)
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if like is not None:
        check.same_device(name, value, like_name, like)
    return value


def _sequence_tensor(name, value, like=None, like_name=None) -> torch.Tensor:
    """A 1-D float tensor of sequence log-probs, shaped like ``like`` when given."""
    check.tensor(name, value, check.FLOAT_DTYPES)
    if like is None:
        if value.dim() != 1 or value.shape[0] < 1:
            raise ValueError(f"{name} must have shape [B] with B >= 1, got {tuple(value.shape)}")
        return value
    return _float_tensor(name, value, like.shape, like, like_name)


def _mask(name, value, shape, like, like_name) -> torch.Tensor:
    check.mask_tensor(name, value)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    check.same_device(name, value, like_name, like)
    if value.dtype != torch.bool and check.has_data(value) and bool(((value != 0) & (value != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")
    return value


def _data_tensor(name, value, shape, like, like_name, *, low=None, high=None) -> torch.Tensor:
    """A real tensor of data (lengths, labels, weights): finite and within [low, high]."""
    check.tensor(name, value, _REAL_DTYPES, "an integer or a floating dtype")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    check.same_device(name, value, like_name, like)
    v = value.detach().double()
    bad = ~torch.isfinite(v)
    if low is not None:
        bad |= v < low
    if high is not None:
        bad |= v > high
    if check.has_data(value) and bool(bad.any()):
        first = v[bad].flatten()[0].item()
        rng = f" in [{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be finite{rng if (low is not None or high is not None) else ''}, got {first}")
    return value


def _loss_types(loss_type) -> tuple[str, ...]:
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or len(types) == 0:
        raise TypeError(f"loss_type must be a str or a non-empty list of str, got {loss_type!r}")
    for t in types:
        if not isinstance(t, str) or t not in ref.LOSS_TYPES:
            raise ValueError(f"loss_type must be among {ref.LOSS_TYPES}, got {t!r}")
    return tuple(types)


def _select(op: str, like: torch.Tensor, backend) -> str:
    return dispatch.select(op, BACKENDS, like.device, like.dtype, backend)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def sequence_logps(logp, mask, *, weights=None, average=False, backend=None):
    r"""Sequence log-probs from token log-probs: a masked, optionally weighted, optionally averaged sum.

    .. math::
        S_i = \sum_t m_{it}\, w_{it}\, \log p_{it}, \qquad
        \text{average=True: } S_i / \max(|y_i|, 1),\quad |y_i| = \sum_t m_{it}

    Args:
        logp: ``[..., T]`` token log-probs (float32, bfloat16, float16 or float64).
        mask: shaped like ``logp``, bool or 0/1; 1 where the token counts. Tokens outside the mask
            contribute exactly 0 whatever their value (NaN or -inf included) and get zero gradient.
        weights: optional per-token weights shaped like ``logp`` (TGDPO / SparsePO token weights:
            pass the same weights when computing the policy's and the reference's sequence log-probs,
            so the log-ratio is :math:`\sum_t w_t m_t (x_t - r_t)`; LD-DPO's ``ld_alpha``: weight 1 up
            to the shorter response's length and ``ld_alpha`` after it). Gradient flows into them.
        average: divide by the number of valid tokens (not by the sum of the weights); TRL / Liger
            ``average_log_prob=True`` (SimPO, ORPO, CPO's IPO).
        backend: backend override; only ``"torch"`` implements this family for now.

    Returns:
        ``[...]`` float32 (float64 for float64 input). A fully masked row gives 0 (average or not).
    """
    _float_tensor("logp", logp)
    if logp.dim() < 1:
        raise ValueError(f"logp must have shape [..., T], got {tuple(logp.shape)}")
    _mask("mask", mask, logp.shape, logp, "logp")
    if weights is not None:
        _float_tensor("weights", weights, logp.shape, logp, "logp")
    params = SequenceLogpsParams(average=check.boolean("average", average))
    _select("sequence_logps", logp, backend)
    return ref.sequence_logps(logp, mask, weights=weights, average=params.average)


def preference_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing=0.0,
    loss_weights=None,
    chosen_lengths=None,
    rejected_lengths=None,
    gamma=0.5,
    average_log_prob=True,
    rpo_alpha=None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    soft_labels=None,
    weights=None,
    backend=None,
):
    r"""Pairwise preference loss over sequence log-probs: every TRL DPO ``loss_type``, SimPO, CPO, RPO.

    Inputs are sequence log-probs ``[B]`` (:func:`sequence_logps`): pc, pr of the policy for the chosen
    and rejected responses, rc, rr of the reference. Without a reference (both None) the reference
    log-probs are 0 (reference-free; SimPO and CPO need none). Log-ratios
    :math:`u_c = pc - rc`, :math:`u_r = pr - rr`; f-divergence scores :math:`s = f'(e^u)` (below);
    :math:`\Delta = s_c - s_r`; lengths :math:`l_c, l_r` clamped below at 1.

    Per-pair losses (TRL 1.16.0 ``DPOTrainer._compute_loss``, same names and hyperparameters):

    ================  ==============================================================================
    ``sigmoid``       :math:`-\log\sigma(\beta\Delta)` (DPO); soft labels apply, ``label_smoothing``
                      does not (as TRL 1.16 and Liger 0.8.5; cDPO: ``soft_labels=1-eps``)
    ``hinge``         :math:`\mathrm{relu}(1 - \beta\Delta)` (SLiC)
    ``ipo``           :math:`(s_c/l_c - s_r/l_r - 1/(2\beta))^2` (IPO, length-normalized as TRL)
    ``exo_pair``      :math:`q_w(\log q_w - \log(1-\epsilon)) + q_l(\log q_l - \log\epsilon)`,
                      :math:`q_w = \sigma(\beta\Delta)`, :math:`q_l = \sigma(-\beta\Delta)`,
                      :math:`\epsilon` = ``label_smoothing`` in (0, 1)
    ``nca_pair``      :math:`-\log\sigma(\beta u_c) - \tfrac12\log\sigma(-\beta u_c) - \tfrac12\log\sigma(-\beta u_r)`
    ``robust``        :math:`[-(1-\epsilon)\log\sigma(\beta\Delta) + \epsilon\log\sigma(-\beta\Delta)]/(1-2\epsilon)`,
                      :math:`\epsilon` in [0, 0.5)
    ``bco_pair``      :math:`-\log\sigma(\beta u_c) - \log\sigma(-\beta u_r)`
    ``sppo_hard``     :math:`(u_c - \tfrac{1}{2\beta})^2 + (u_r + \tfrac{1}{2\beta})^2`
    ``aot``           cDPO form of :math:`\beta(\mathrm{sort}(pc - pr) - \mathrm{sort}(rc - rr))` (over the batch)
    ``aot_unpaired``  cDPO form of :math:`\beta(\mathrm{sort}(u_c) - \mathrm{sort}(u_r))`
    ``apo_zero``      :math:`1 - \sigma(\beta u_c) + \sigma(\beta u_r)`
    ``apo_down``      :math:`\sigma(\beta u_c) + 1 - \sigma(\beta(u_c - u_r))`
    ``discopop``      :math:`(1-m)(-\log\sigma(z)) + m e^{-z}`, :math:`z = \beta\Delta`,
                      :math:`m = \sigma(z/\tau)`, :math:`\tau` = ``discopop_tau``
    ``sft``           :math:`-\sum_i pc_i / \sum_i |y_{c,i}|`: the NLL per chosen token of the batch
                      (the same value for every pair; needs ``chosen_lengths``)
    ``sigmoid_norm``  :math:`-\log\sigma(\beta(s_c/l_c - s_r/l_r))`
    ``simpo``         :math:`-\log\sigma(\beta(pc/l_c - pr/l_r) - \gamma)` (SimPO, reference ignored),
                      cDPO-smoothed by ``label_smoothing`` as Liger and TRL's CPO
    ================  ==============================================================================

    where the cDPO form of z is :math:`-(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)`.

    f-divergences (``f_divergence_type``, f-DPO; allowed only with sigmoid, sigmoid_norm, hinge, ipo,
    exo_pair, robust, discopop, sft, as TRL): ``reverse_kl`` :math:`s = u`; ``forward_kl``
    :math:`1 - e^{-u}`; ``js_divergence`` :math:`\log 2 + \log\sigma(u)`; ``alpha_divergence``
    :math:`(e^{(a-1)u} - 1)/(a-1)` with a = ``f_alpha_divergence_coef`` (u when |a - 1| < 1e-6).
    Exponents are clamped above at 80 (TRL does so for the alpha-divergence; for forward KL it
    differs from TRL only where TRL overflows to inf).

    Combination and reduction:

    .. math::
        L = \sum_k \omega_k \frac1B \sum_i w_i \ell_k(i)
            \;+\; \alpha_{rpo} \frac1B \sum_i w_i \left(-\frac{pc_i}{l_{c,i}}\right)

    with :math:`\omega` = ``loss_weights`` (default 1 each; TRL's MPO combination), :math:`w` =
    ``weights`` (default 1). The mean over the pairs of the call is TRL's reduction.

    How a user of another trainer names their loss:

    - TRL DPO: ``loss_type`` (str or list), ``loss_weights``, ``beta``, ``label_smoothing``,
      ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau`` as in ``DPOConfig``; pass
      ``chosen_lengths`` / ``rejected_lengths`` (completion token counts) for ipo, sigmoid_norm, sft.
      ``use_weighting=True`` (WPO): ``weights = w_c * w_r`` with
      :math:`w = \exp(\mathrm{mean}_t(\log p_t - \log\sum_v p_v^2))` computed without gradient.
      ``ld_alpha``: build pc, pr, rc, rr with :func:`sequence_logps` ``weights=`` (1 on the shared
      length, ``ld_alpha`` after).
    - SimPO (Liger ``LigerFusedLinearSimPOLoss``, TRL CPO ``loss_type="simpo"``): ``loss_type="simpo"``,
      ``gamma`` (TRL's ``simpo_gamma``), lengths; Liger's NLL term (``compute_nll_loss=True``,
      ``alpha``): ``loss_type=["simpo", "sft"], loss_weights=[1.0, alpha]``.
    - CPO (Liger ``LigerFusedLinearCPOLoss``, TRL CPO ``loss_type="sigmoid"``): the SimPO variant
      without margin or length averaging: ``loss_type=["simpo", "sft"], loss_weights=[1.0, cpo_alpha],
      gamma=0.0, average_log_prob=False, chosen_lengths=...`` (no reference). ``label_smoothing``
      then smooths it as Liger / TRL's CPO do. TRL CPO ``hinge`` is ``"hinge"`` and CPO ``ipo`` is
      ``"ipo"`` without a reference; add ``"sft"`` for the NLL term.
    - RPO: ``rpo_alpha`` adds :math:`\alpha\,\mathrm{mean}_i(-pc_i/|y_{c,i}|)` (docs/OBJECTIVES.md: NLL of
      the chosen response per token, averaged per pair; our reading). The batch token-mean form of
      old TRL ``rpo_alpha`` and TRL 1.16 is ``loss_type=[..., "sft"], loss_weights=[..., alpha]``.

    Soft labels and per-pair weights (SmPO, UPO; TRL WPO): ``soft_labels`` p in [0, 1] replaces the
    target of the logistic losses (``sigmoid``, ``sigmoid_norm``, ``simpo``):
    :math:`-p\log\sigma(h) - (1-p)\log\sigma(-h)` (for simpo, p is then flipped with probability
    ``label_smoothing``); other loss types of a list ignore it. ``weights`` multiply every per-pair
    loss (not allowed with aot / aot_unpaired, which sort the batch). No gradient flows into either.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]``, B >= 1.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` or both None (reference-free).
        loss_type: a name above or a non-empty list of names (TRL 1.16 ``DPOConfig.loss_type``).
        beta: > 0. label_smoothing: in [0, 1) (robust: [0, 0.5); exo_pair: (0, 1)).
        loss_weights: one finite weight per loss type (default 1.0 each).
        chosen_lengths, rejected_lengths: ``[B]`` integer or float token counts >= 0; required by ipo,
            sigmoid_norm and simpo with ``average_log_prob`` (both), sft and ``rpo_alpha`` (chosen).
        gamma: SimPO's target margin (TRL ``simpo_gamma``, Liger ``gamma``). average_log_prob: whether
            simpo divides the log-probs by the lengths (True: SimPO; False: CPO).
        rpo_alpha: weight of RPO's NLL term, or None.
        f_divergence_type, f_alpha_divergence_coef, discopop_tau: as TRL (``discopop_tau`` > 0).
        soft_labels: ``[B]`` tensor or a number in [0, 1]; weights: ``[B]`` finite.
        backend: backend override; only ``"torch"`` implements this family for now.

    Returns:
        ``(loss, metrics)``: ``loss`` 0-dim float32 (float64 for float64 input); ``metrics`` a dict of
        detached 0-dim tensors as TRL logs them: ``rewards_chosen``, ``rewards_rejected`` (means of
        :math:`\beta u_c`, :math:`\beta u_r`; when the first loss type is simpo, of :math:`\beta pc/l_c`,
        :math:`\beta pr/l_r` as Liger), ``reward_accuracy`` (fraction of pairs whose chosen reward is
        larger), ``reward_margin`` (mean difference), ``logps_chosen``, ``logps_rejected``.

    Extreme values: log-ratios of +-1e4 give a finite loss and gradient for every loss type with its
    default options (logistic terms use ``logsigmoid``; ``discopop`` forms :math:`m e^{-z}` as
    :math:`e^{-z + \log\sigma(z/\tau)}`, finite for :math:`\tau < 1`). Squared losses (ipo,
    sppo_hard) grow as the square of the log-ratio, as they should; ipo with the exponential scores
    of forward_kl / alpha_divergence (up to :math:`e^{80}`) squared overflows float32 (as in TRL)
    for log-ratios beyond about -40: pass float64 log-probs there.
    """
    pc = _sequence_tensor("policy_chosen_logps", policy_chosen_logps)
    pr = _sequence_tensor("policy_rejected_logps", policy_rejected_logps, pc, "policy_chosen_logps")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together (or both be None)")
    if ref_chosen_logps is not None:
        _sequence_tensor("ref_chosen_logps", ref_chosen_logps, pc, "policy_chosen_logps")
        _sequence_tensor("ref_rejected_logps", ref_rejected_logps, pc, "policy_chosen_logps")
    B = pc.shape[0]

    types = _loss_types(loss_type)
    if loss_weights is None:
        lw = (1.0,) * len(types)
    else:
        if not isinstance(loss_weights, (list, tuple)):
            raise TypeError(f"loss_weights must be a list of numbers or None, got {type(loss_weights).__name__}")
        if len(loss_weights) != len(types):
            raise ValueError(
                f"loss_weights must have one weight per loss type ({len(types)}), got {len(loss_weights)}"
            )
        lw = tuple(_real(f"loss_weights[{i}]", w) for i, w in enumerate(loss_weights))
    beta = check.positive_float("beta", beta)
    label_smoothing = _real("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
    if "robust" in types and not label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type 'robust', got {label_smoothing}")
    if "exo_pair" in types and label_smoothing == 0.0:
        raise ValueError("label_smoothing must be in (0, 1) for loss_type 'exo_pair' (the EXO paper uses 1e-3), got 0.0")
    if not isinstance(f_divergence_type, str) or f_divergence_type not in ref.F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {ref.F_DIVERGENCE_TYPES}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl":
        unsupported = sorted(set(types) - ref.F_DIVERGENCE_LOSS_TYPES)
        if unsupported:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is only defined for the loss types "
                f"{sorted(ref.F_DIVERGENCE_LOSS_TYPES)}; loss_type holds {unsupported}"
            )
    params = PreferenceParams(
        loss_type=types,
        loss_weights=lw,
        beta=beta,
        label_smoothing=label_smoothing,
        gamma=_real("gamma", gamma),
        average_log_prob=check.boolean("average_log_prob", average_log_prob),
        rpo_alpha=None if rpo_alpha is None else _real("rpo_alpha", rpo_alpha),
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=_real("f_alpha_divergence_coef", f_alpha_divergence_coef),
        discopop_tau=check.positive_float("discopop_tau", discopop_tau),
    )

    averaged_simpo = "simpo" in types and params.average_log_prob
    needs_chosen = bool({"ipo", "sigmoid_norm", "sft"} & set(types)) or averaged_simpo or params.rpo_alpha is not None
    needs_rejected = bool({"ipo", "sigmoid_norm"} & set(types)) or averaged_simpo
    for name, lengths, needed in (
        ("chosen_lengths", chosen_lengths, needs_chosen),
        ("rejected_lengths", rejected_lengths, needs_rejected),
    ):
        if lengths is None:
            if needed:
                raise ValueError(
                    f"{name} is required by loss_type {list(types)}"
                    + (" with rpo_alpha" if params.rpo_alpha is not None else "")
                    + " (ipo, sigmoid_norm, sft, simpo with average_log_prob=True, rpo_alpha)"
                )
        else:
            _data_tensor(name, lengths, (B,), pc, "policy_chosen_logps", low=0.0)

    if soft_labels is not None:
        if not set(types) & ref.SOFT_LABEL_LOSS_TYPES:
            raise ValueError(
                f"soft_labels apply to the loss types {sorted(ref.SOFT_LABEL_LOSS_TYPES)}; loss_type is {list(types)}"
            )
        if isinstance(soft_labels, torch.Tensor):
            _data_tensor("soft_labels", soft_labels, (B,), pc, "policy_chosen_logps", low=0.0, high=1.0)
        else:
            value = _real("soft_labels", soft_labels, low=0.0, high=1.0)
            soft_labels = torch.full((B,), value, dtype=torch.float64, device=pc.device)
    if weights is not None:
        if set(types) & ref.SORTING_LOSS_TYPES:
            raise ValueError("weights cannot be used with loss_type 'aot' or 'aot_unpaired', which sort the batch")
        _data_tensor("weights", weights, (B,), pc, "policy_chosen_logps")

    _select("preference_loss", pc, backend)
    return ref.preference_loss(
        pc, pr, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        soft_labels=soft_labels, weights=weights, **asdict(params),
    )


def listwise_preference_loss(policy_logps, labels, ref_logps=None, *, beta=0.1, mask=None, backend=None):
    r"""LiPO-lambda: listwise preference loss with lambda weights (seed "LiPO").

    P prompts with K responses each; scores :math:`s_k = \beta(p_k - r_k)` (r = 0 without reference).

    .. math::
        L = \frac1P \sum_{\text{prompts}} -\sum_{i,j:\ \psi_i > \psi_j} \Delta_{ij}\,\log\sigma(s_i - s_j),
        \qquad \Delta_{ij} = |G_i - G_j|\,\left|\frac{1}{D(\tau_i)} - \frac{1}{D(\tau_j)}\right|

    with gains :math:`G = 2^{\psi} - 1`, discounts :math:`D(\tau) = \log_2(1 + \tau)` and
    :math:`\tau` the 1-based rank of s within the list (descending; computed without gradient; ties
    keep list order). The mean is over all P prompts (a prompt with no ordered pair contributes 0).

    Args:
        policy_logps: ``[P, K]`` sequence log-probs of the policy.
        labels: ``[P, K]`` real relevance labels :math:`\psi` in [-100, 100] (graded or binary; no
            gradient; the bound keeps :math:`2^{\psi}` finite in float32).
        ref_logps: ``[P, K]`` or None.
        beta: > 0.
        mask: ``[P, K]`` bool or 0/1; 0 marks a missing response of a ragged list (it forms no pair and
            takes no rank). Default: every response counts.
        backend: backend override; only ``"torch"`` for now.

    Returns:
        ``(loss, metrics)``; metrics: ``reward_accuracy`` (fraction of ordered pairs with
        :math:`s_i > s_j`; NaN when there is none), ``num_pairs``, ``rewards_mean`` (mean valid s).
    """
    _float_tensor("policy_logps", policy_logps)
    if policy_logps.dim() != 2 or policy_logps.shape[0] < 1 or policy_logps.shape[1] < 1:
        raise ValueError(f"policy_logps must have shape [P, K] with P, K >= 1, got {tuple(policy_logps.shape)}")
    shape = policy_logps.shape
    _data_tensor("labels", labels, shape, policy_logps, "policy_logps", low=-100.0, high=100.0)
    if ref_logps is not None:
        _float_tensor("ref_logps", ref_logps, shape, policy_logps, "policy_logps")
    if mask is not None:
        _mask("mask", mask, shape, policy_logps, "policy_logps")
    params = ListwiseParams(beta=check.positive_float("beta", beta))
    _select("listwise_preference_loss", policy_logps, backend)
    return ref.listwise_preference_loss(policy_logps, labels, ref_logps, mask=mask, beta=params.beta)


def cpl_loss(chosen_logp, chosen_mask, rejected_logp, rejected_mask, *, alpha=0.1, gamma=1.0, lam=1.0,
             backend=None):
    r"""Contrastive Preference Learning (seed "Contrastive Preference Learning", CPL).

    .. math::
        S = \alpha \sum_{t\ \mathrm{valid}} \gamma^{t} \log\pi(a_t \mid s_t), \qquad
        L = \frac1B\sum_i -\log\frac{e^{S_{c,i}}}{e^{S_{c,i}} + e^{\lambda S_{r,i}}}
          = \frac1B\sum_i \mathrm{softplus}(\lambda S_{r,i} - S_{c,i})

    t counts the valid tokens before a token (the first valid token has :math:`\gamma^0`; our
    reading for masks with holes). :math:`\lambda < 1` is CPL's conservative bias
    (``biased_bce_with_logits(..., bias=lam)`` in the CPL code; its reference configs use 0.5).

    Args:
        chosen_logp, rejected_logp: ``[B, T]`` and ``[B, T']`` token log-probs of the preferred and the
            other segment.
        chosen_mask, rejected_mask: shaped like them, bool or 0/1.
        alpha: temperature > 0 (default 0.1, the scale of DPO's beta; the CPL code defaults to 1.0).
        gamma: discount in (0, 1]; 1 is the undiscounted sum (CPL's LLM-style default).
        lam: conservative bias in (0, 1]; 1 is the unbiased contrastive loss.
        backend: backend override; only ``"torch"`` for now.

    Returns:
        ``(loss, metrics)``; metrics: ``rewards_chosen``, ``rewards_rejected`` (means of S),
        ``reward_accuracy`` (:math:`S_c > S_r`), ``reward_margin``. A fully masked segment has S = 0.
    """
    for name, logp, mask_name, mask in (("chosen_logp", chosen_logp, "chosen_mask", chosen_mask),
                                        ("rejected_logp", rejected_logp, "rejected_mask", rejected_mask)):
        _float_tensor(name, logp, like=chosen_logp, like_name="chosen_logp")
        if logp.dim() != 2 or logp.shape[0] < 1:
            raise ValueError(f"{name} must have shape [B, T] with B >= 1, got {tuple(logp.shape)}")
        _mask(mask_name, mask, logp.shape, chosen_logp, "chosen_logp")
    if rejected_logp.shape[0] != chosen_logp.shape[0]:
        raise ValueError(
            f"rejected_logp must have as many rows as chosen_logp ({chosen_logp.shape[0]}), got {rejected_logp.shape[0]}"
        )
    params = CPLParams(
        alpha=check.positive_float("alpha", alpha),
        gamma=_real("gamma", gamma, low=0.0, high=1.0, low_open=True),
        lam=_real("lam", lam, low=0.0, high=1.0, low_open=True),
    )
    _select("cpl_loss", chosen_logp, backend)
    return ref.cpl_loss(chosen_logp, chosen_mask, rejected_logp, rejected_mask, **asdict(params))


def kto_loss(policy_logps, labels, ref_logps=None, *, beta=0.1, loss_type="kto", kl=None, policy_kl_logps=None,
             ref_kl_logps=None, desirable_weight=1.0, undesirable_weight=1.0, backend=None):
    r"""KTO (seed "KTO"; TRL 1.16 ``KTOTrainer``, Liger ``LigerFusedLinearKTOLoss``) over unpaired examples.

    With :math:`u = p - r` (r = 0 without reference) and the reference point z:

    .. math::
        \ell = \begin{cases} \lambda_D\,(1 - \sigma(\beta(u - z))) & \text{desirable}\\
                             \lambda_U\,(1 - \sigma(\beta(z - u))) & \text{undesirable}\end{cases}
        \qquad L = \frac1B\sum_i \ell_i

    ``loss_type="apo_zero_unpaired"`` (TRL): :math:`1 - \sigma(\beta u)` / :math:`\sigma(\beta u)`, no z.

    z, without gradient, is one of: TRL's estimate :math:`\max(\mathrm{mean}(p^{KL} - r^{KL}), 0)` from
    ``policy_kl_logps`` and ``ref_kl_logps`` (log-probs of mismatched prompt/completion pairs; under data
    parallelism TRL takes the mean over all ranks: pass a global ``kl=`` instead), or ``kl`` as given
    (Liger: a 0-dim or ``[B]`` tensor, not clamped), or 0 when neither is given.

    Args:
        policy_logps: ``[B]`` sequence log-probs. labels: ``[B]`` bool or 0/1 (1 = desirable).
        ref_logps: ``[B]`` or None. beta: > 0. loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
        kl, policy_kl_logps, ref_kl_logps: the reference point, see above (at most one way; kto only).
        desirable_weight, undesirable_weight: :math:`\lambda_D, \lambda_U` >= 0 (TRL's names).
        backend: backend override; only ``"torch"`` for now.

    Returns:
        ``(loss, metrics)``; metrics: ``rewards_chosen`` / ``rewards_rejected`` (mean :math:`\beta u` of
        the desirable / undesirable examples; NaN when there is none), ``reward_margin`` (their
        difference, as TRL), ``kl`` (z), ``logps_chosen``, ``logps_rejected``.
    """
    _sequence_tensor("policy_logps", policy_logps)
    B = policy_logps.shape[0]
    _mask("labels", labels, (B,), policy_logps, "policy_logps")
    if ref_logps is not None:
        _sequence_tensor("ref_logps", ref_logps, policy_logps, "policy_logps")
    if not isinstance(loss_type, str) or loss_type not in ref.KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {ref.KTO_LOSS_TYPES}, got {loss_type!r}")
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("policy_kl_logps and ref_kl_logps must be given together (or both be None)")
    if policy_kl_logps is not None:
        if kl is not None:
            raise ValueError("give either kl or policy_kl_logps / ref_kl_logps, not both")
        _float_tensor("policy_kl_logps", policy_kl_logps, like=policy_logps, like_name="policy_logps")
        if policy_kl_logps.dim() != 1 or policy_kl_logps.shape[0] < 1:
            raise ValueError(f"policy_kl_logps must have shape [N] with N >= 1, got {tuple(policy_kl_logps.shape)}")
        _float_tensor("ref_kl_logps", ref_kl_logps, policy_kl_logps.shape, policy_logps, "policy_logps")
    if kl is not None:
        _float_tensor("kl", kl, like=policy_logps, like_name="policy_logps")
        if kl.shape not in ((), (1,), (B,)):
            raise ValueError(f"kl must be 0-dim, [1] or [B] = [{B}], got {tuple(kl.shape)}")
    if loss_type == "apo_zero_unpaired" and (kl is not None or policy_kl_logps is not None):
        raise ValueError("loss_type 'apo_zero_unpaired' uses no KL reference point; do not pass kl or policy_kl_logps")
    params = KTOParams(
        beta=check.positive_float("beta", beta),
        loss_type=loss_type,
        desirable_weight=_real("desirable_weight", desirable_weight, low=0.0),
        undesirable_weight=_real("undesirable_weight", undesirable_weight, low=0.0),
    )
    _select("kto_loss", policy_logps, backend)
    return ref.kto_loss(policy_logps, labels, ref_logps, kl=kl, policy_kl_logps=policy_kl_logps,
                        ref_kl_logps=ref_kl_logps, **asdict(params))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, *, chosen_lengths, rejected_lengths, beta=0.1,
              compute_nll_loss=True, backend=None):
    r"""ORPO (seed "ORPO"; Liger ``LigerFusedLinearORPOLoss``, TRL ``ORPOTrainer``), reference-free.

    With average log-probs :math:`c = pc / l_c`, :math:`r = pr / l_r` (lengths clamped at 1):

    .. math::
        \log\mathrm{OR} = (c - r) - (\log(1 - e^{c}) - \log(1 - e^{r})), \qquad
        L = -\beta\,\frac1B\sum_i \log\sigma(\log\mathrm{OR}_i)
            \;+\; \underbrace{\frac{-\sum_i pc_i}{\max(\sum_i |y_{c,i}|, 1)}}_{\text{NLL, if compute\_nll\_loss}}

    The NLL term is the mean over every chosen token of the batch, as Liger and TRL.
    :math:`\log(1 - e^x)` is computed stably (branch at :math:`-\ln 2`, as TRL); an average
    log-prob of exactly 0 (probability 1) gives an infinite log-odds, as in both peers.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed sequence log-probs.
        chosen_lengths, rejected_lengths: ``[B]`` token counts >= 0 (integer or float).
        beta: weight of the odds-ratio term (the paper's lambda), > 0.
        compute_nll_loss: add the chosen NLL (Liger's name; TRL always adds it).
        backend: backend override; only ``"torch"`` for now.

    Returns:
        ``(loss, metrics)``; metrics: ``rewards_chosen``, ``rewards_rejected`` (mean :math:`\beta c`,
        :math:`\beta r`), ``reward_accuracy``, ``reward_margin``, ``log_odds_ratio`` (mean
        :math:`\log\sigma(\log\mathrm{OR})`), ``log_odds_chosen`` (mean log OR), ``nll_loss``.
    """
    pc = _sequence_tensor("policy_chosen_logps", policy_chosen_logps)
    _sequence_tensor("policy_rejected_logps", policy_rejected_logps, pc, "policy_chosen_logps")
    B = pc.shape[0]
    _data_tensor("chosen_lengths", chosen_lengths, (B,), pc, "policy_chosen_logps", low=0.0)
    _data_tensor("rejected_lengths", rejected_lengths, (B,), pc, "policy_chosen_logps", low=0.0)
    params = ORPOParams(
        beta=check.positive_float("beta", beta),
        compute_nll_loss=check.boolean("compute_nll_loss", compute_nll_loss),
    )
    _select("orpo_loss", pc, backend)
    return ref.orpo_loss(pc, policy_rejected_logps, chosen_lengths=chosen_lengths,
                         rejected_lengths=rejected_lengths, **asdict(params))
