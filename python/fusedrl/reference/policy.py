"""Reference policy-gradient loss: importance ratio -> surrogate -> masks and rollout correction ->
KL -> entropy -> aggregation, per token in TRL's order (docs/OBJECTIVES.md "Surrogates").

Notation (docs/OBJECTIVES.md): x = log pi_theta (the differentiable input), o = log pi_old,
r = log pi_ref, mu = log pi_rollout, rho = x - o, A the advantage (per sequence, broadcast, or per
token), m the mask (0 = padding; bool/int 1 or a float per-token weight), |y_i| = sum_t m_it,
sg = stop-gradient.

Every per-token step is a small function of per-token (and per-row) tensors so that a fused kernel
can mirror it one to one; the only cross-token quantities are per-row sums (sequence ratios,
geometric means, sequence rollout weights), a per-row prefix sum (cumulative ratio) and a per-row
max (entropy mixing). Normalization happens in one place, :mod:`fusedrl.reference.aggregate`.

Padding: every input is selected to 0 on tokens with m = 0 before any arithmetic, so padded values
(even inf or NaN) never reach the loss and their gradient is exactly 0. Log-weights are clamped to
[-log_ratio_clamp, log_ratio_clamp] (default 20, as verl and OpenRLHF) right before every exp, so
log-ratios of +-1e4 give a finite loss and gradient (the clamp zeroes the gradient through a
saturated weight, as verl's does).
"""

from __future__ import annotations

import math

import torch

from fusedrl.reference.aggregate import aggregate, mask_weight, masked, per_row_count
from fusedrl.reference.kl import kl_estimator
from fusedrl.reference.logprobs import accumulation_dtype

SURROGATES = ("clip", "cispo", "sapo", "geo_mean", "reinforce", "gpg", "vespo")
RATIOS = ("token", "sequence", "sequence-token", "cumulative", "hybrid")
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop")
HYBRID_MIXINGS = ("average", "entropy")
CISPO_BOUNDS = ("upper", "both")

# verl gspo: the GSPO-token log-weight is clamped above at 10 (core_algos.compute_policy_loss_gspo).
GSPO_TOKEN_LOG_RATIO_MAX = 10.0
# verl geo_mean: token rollout weights enter the sequence geometric mean as log(w + 1e-10).
GEO_MEAN_LOG_EPS = 1e-10
# TRL vespo (GRPOTrainer.get_gamma_weights): the sequence log-weight is clamped to [log(1e-8), 20] and
# the rate lambda below at 1e-4.
VESPO_LOG_MIN = math.log(1e-8)
VESPO_LOG_MAX = 20.0
VESPO_LAMBDA_MIN = 1e-4


# ---------------------------------------------------------------------------------------------
# per-row helpers


def clamp_log(log_w: torch.Tensor, bound: float | None) -> torch.Tensor:
    """The log-weight clamp applied before every exp (None: no clamp)."""
    return log_w if bound is None else log_w.clamp(-bound, bound)


def sequence_mean(values: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, 1]: sum_t m v / max(|y_i|, 1) (an empty row gives 0)."""
    total = masked(values, valid, weight).sum(-1, keepdim=True)
    return total / per_row_count(weight.sum(-1, keepdim=True))


def masked_mean(values: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """0-dim local token mean (no gradient), for metrics; 0 for a fully masked batch."""
    values = values.detach().to(weight.dtype)
    return masked(values, valid, weight).sum() / per_row_count(weight.sum())


# ---------------------------------------------------------------------------------------------
# importance ratios: each returns (w, w_clipped) with w [B, T] differentiable


def clip_interval(w: torch.Tensor, low: float, high: float, clip_below: bool) -> torch.Tensor:
    """clip(w, 1 - low, 1 + high), or only min(w, 1 + high) when not ``clip_below``."""
    return w.clamp(min=(1.0 - low) if clip_below else None, max=1.0 + high)


def token_ratio(rho, bound):
    """w_it = exp(rho_it) (PPO, GRPO)."""
    return torch.exp(clamp_log(rho, bound))


def sequence_ratio(rho, valid, weight, bound):
    """GSPO / TRL ``importance_sampling_level="sequence"``: s_i = exp(sum_t m rho / max(|y_i|, 1)),
    shared by every token of row i, the gradient flowing through s_i."""
    return torch.exp(clamp_log(sequence_mean(rho, valid, weight), bound)).expand_as(rho)


def sequence_token_ratio(x, rho, valid, weight, bound):
    """GSPO-token (verl ``gspo``): log w_it = min(sg(log s_i) + x_it - sg(x_it), 10): the value of
    s_i, the gradient of a token ratio scaled by s_i."""
    log_s = sequence_mean(rho, valid, weight).detach()
    log_w = (log_s + x - x.detach()).clamp(max=GSPO_TOKEN_LOG_RATIO_MAX)
    return torch.exp(clamp_log(log_w, bound))


def cumulative_ratio(rho, valid, weight, clip_low, clip_high, clip_below, bound):
    """CTPO ("Rethinking Importance Sampling in LLM Policy Optimization"): the prefix ratio
    w_it = exp(c_it), c_it = sum_{t' <= t} m rho_it'. Position-adaptive clip (our reading):
    c_it clipped to [sqrt(n_it) log(1 - clip_low), sqrt(n_it) log(1 + clip_high)], n_it = sum_{t' <= t} m."""
    c = torch.cumsum(masked(rho, valid, weight), dim=-1)
    root_n = torch.sqrt(torch.cumsum(weight, dim=-1))
    c_clipped = torch.minimum(c, root_n * math.log1p(clip_high))
    if clip_below:
        c_clipped = torch.maximum(c_clipped, root_n * math.log1p(-clip_low))
    return torch.exp(clamp_log(c, bound)), torch.exp(clamp_log(c_clipped, bound))


def entropy_mixing(entropy, valid):
    """DHPO entropy mixing (our reading): a_it = H_it / max over valid t' of H_it', no gradient;
    a row whose entropies are all 0 mixes with a = 0 (pure sequence ratio)."""
    h = torch.where(valid, entropy.detach(), 0.0)
    h_max = h.amax(dim=-1, keepdim=True)
    return torch.where(h_max > 0, h / per_row_count(h_max), 0.0)


def hybrid_ratio(rho, valid, weight, alpha, clip_low, clip_high, seq_clip_low, seq_clip_high, clip_below, bound):
    """DHPO ("Dynamic Hybrid Policy Optimization"; our reading): w_mix = a w_token + (1 - a) s_i and
    the clipped mix a clip(w_token, 1-clip_low, 1+clip_high) + (1 - a) clip(s_i, 1-seq_clip_low,
    1+seq_clip_high) (branch-specific trust regions)."""
    w_token = token_ratio(rho, bound)
    s = sequence_ratio(rho, valid, weight, bound)
    w = alpha * w_token + (1.0 - alpha) * s
    w_clipped = alpha * clip_interval(w_token, clip_low, clip_high, clip_below) + (1.0 - alpha) * clip_interval(
        s, seq_clip_low, seq_clip_high, clip_below
    )
    return w, w_clipped


def importance_ratio(level, x, rho, valid, weight, entropy, *, clip_low, clip_high, clip_below, seq_clip_low,
                     seq_clip_high, hybrid_mixing, hybrid_alpha, log_ratio_clamp):
    """``(w, w_clipped)`` of the ratio ``level``; ``w_clipped`` is w inside the level's trust region."""
    if level == "cumulative":
        return cumulative_ratio(rho, valid, weight, clip_low, clip_high, clip_below, log_ratio_clamp)
    if level == "hybrid":
        alpha = entropy_mixing(entropy, valid) if hybrid_mixing == "entropy" else hybrid_alpha
        return hybrid_ratio(rho, valid, weight, alpha, clip_low, clip_high, seq_clip_low, seq_clip_high, clip_below,
                            log_ratio_clamp)
    if level == "token":
        w = token_ratio(rho, log_ratio_clamp)
    elif level == "sequence":
        w = sequence_ratio(rho, valid, weight, log_ratio_clamp)
    elif level == "sequence-token":
        w = sequence_token_ratio(x, rho, valid, weight, log_ratio_clamp)
    else:
        raise ValueError(f"ratio must be one of {RATIOS}, got {level!r}")
    return w, clip_interval(w, clip_low, clip_high, clip_below)


# ---------------------------------------------------------------------------------------------
# surrogates: per-token loss l_it before masks, corrections and regularizers


def clip_surrogate(w, w_clipped, adv, delta=None, clip_ratio_c=None):
    """PPO / GRPO / DAPO: l = -min(w~ A, w_clipped A), w~ = min(w, delta) when ``delta`` is set
    (TRL's two-sided clip). Dual clip (verl ``vanilla``, OpenRLHF) when ``clip_ratio_c = c``:
    l = min(l, -A c) where A < 0."""
    w_unclipped = w if delta is None else w.clamp(max=delta)
    loss = torch.maximum(-adv * w_unclipped, -adv * w_clipped)
    if clip_ratio_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_ratio_c), loss)
    return loss


def cispo_surrogate(x, w_clipped, adv):
    """CISPO: l = -sg(clip(w)) A x (the bound chosen by ``cispo_bounds``: TRL clips above only,
    verl on both sides)."""
    return -w_clipped.detach() * adv * x


def sapo_surrogate(w, adv, tau_pos, tau_neg):
    """SAPO (TRL, verl): l = -(4 / tau) sigmoid(tau (w - 1)) A, tau = tau_pos if A > 0 else tau_neg."""
    tau = torch.where(adv > 0, w.new_tensor(tau_pos), w.new_tensor(tau_neg))  # in w's dtype (fp64 stays fp64)
    return -(torch.sigmoid(tau * (w - 1.0)) * 4.0 / tau) * adv


def geo_mean_surrogate(rho, adv, valid, weight, clip_low, clip_high, bound=None):
    """GMPO (verl ``geo_mean``): sign-aware clip of each token log-ratio in log space,
    rho~ = sgn(A) min(sgn(A) rho, sgn(A) clip(rho, -clip_low, clip_high)); the sequence loss
    -mean_t(A) exp(mean_t rho~) is given to every token of the row (``aggregation=
    "seq-mean-token-mean"`` then is verl's mean over rows). Returns (loss, clipped) with
    ``clipped`` the tokens whose log-ratio was clipped. The pessimistic side is not clipped (a
    positive-advantage token keeps a very negative log-ratio), so the mean log-ratio is clamped
    to +-``bound`` before the exp (verl leaves it unclamped: inf for log-ratios of +-1e4)."""
    sign = torch.sign(adv)
    rho_clamped = rho.clamp(-clip_low, clip_high)
    rho_min = sign * torch.minimum(sign * rho, sign * rho_clamped)
    ratio = torch.exp(clamp_log(sequence_mean(rho_min, valid, weight), bound))
    adv_mean = sequence_mean(adv, valid, weight)
    return (-adv_mean * ratio).expand_as(rho), rho != rho_clamped


def vespo_weight(rho, adv, valid, weight, k_pos, lambda_pos, k_neg, lambda_neg, bound):
    """VESPO (TRL ``loss_type="vespo"``): the gamma weight phi_i = exp(lambda + k log W_i - lambda W_i)
    of the sequence weight W_i = exp(clamp(sum_t m clamp(rho, +-bound), log 1e-8, 20)) (a sum, not a
    mean), k, lambda = (k_pos, lambda_pos) where A >= 0 else (k_neg, lambda_neg), lambda >= 1e-4;
    phi(1) = 1; a non-finite phi is 0 (TRL's nan_to_num). No gradient."""
    log_w = masked(clamp_log(rho, bound), valid, weight).sum(-1, keepdim=True).clamp(VESPO_LOG_MIN, VESPO_LOG_MAX)
    nonneg = adv >= 0
    k = torch.where(nonneg, adv.new_tensor(k_pos), adv.new_tensor(k_neg))
    lam = torch.where(nonneg, adv.new_tensor(lambda_pos), adv.new_tensor(lambda_neg)).clamp(min=VESPO_LAMBDA_MIN)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).detach()


def vespo_surrogate(x, phi, adv):
    """VESPO: l = -phi A x (phi without gradient: :func:`vespo_weight`)."""
    return -phi * adv * x


def off_policy_mask(x, sampling, adv, valid, weight, threshold):
    """DeepSeek-V3.2's off-policy sequence mask (TRL ``off_policy_mask_threshold``): a token is kept
    where A >= 0 or its row's mean sg(mu - x) <= threshold (mu: the sampler's log-probs, else the
    old ones). No gradient."""
    kl = sequence_mean(sampling - x.detach(), valid, weight)
    return ((adv >= 0) | (kl <= threshold)).to(x.dtype)


def entropy_mask(entropy, valid, threshold):
    """TRL's top-entropy-quantile token mask: valid tokens with H >= threshold (no gradient)."""
    return ((entropy.detach() >= threshold) & valid).to(entropy.dtype)


def reinforce_surrogate(w, adv):
    """REINFORCE with importance weight: l = -w A (on-policy the gradient is exp(rho) A dx)."""
    return -w * adv


def gpg_surrogate(x, adv):
    """GPG (verl ``gpg``): l = -A x, no ratio."""
    return -adv * x


# ---------------------------------------------------------------------------------------------
# rollout (train / inference mismatch) correction


def rollout_weight(old, rollout, valid, weight, mode, cap, cap_low, bound):
    """Weight of each token, without gradient (TRL ``vllm_importance_sampling_*``, verl
    ``rollout_corr_helper``): q = exp(o - mu) per token, or Q_i = exp(sum_t m (o - mu)) per row.

    *_truncate: clamp(q, cap_low, cap) (verl's TIS has no lower bound: cap_low None);
    *_mask and icepop: q where cap_low <= q <= cap, else 0 (a missing bound is no bound);
    icepop is token_mask with both bounds (verl ``rollout_is_threshold="lower_upper"``).
    """
    diff = torch.where(valid, old - rollout, 0.0)
    if mode.startswith("sequence"):
        diff = masked(diff, valid, weight).sum(-1, keepdim=True)
    q = torch.exp(clamp_log(diff, bound))
    if mode.endswith("truncate"):
        q = q.clamp(min=cap_low, max=cap)
    else:
        keep = torch.ones_like(q, dtype=torch.bool)
        if cap is not None:
            keep &= q <= cap
        if cap_low is not None:
            keep &= q >= cap_low
        q = torch.where(keep, q, 0.0)
    return q.expand_as(old).detach()


def geometric_row_mean(w, valid, weight):
    """verl geo_mean: token weights enter as the row's geometric mean exp(mean_t log(w + 1e-10))."""
    return torch.exp(sequence_mean(torch.log(w + GEO_MEAN_LOG_EPS), valid, weight)).expand_as(w)


# ---------------------------------------------------------------------------------------------
# the pipeline


def per_token_policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    surrogate="clip",
    ratio="token",
    clip_low=0.2,
    clip_high=None,
    clip_ratio_c=None,
    delta=None,
    ref_logp=None,
    beta=0.0,
    kl="k3",
    use_bias_correction_kl=False,
    rollout_logp=None,
    rollout_correction=None,
    rollout_cap=3.0,
    rollout_cap_low=None,
    entropy=None,
    entropy_coef=0.0,
    cispo_bounds="upper",
    tau_pos=1.0,
    tau_neg=1.05,
    hybrid_mixing="average",
    hybrid_alpha=0.5,
    seq_clip_low=None,
    seq_clip_high=None,
    log_ratio_clamp=20.0,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    off_policy_mask_threshold=None,
    entropy_mask_threshold=None,
    add_kl=True,
    add_entropy=True,
):
    """Per-token loss l [B, T] (TRL's order) and the per-token pieces, before aggregation.

    1. ratio w (and its clipped version) at ``ratio`` level from rho = x - o;
    2. surrogate l; l *= the off-policy sequence mask and the entropy mask (when set);
    3. l *= rollout correction weight (sequence geometric mean of it for geo_mean, as verl);
    4. l += beta * KL (KL *= w when ``use_bias_correction_kl``, TRL), when ``add_kl``;
    5. l -= entropy_coef * H, when ``add_entropy``.
    Returns ``(l, pieces)`` with pieces a dict of the detached-or-not per-token tensors used by the
    metrics: w, w_clipped (or None), clipped_low / clipped_high (bool), kl, entropy, rollout.
    """
    dtype = accumulation_dtype(logp.dtype)
    valid, weight = mask_weight(mask, dtype)
    clip_high = clip_low if clip_high is None else clip_high
    seq_clip_low = clip_low if seq_clip_low is None else seq_clip_low
    seq_clip_high = clip_high if seq_clip_high is None else seq_clip_high

    def clean(t, keep_grad=False):
        t = t if keep_grad else t.detach()
        return torch.where(valid, t.to(dtype).expand(mask.shape), 0.0)

    x = clean(logp, keep_grad=True)
    o = clean(logp if old_logp is None else old_logp)
    adv = clean(advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages)
    h = None if entropy is None else clean(entropy, keep_grad=True)
    rho = x - o

    pieces = {}
    if surrogate == "geo_mean":
        if ratio != "token":
            raise ValueError(f"surrogate='geo_mean' defines its own sequence ratio: ratio must be 'token', got {ratio!r}")
        w = token_ratio(rho, log_ratio_clamp)
        loss, clipped = geo_mean_surrogate(rho, adv, valid, weight, clip_low, clip_high, log_ratio_clamp)
        pieces["clipped_low"] = clipped & (adv < 0)
        pieces["clipped_high"] = clipped & (adv > 0)
    else:
        clip_below = not (surrogate == "cispo" and cispo_bounds == "upper")
        w, w_clipped = importance_ratio(
            ratio, x, rho, valid, weight, h, clip_low=clip_low, clip_high=clip_high, clip_below=clip_below,
            seq_clip_low=seq_clip_low, seq_clip_high=seq_clip_high, hybrid_mixing=hybrid_mixing,
            hybrid_alpha=hybrid_alpha, log_ratio_clamp=log_ratio_clamp,
        )
        if surrogate == "clip":
            loss = clip_surrogate(w, w_clipped, adv, delta, clip_ratio_c)
            if clip_ratio_c is not None:
                pieces["clipped_dual"] = (adv < 0) & (-adv * clip_ratio_c < torch.maximum(-adv * w, -adv * w_clipped))
        elif surrogate == "cispo":
            loss = cispo_surrogate(x, w_clipped, adv)
        elif surrogate == "sapo":
            loss = sapo_surrogate(w, adv, tau_pos, tau_neg)
        elif surrogate == "reinforce":
            loss = reinforce_surrogate(w, adv)
        elif surrogate == "gpg":
            loss = gpg_surrogate(x, adv)
        elif surrogate == "vespo":
            if ratio != "token":
                raise ValueError(f"surrogate='vespo' defines its own sequence weight: ratio must be 'token', got {ratio!r}")
            phi = vespo_weight(rho, adv, valid, weight, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
                               log_ratio_clamp)
            loss = vespo_surrogate(x, phi, adv)
        else:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        if surrogate in ("clip", "cispo"):
            pieces["clipped_low"] = (w_clipped > w) & (adv < 0)
            pieces["clipped_high"] = (w_clipped < w) & (adv > 0)
    pieces["w"] = w

    if off_policy_mask_threshold is not None:
        sampling = o if rollout_logp is None else clean(rollout_logp)
        loss = loss * off_policy_mask(x, sampling, adv, valid, weight, off_policy_mask_threshold)
    if entropy_mask_threshold is not None:
        if h is None:
            raise ValueError("entropy_mask_threshold needs entropy")
        loss = loss * entropy_mask(h, valid, entropy_mask_threshold)

    if rollout_correction is not None:
        if surrogate == "vespo":
            raise ValueError("surrogate='vespo' takes no rollout_correction (TRL folds the sampler's weights into "
                             "its sequence weight; not supported)")
        if rollout_logp is None:
            raise ValueError(f"rollout_correction={rollout_correction!r} needs rollout_logp")
        q = rollout_weight(o, clean(rollout_logp), valid, weight, rollout_correction, rollout_cap, rollout_cap_low,
                           log_ratio_clamp)
        if surrogate == "geo_mean":
            q = geometric_row_mean(q, valid, weight)
        pieces["rollout"] = q
        loss = loss * q

    if ref_logp is not None:
        kl_term = kl_estimator(x - clean(ref_logp), kl)
        if use_bias_correction_kl:
            kl_term = kl_term * w
        pieces["kl"] = kl_term
        if add_kl and beta != 0.0:
            loss = loss + beta * kl_term
    elif beta != 0.0:
        raise ValueError("beta != 0 needs ref_logp")

    if h is not None:
        pieces["entropy"] = h
        if add_entropy and entropy_coef != 0.0:
            loss = loss - entropy_coef * h
    elif entropy_coef != 0.0:
        raise ValueError("entropy_coef != 0 needs entropy")
    return loss, pieces


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    aggregation="token-mean",
    kl_aggregation=None,
    entropy_aggregation=None,
    exclude_empty_rows=False,
    num_tokens=None,
    num_sequences=None,
    max_length=None,
    group_ids=None,
    num_groups=None,
    **options,
):
    """``(loss, metrics)``: :func:`per_token_policy_loss` aggregated by ``aggregation``.

    The KL (entropy) term is added per token, and so aggregated with the loss, when
    ``kl_aggregation`` (``entropy_aggregation``) is None; otherwise it is aggregated on its own by
    that mode with the same normalizers and added as ``beta * KL`` (``- entropy_coef * H``), as
    verl does for both terms and TRL for its entropy bonus (a token mean whatever the loss type).
    """
    loss_tok, pieces = per_token_policy_loss(
        logp, old_logp, advantages, mask,
        add_kl=kl_aggregation is None, add_entropy=entropy_aggregation is None, **options,
    )
    norms = dict(num_tokens=num_tokens, num_sequences=num_sequences, max_length=max_length, advantages=advantages,
                 group_ids=group_ids, num_groups=num_groups, exclude_empty_rows=exclude_empty_rows)
    loss = aggregate(loss_tok, mask, aggregation, **norms)
    beta = options.get("beta", 0.0)
    entropy_coef = options.get("entropy_coef", 0.0)
    if kl_aggregation is not None and beta != 0.0:
        loss = loss + beta * aggregate(pieces["kl"], mask, kl_aggregation, **norms)
    if entropy_aggregation is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * aggregate(pieces["entropy"], mask, entropy_aggregation, **norms)
    return loss, policy_metrics(pieces, mask, loss_tok.dtype)


def policy_metrics(pieces, mask, dtype):
    """Local token means (0-dim, no gradient) of the clip indicators, the ratio, the KL estimate,
    the entropy and the rollout weight."""
    valid, weight = mask_weight(mask, dtype)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    metrics = {
        "clipfrac_low": masked_mean(pieces["clipped_low"], valid, weight) if "clipped_low" in pieces else zero,
        "clipfrac_high": masked_mean(pieces["clipped_high"], valid, weight) if "clipped_high" in pieces else zero,
        "ratio_mean": masked_mean(pieces["w"], valid, weight),
    }
    if "clipped_dual" in pieces:
        metrics["clipfrac_dual"] = masked_mean(pieces["clipped_dual"], valid, weight)
    if "kl" in pieces:
        metrics["kl_mean"] = masked_mean(pieces["kl"], valid, weight)
    if "entropy" in pieces:
        metrics["entropy_mean"] = masked_mean(pieces["entropy"], valid, weight)
    if "rollout" in pieces:
        metrics["rollout_weight_mean"] = masked_mean(pieces["rollout"], valid, weight)
    return metrics
