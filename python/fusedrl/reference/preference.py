r"""Reference preference losses: DPO family (every TRL 1.16 ``loss_type``), SimPO/CPO, RPO, f-DPO, soft
labels and per-pair weights, LiPO-lambda, CPL, KTO and ORPO.

Plain eager PyTorch written from docs/OBJECTIVES.md and the peers' source (TRL 1.16.0
``trl/trainer/dpo_trainer.py``, ``trl/trainer/kto_trainer.py``, ``trl/experimental/{cpo,orpo}``; Liger 0.8.5
``liger_kernel/chunked_loss/{simpo,cpo,orpo,kto}_loss.py``). Everything is computed in float32 (float64
when an input is float64) and is differentiable by autograd with respect to every log-prob input.

Notation: ``pc``, ``pr`` are the policy's sequence log-probs of the chosen and rejected responses, ``rc``,
``rr`` the reference's (0 when no reference is given: reference-free), ``lc``, ``lr`` the response lengths
(clamped below at 1), and ``h = beta * (f(pc - rc) - f(pr - rr))`` the DPO margin, where ``f`` is the
f-divergence score function (identity for the default reverse KL).

The validation of arguments lives in :mod:`fusedrl.preference`; these functions assume valid input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusedrl.reference.logprobs import accumulation_dtype

#: Every ``loss_type`` of TRL 1.16.0 ``DPOConfig``.
TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
#: ``loss_type`` values of :func:`preference_loss`: TRL's, plus SimPO (and CPO through it).
LOSS_TYPES = TRL_LOSS_TYPES + ("simpo",)
#: The loss types built on the chosen-minus-rejected score difference: the only ones TRL lets an
#: f-divergence other than reverse KL change (the others have no valid f-DPO generalization).
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: The logistic losses, whose target probability a soft label replaces.
SOFT_LABEL_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "simpo"})
#: Losses that sort the batch (a per-pair weight would be misaligned, as TRL says).
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

#: Exponents are clamped above at this value before ``exp`` (TRL clamps the alpha-divergence at 80 in
#: float32); it keeps log-ratios of +-1e4 finite for forward KL and alpha-divergence.
EXP_CLAMP = 80.0
_LN2 = math.log(2.0)


def _dtype(*tensors) -> torch.dtype:
    """Accumulation dtype of the given (optional) tensors: float64 if any is float64, else float32."""
    return accumulation_dtype(
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _lengths(lengths, dtype):
    """Response lengths as ``dtype``, clamped below at 1 (an empty response divides by 1, as TRL)."""
    return None if lengths is None else lengths.to(dtype).clamp(min=1.0)


def _data(t, dtype):
    """A tensor that is data (labels, weights): no gradient flows into it."""
    return None if t is None else t.detach().to(dtype)


def _mean(values: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """Detached mean of ``values`` (over ``where`` when given); NaN when nothing is selected."""
    values = values.detach()
    if where is None:
        return values.mean()  # NaN for an empty tensor
    # A masked sum over the count (0 / 0 = NaN), not values[where]: no data-dependent shape, no sync.
    return torch.where(where, values, 0.0).sum() / where.sum().to(values.dtype)


# ---------------------------------------------------------------------------------------------
# Sequence log-probs
# ---------------------------------------------------------------------------------------------


def sequence_logps(logp, mask, *, weights=None, average=False):
    r"""Masked (optionally weighted) sum of token log-probs over the last dimension.

    .. math::
        S_i = \sum_t m_{it}\, w_{it}\, \log p_{it}, \qquad
        \text{average: } S_i / \max(|y_i|, 1),\ |y_i| = \sum_t m_{it}

    ``mask`` is nonzero where a token counts. Positions outside the mask contribute exactly 0 (a NaN or
    -inf log-prob there is ignored, with zero gradient); a fully masked row gives 0. The average
    divides by the number of valid tokens, not by the sum of the weights. Per-token weights give the
    token-weighted log-ratios of TGDPO / SparsePO (pass the same weights for the policy and the
    reference), and LD-DPO's ``ld_alpha`` (weight 1 up to the shared length, ``ld_alpha`` after).
    """
    dtype = _dtype(logp, weights)
    valid = mask != 0
    x = torch.where(valid, logp.to(dtype), 0.0)
    if weights is not None:
        x = x * torch.where(valid, weights.to(dtype), 0.0)
    total = x.sum(-1)
    if average:
        total = total / valid.sum(-1).to(dtype).clamp(min=1.0)
    return total


# ---------------------------------------------------------------------------------------------
# Pairwise preference losses
# ---------------------------------------------------------------------------------------------


def f_divergence_scores(logratios, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    r"""f'(t) at t = pi/pi_ref = exp(log-ratio), as TRL 1.16 (f-DPO, "Beyond Reverse KL").

    reverse_kl: u; forward_kl: 1 - e^{-u}; js_divergence: log 2 + log sigmoid(u);
    alpha_divergence: (e^{(a-1) u} - 1) / (a - 1) (u when |a - 1| < 1e-6, TRL's limit case).
    Exponents are clamped above at ``EXP_CLAMP`` = 80 (TRL clamps the alpha-divergence there; fusedrl
    clamps forward KL too, which differs from TRL only where TRL overflows to inf).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - torch.exp((-logratios).clamp(max=EXP_CLAMP))
    if f_divergence_type == "js_divergence":
        return _LN2 + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return logratios
        return (torch.exp(((a - 1.0) * logratios).clamp(max=EXP_CLAMP)) - 1.0) * (1.0 / (a - 1.0))
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {f_divergence_type!r}")


def _logistic(h, p=None):
    r"""-p log sigmoid(h) - (1 - p) log sigmoid(-h); -log sigmoid(h) when p is None (hard label)."""
    if p is None:
        return -F.logsigmoid(h)
    return -p * F.logsigmoid(h) - (1.0 - p) * F.logsigmoid(-h)


def _smoothed(h, eps):
    r"""cDPO form, as TRL's aot / CPO and Liger's SimPO / CPO: -(1-eps) log sigmoid(h) - eps log sigmoid(-h)."""
    return -F.logsigmoid(h) * (1.0 - eps) - F.logsigmoid(-h) * eps


def _pair_loss(kind, *, pc, pr, rc, rr, cs, rs, lc, lr, chosen_lengths, p, beta, label_smoothing, gamma, average_log_prob,
               discopop_tau):
    """Per-pair loss [B] of one loss type (TRL 1.16 ``DPOTrainer._compute_loss``, SimPO as Liger)."""
    clr, rlr = pc - rc, pr - rr  # log-ratios
    delta = cs - rs  # score difference (f-divergence scores)
    bd = beta * delta
    if kind == "sigmoid":
        return _logistic(bd, p)
    if kind == "hinge":
        return torch.relu(1.0 - bd)
    if kind == "ipo":
        return (cs / lc - rs / lr - 1.0 / (2.0 * beta)) ** 2
    if kind == "exo_pair":
        eps = label_smoothing
        return torch.sigmoid(bd) * (F.logsigmoid(bd) - math.log1p(-eps)) + torch.sigmoid(-bd) * (
            F.logsigmoid(-bd) - math.log(eps)
        )
    if kind == "nca_pair":
        return -F.logsigmoid(beta * clr) - 0.5 * F.logsigmoid(-beta * clr) - 0.5 * F.logsigmoid(-beta * rlr)
    if kind == "robust":
        eps = label_smoothing
        return (-(1.0 - eps) * F.logsigmoid(bd) + eps * F.logsigmoid(-bd)) / (1.0 - 2.0 * eps)
    if kind == "bco_pair":
        return -F.logsigmoid(beta * clr) - F.logsigmoid(-beta * rlr)
    if kind == "sppo_hard":
        return (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
    if kind == "aot":
        sorted_delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
        return _smoothed(beta * sorted_delta, label_smoothing)
    if kind == "aot_unpaired":
        sorted_delta = torch.sort(clr, dim=0).values - torch.sort(rlr, dim=0).values
        return _smoothed(beta * sorted_delta, label_smoothing)
    if kind == "apo_zero":
        return (1.0 - torch.sigmoid(beta * clr)) + torch.sigmoid(beta * rlr)
    if kind == "apo_down":
        return torch.sigmoid(beta * clr) + (1.0 - torch.sigmoid(beta * (clr - rlr)))
    if kind == "discopop":
        # (1 - s) * (-log sigmoid(l)) + s * e^{-l}, s = sigmoid(l / tau); the second term is formed as
        # exp(-l + log sigmoid(l / tau)) so that a very negative l gives 0 * inf = 0, not NaN.
        modulation = torch.sigmoid(bd / discopop_tau)
        exp_term = torch.exp((-bd + F.logsigmoid(bd / discopop_tau)).clamp(max=EXP_CLAMP))
        return -F.logsigmoid(bd) * (1.0 - modulation) + exp_term
    if kind == "sft":
        # TRL: mean of -log p over every chosen completion token of the batch, repeated for each pair.
        return _token_mean_nll(pc, chosen_lengths).expand(pc.shape[0])
    if kind == "sigmoid_norm":
        return _logistic(beta * (cs / lc - rs / lr), p)
    if kind == "simpo":
        c, r = (pc / lc, pr / lr) if average_log_prob else (pc, pr)
        h = beta * (c - r) - gamma
        if p is None:
            return _smoothed(h, label_smoothing)
        # a soft label p, then flipped with probability label_smoothing
        return _logistic(h, p * (1.0 - label_smoothing) + (1.0 - p) * label_smoothing)
    raise ValueError(f"loss_type must be among {LOSS_TYPES}, got {kind!r}")


def _token_mean_nll(pc, chosen_lengths):
    r"""-sum_i pc_i / max(sum_i |yc_i|, 1): the mean NLL over every chosen token of the batch (TRL's "sft",
    TRL's and Liger's NLL term of CPO / ORPO / SimPO)."""
    return -pc.sum() / chosen_lengths.to(pc.dtype).sum().clamp(min=1.0)


def preference_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    chosen_lengths=None,
    rejected_lengths=None,
    soft_labels=None,
    weights=None,
    loss_type=("sigmoid",),
    loss_weights=None,
    beta=0.1,
    label_smoothing=0.0,
    gamma=0.5,
    average_log_prob=True,
    rpo_alpha=None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
):
    r"""Pairwise preference loss and metrics; see :func:`fusedrl.preference_loss` for the math of each type.

    loss = sum_k loss_weights[k] * mean_i( w_i * l_k(i) ) + rpo_alpha * mean_i( w_i * (-pc_i / lc_i) ).
    """
    dtype = _dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pc = policy_chosen_logps.to(dtype)
    pr = policy_rejected_logps.to(dtype)
    rc = torch.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps.to(dtype)
    rr = torch.zeros_like(pr) if ref_rejected_logps is None else ref_rejected_logps.to(dtype)
    lc, lr = _lengths(chosen_lengths, dtype), _lengths(rejected_lengths, dtype)
    p, w = _data(soft_labels, dtype), _data(weights, dtype)
    if isinstance(loss_type, str):
        loss_type = (loss_type,)
    if loss_weights is None:
        loss_weights = (1.0,) * len(loss_type)

    cs = f_divergence_scores(pc - rc, f_divergence_type, f_alpha_divergence_coef)
    rs = f_divergence_scores(pr - rr, f_divergence_type, f_alpha_divergence_coef)
    loss = torch.zeros((), dtype=dtype, device=pc.device)
    for kind, loss_weight in zip(loss_type, loss_weights, strict=True):
        per_pair = _pair_loss(
            kind, pc=pc, pr=pr, rc=rc, rr=rr, cs=cs, rs=rs, lc=lc, lr=lr, chosen_lengths=chosen_lengths,
            p=p if kind in SOFT_LABEL_LOSS_TYPES else None, beta=beta, label_smoothing=label_smoothing,
            gamma=gamma, average_log_prob=average_log_prob, discopop_tau=discopop_tau,
        )
        if w is not None:
            per_pair = per_pair * w
        loss = loss + loss_weight * per_pair.mean()
    if rpo_alpha is not None:
        nll = -pc / lc
        if w is not None:
            nll = nll * w
        loss = loss + rpo_alpha * nll.mean()

    if loss_type[0] == "simpo":  # SimPO / CPO rewards, as Liger and TRL's CPO: beta * (average) log-prob
        chosen_basis, rejected_basis = (pc / lc, pr / lr) if average_log_prob else (pc, pr)
    else:  # TRL's DPO: beta * log-ratio
        chosen_basis, rejected_basis = pc - rc, pr - rr
    chosen_rewards = beta * chosen_basis.detach()
    rejected_rewards = beta * rejected_basis.detach()
    metrics = {
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(dtype).mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "logps_chosen": _mean(pc),
        "logps_rejected": _mean(pr),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# LiPO-lambda
# ---------------------------------------------------------------------------------------------


def lambda_ranks(scores, valid):
    r"""1-based rank of each score within its list, descending, among valid entries; no gradient.

    Ties keep list order (a stable sort): of two equal scores, the earlier response ranks first.
    Invalid entries rank after every valid one (their ranks are never used).
    """
    with torch.no_grad():
        key = scores.detach().masked_fill(~valid, float("-inf"))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        positions = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=scores.dtype)
        ranks = torch.empty_like(key).scatter_(-1, order, positions.expand_as(key))
    return ranks


def listwise_preference_loss(policy_logps, labels, ref_logps=None, *, mask=None, beta=0.1):
    r"""LiPO-lambda: see :func:`fusedrl.listwise_preference_loss`."""
    dtype = _dtype(policy_logps, ref_logps)
    valid = torch.ones_like(policy_logps, dtype=torch.bool) if mask is None else mask != 0
    logratio = policy_logps.to(dtype) - (0.0 if ref_logps is None else ref_logps.to(dtype))
    s = torch.where(valid, beta * logratio, 0.0)  # masked entries: 0, and no gradient
    psi = torch.where(valid, labels.detach().to(dtype), 0.0)

    tau = lambda_ranks(s, valid)
    gain = torch.pow(2.0, psi) - 1.0  # G = 2^psi - 1
    inv_discount = 1.0 / torch.log2(1.0 + tau)  # 1 / D(tau)
    delta = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs() * (
        inv_discount.unsqueeze(-1) - inv_discount.unsqueeze(-2)
    ).abs()  # Delta_ij, [P, K, K]
    pairs = (psi.unsqueeze(-1) > psi.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    delta = torch.where(pairs, delta, 0.0)
    margin = s.unsqueeze(-1) - s.unsqueeze(-2)  # s_i - s_j
    per_prompt = -(delta * F.logsigmoid(margin)).sum(dim=(-1, -2))
    loss = per_prompt.mean()

    correct = (margin.detach() > 0) & pairs
    num_pairs = pairs.sum()
    metrics = {
        "reward_accuracy": correct.sum().to(dtype) / num_pairs.to(dtype),  # 0 / 0 = NaN: no pairs
        "num_pairs": num_pairs.to(dtype),
        "rewards_mean": _mean(s, valid),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# CPL
# ---------------------------------------------------------------------------------------------


def discount_weights(mask, gamma):
    r"""gamma^t where t counts the valid tokens before position t (0 for the first valid token)."""
    valid = mask != 0
    t = (valid.to(torch.int64).cumsum(-1) - 1).clamp(min=0)
    return torch.pow(torch.as_tensor(gamma, dtype=torch.float64, device=mask.device), t.to(torch.float64))


def cpl_loss(chosen_logp, chosen_mask, rejected_logp, rejected_mask, *, alpha=0.1, gamma=1.0, lam=1.0):
    r"""CPL: see :func:`fusedrl.cpl_loss`."""
    dtype = _dtype(chosen_logp, rejected_logp)
    s_c = alpha * sequence_logps(chosen_logp.to(dtype), chosen_mask,
                                 weights=discount_weights(chosen_mask, gamma).to(dtype))
    s_r = alpha * sequence_logps(rejected_logp.to(dtype), rejected_mask,
                                 weights=discount_weights(rejected_mask, gamma).to(dtype))
    per_pair = F.softplus(lam * s_r - s_c)  # -log( e^{S_c} / (e^{S_c} + e^{lam S_r}) )
    metrics = {
        "rewards_chosen": _mean(s_c),
        "rewards_rejected": _mean(s_r),
        "reward_accuracy": (s_c.detach() > s_r.detach()).to(dtype).mean(),
        "reward_margin": _mean(s_c - s_r),
    }
    return per_pair.mean(), metrics


# ---------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------


def kto_loss(policy_logps, labels, ref_logps=None, *, kl=None, policy_kl_logps=None, ref_kl_logps=None,
             beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0):
    r"""KTO (and TRL's apo_zero_unpaired): see :func:`fusedrl.kto_loss`."""
    dtype = _dtype(policy_logps, ref_logps, kl, policy_kl_logps, ref_kl_logps)
    logratio = policy_logps.to(dtype) - (0.0 if ref_logps is None else ref_logps.to(dtype))
    desirable = labels.to(torch.bool)
    if policy_kl_logps is not None:  # TRL: z = max(mean(KL_logps - ref_KL_logps), 0), no gradient
        z = (policy_kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)).mean().clamp(min=0.0)
    elif kl is not None:  # Liger: the given KL, no gradient
        z = kl.detach().to(dtype)
    else:
        z = torch.zeros((), dtype=dtype, device=logratio.device)
    if loss_type == "kto":
        desirable_loss = 1.0 - torch.sigmoid(beta * (logratio - z))
        undesirable_loss = 1.0 - torch.sigmoid(beta * (z - logratio))
    else:  # apo_zero_unpaired
        desirable_loss = 1.0 - torch.sigmoid(beta * logratio)
        undesirable_loss = torch.sigmoid(beta * logratio)
    per_example = torch.where(desirable, desirable_weight * desirable_loss, undesirable_weight * undesirable_loss)

    rewards = beta * logratio.detach()
    chosen, rejected = _mean(rewards, desirable), _mean(rewards, ~desirable)
    metrics = {
        "rewards_chosen": chosen,
        "rewards_rejected": rejected,
        "reward_margin": chosen - rejected,
        "kl": z.detach().mean() if loss_type == "kto" else torch.zeros((), dtype=dtype, device=logratio.device),
        "logps_chosen": _mean(policy_logps.to(dtype), desirable),
        "logps_rejected": _mean(policy_logps.to(dtype), ~desirable),
    }
    return per_example.mean(), metrics


# ---------------------------------------------------------------------------------------------
# ORPO
# ---------------------------------------------------------------------------------------------


def log1mexp(x):
    r"""log(1 - e^x) for x <= 0, branching at -ln 2 (Maechler) as TRL's ORPO; each branch is evaluated
    only on its own side so that the discarded branch never injects an inf or NaN gradient."""
    small = x < -_LN2
    x_small = torch.where(small, x, -1.0)
    x_large = torch.where(small, -0.5, x)
    return torch.where(small, torch.log1p(-torch.exp(x_small)), torch.log(-torch.expm1(x_large)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, *, chosen_lengths, rejected_lengths, beta=0.1,
              compute_nll_loss=True):
    r"""ORPO: see :func:`fusedrl.orpo_loss`."""
    dtype = _dtype(policy_chosen_logps, policy_rejected_logps)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    lc, lr = _lengths(chosen_lengths, dtype), _lengths(rejected_lengths, dtype)
    c, r = pc / lc, pr / lr  # average log-probs
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    nll = _token_mean_nll(pc, chosen_lengths)
    loss = -beta * ratio.mean()
    if compute_nll_loss:
        loss = loss + nll
    chosen_rewards, rejected_rewards = beta * c.detach(), beta * r.detach()
    metrics = {
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(dtype).mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "log_odds_ratio": _mean(ratio),
        "log_odds_chosen": _mean(log_odds),
        "nll_loss": nll.detach(),
    }
    return loss, metrics
