"""OpenRLHF 0.11 loss modules on fusedrl: ``from fusedrl.integrations.openrlhf import PolicyLoss,
ValueLoss, DPOLoss`` in place of ``from openrlhf.models.loss import ...`` is the whole change.

Each class takes the constructor and ``forward`` arguments of OpenRLHF's class of the same name
(openrlhf/models/loss.py) and returns what it returns; tests/peers/test_openrlhf.py runs OpenRLHF's
own module beside them. Nothing of OpenRLHF is imported here (its package pulls deepspeed).

- :class:`PolicyLoss` -> :func:`fusedrl.policy_loss`: ``policy_loss_type`` ``"ppo"`` (token ratio,
  clip, ``dual_clip``) and ``"gspo"`` (sequence ratio; OpenRLHF forces the per-sample mean),
  ``token_level_loss`` -> ``"token-mean"`` or ``"seq-mean-token-mean"`` over non-empty rows, the
  train/rollout correction ``is_correction_level="token"`` with ``is_correction_gating="ratio"``
  (``"clip"`` -> ``rollout_correction="token_truncate"``, ``"mask"`` -> ``"icepop"``).
- :class:`ValueLoss` -> :func:`fusedrl.value_loss` (OpenRLHF clips ``values - old_values`` to
  +-``clip_eps``).
- :class:`DPOLoss` -> :func:`fusedrl.preference_loss` (``loss_type="sigmoid"``, its
  ``label_smoothing`` as ``soft_labels = 1 - label_smoothing`` (cDPO), or ``"ipo"`` on the
  log-probs as given).

Normalizers: ``batch_num_tokens`` -> ``num_tokens``, ``global_batch_size`` -> ``num_sequences``,
and the losses are multiplied by ``dp_size`` as OpenRLHF does (fusedrl's own losses are not: see
"Scaling" in :func:`fusedrl.policy_loss`). Options OpenRLHF has and fusedrl cannot reproduce
(sequence-level or divergence-gated correction) raise a ValueError naming them at construction.
"""

from __future__ import annotations

import torch
from torch import nn

import fusedrl

__all__ = ["PolicyLoss", "ValueLoss", "DPOLoss"]


def _normalizers(token_level_loss: bool, batch_num_tokens, global_batch_size) -> dict:
    """OpenRLHF's aggregate_loss as fusedrl keywords: token level -> token-mean (over the global
    token count when given); sample level -> the mean of per-row token means over the rows with a
    valid token (or the sum over ``global_batch_size``)."""
    if token_level_loss:
        return dict(aggregation="token-mean", num_tokens=batch_num_tokens)
    return dict(aggregation="seq-mean-token-mean", exclude_empty_rows=True, num_sequences=global_batch_size)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` (PPO / GSPO with dual clip and the train/rollout correction) on
    :func:`fusedrl.policy_loss`. ``forward`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl,
    is_filter_ratio)`` as OpenRLHF's (the last two None without a correction). ``backend``:
    fusedrl's backend (None: the fastest available)."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold=(0.5, 5.0), *, backend: str | None = None) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in ("off", "token", "seq"):
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level!r}")
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode!r}")
        if is_correction_gating not in ("ratio", "binary_kl", "tv"):
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating!r}")
        if is_correction_level == "seq":
            raise ValueError("fusedrl.integrations.openrlhf.PolicyLoss: is_correction_level='seq' (a geometric-mean "
                             "gate with per-token weights) is not supported")
        if is_correction_level != "off" and is_correction_gating != "ratio":
            raise ValueError(f"fusedrl.integrations.openrlhf.PolicyLoss: is_correction_gating="
                             f"{is_correction_gating!r} (a divergence gate) is not supported")
        if is_correction_level != "off" and policy_loss_type == "gspo":
            raise ValueError("fusedrl.integrations.openrlhf.PolicyLoss: policy_loss_type='gspo' with a correction "
                             "(OpenRLHF then takes the ratio against the rollout log-probs) is not supported")
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sample mean
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_gating, self.is_correction_threshold = is_correction_gating, tuple(is_correction_threshold)
        self.backend = backend

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size: int = 1,
                batch_num_tokens=None, global_batch_size=None):
        if action_mask is None:
            action_mask = torch.ones_like(log_probs, dtype=torch.bool)
        kw = dict(surrogate="clip", ratio="token" if self.policy_loss_type == "ppo" else "sequence",
                  clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, clip_ratio_c=self.dual_clip,
                  **_normalizers(self.token_level_loss, batch_num_tokens, global_batch_size))
        correct = self.is_correction_level != "off"
        if correct:
            if rollout_log_probs is None:
                raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
            low, high = self.is_correction_threshold
            mode = "token_truncate" if self.is_correction_mode == "clip" else "icepop"
            kw.update(rollout_logp=rollout_log_probs, rollout_correction=mode, rollout_cap=high, rollout_cap_low=low)
        loss, metrics = fusedrl.policy_loss(log_probs, old_log_probs, advantages, action_mask, backend=self.backend,
                                            **kw)
        if dp_size != 1 and (batch_num_tokens is not None if self.token_level_loss else global_batch_size is not None):
            loss = loss * dp_size  # OpenRLHF undoes DDP's averaging only with global counts
        with torch.no_grad():
            clip_ratio = (metrics["clipfrac_low"] + metrics["clipfrac_high"]).to(log_probs.dtype)
            ppo_kl = _masked_mean(-(log_probs.detach() - old_log_probs), action_mask)
            vllm_kl = is_filter_ratio = None
            if correct:
                q = torch.exp(old_log_probs - rollout_log_probs)
                low, high = self.is_correction_threshold
                is_filter_ratio = _masked_mean(((q < low) | (q > high)).float(), action_mask)
                vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


class ValueLoss(nn.Module):
    """OpenRLHF's ``ValueLoss`` (the clipped value loss, 0.5 times the aggregated squared error) on
    :func:`fusedrl.value_loss`."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True, *,
                 backend: str | None = None) -> None:
        super().__init__()
        self.clip_eps, self.token_level_loss, self.backend = clip_eps, token_level_loss, backend

    def forward(self, values, old_values, returns, action_mask=None, dp_size: int = 1, batch_num_tokens=None,
                global_batch_size=None):
        if action_mask is None:
            action_mask = torch.ones_like(values, dtype=torch.bool)
        loss, _ = fusedrl.value_loss(values, old_values, returns, action_mask, clip=self.clip_eps, backend=self.backend,
                                     **_normalizers(self.token_level_loss, batch_num_tokens, global_batch_size))
        if dp_size != 1 and (batch_num_tokens is not None if self.token_level_loss else global_batch_size is not None):
            loss = loss * dp_size
        return loss


class DPOLoss(nn.Module):
    """OpenRLHF's ``DPOLoss`` on :func:`fusedrl.preference_loss`: returns ``(loss, chosen_rewards,
    rejected_rewards)``, the rewards per pair (beta times the policy - reference log-ratio, detached)."""

    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False, *,
                 backend: str | None = None) -> None:
        super().__init__()
        self.beta, self.label_smoothing, self.ipo, self.backend = beta, label_smoothing, ipo, backend

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        if self.ipo:  # OpenRLHF's IPO takes the log-probs as given: lengths of 1 (fusedrl's ipo divides by them)
            ones = torch.ones(policy_chosen_logps.shape, dtype=policy_chosen_logps.dtype,
                              device=policy_chosen_logps.device)
            kw = dict(loss_type="ipo", chosen_lengths=ones, rejected_lengths=ones)
        elif self.label_smoothing:  # cDPO: fusedrl's sigmoid smooths through soft labels (as TRL 1.16)
            labels = torch.full(policy_chosen_logps.shape, 1.0 - self.label_smoothing,
                                dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
            kw = dict(loss_type="sigmoid", soft_labels=labels)
        else:
            kw = dict(loss_type="sigmoid")
        loss, _ = fusedrl.preference_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                          reference_rejected_logps, beta=self.beta, backend=self.backend, **kw)
        chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
        return loss, chosen_rewards, rejected_rewards
