"""fusedrl's policy losses and advantage estimators in verl 0.9.1's own registries, under
``fusedrl_*`` names.

>>> from fusedrl.integrations import verl as fusedrl_verl
>>> fusedrl_verl.register()      # doctest: +SKIP
then select ``actor_rollout_ref.actor.policy_loss.loss_mode=fusedrl_vanilla`` (or
``fusedrl_gspo``, ``fusedrl_gpg``, ``fusedrl_cispo``, ``fusedrl_sapo``, ``fusedrl_geo_mean``) in
verl's config. Each registered function has verl's ``PolicyLossFn`` signature and reads verl's
``ActorConfig`` (``clip_ratio``, ``clip_ratio_low`` / ``_high``, ``clip_ratio_c``, ``tau_pos`` /
``tau_neg``, ``global_batch_info``), so the loss equals verl's function of the same mode: the
keywords come from :func:`fusedrl.presets.verl`, and verl's ``dp_size`` factor is applied (fusedrl's
own losses add up over ranks, verl's are multiplied by ``dp_size``; see "Scaling" in
:func:`fusedrl.policy_loss`). verl's precomputed ``rollout_is_weights`` are refused with a
ValueError (fusedrl computes the rollout correction from the rollout log-probs:
``fusedrl.policy_loss(rollout_logp=...)``). Advantage estimators (``algorithm.adv_estimator=
fusedrl_grpo``, ``fusedrl_rloo``, ``fusedrl_opo``, ``fusedrl_gpg``, ``fusedrl_grpo_passk``,
``fusedrl_reinforce_plus_plus_baseline``) run :func:`fusedrl.group_advantages` on the summed
token rewards, verl's uids mapped to integer group ids. ``unregister()`` removes the names again;
verl's own entries are never touched.

Value loss: verl 0.9.1 has no registry for value losses. Its critic's loss function is
``verl.workers.utils.losses.value_loss(config, model_output, data, dp_group)``, which the trainer
hands to the critic workers with ``critic_wg.set_loss_fn(partial(value_loss, config=critic_cfg))``
(verl/trainer/ppo/ray_trainer.py ``init_workers``); that call is verl's own hook, so no patching is
needed: after ``trainer.init_workers()``,

>>> from functools import partial                                                   # doctest: +SKIP
>>> trainer.critic_wg.set_loss_fn(partial(fusedrl_verl.value_loss, config=critic_cfg))  # doctest: +SKIP

:func:`value_loss` is verl's function with :func:`compute_value_loss` (a drop-in for
``verl.trainer.ppo.core_algos.compute_value_loss``: the same signature and return values, the
``dp_size`` factor included) in place of verl's; setting verl's own function again undoes it.

Metrics: ``actor/pg_clipfrac`` (tokens whose trust region is active), ``actor/ppo_kl`` (mean of
old - new log-prob) and, for ``vanilla``, ``actor/pg_clipfrac_lower`` (the dual clip), as verl's
``vanilla`` reports them.
"""

from __future__ import annotations

import torch
from verl.trainer.ppo import core_algos

import fusedrl
from fusedrl import presets

__all__ = ["register", "unregister", "policy_loss_fn", "advantage_fn", "compute_value_loss", "value_loss", "NAMES",
           "ADV_NAMES"]

NAMES = {f"fusedrl_{mode}": mode for mode in presets.VERL_LOSS_MODES}
# verl advantage estimator -> fusedrl.group_advantages estimator
ADV_NAMES = {f"fusedrl_{name}": (name, est) for name, est in (
    ("grpo", "grpo"), ("rloo", "rloo"), ("opo", "opo"), ("gpg", "gpg"), ("grpo_passk", "grpo_passk"),
    ("reinforce_plus_plus_baseline", "reinforce++-baseline"))}


def _options(config, mode: str, loss_agg_mode: str) -> dict:
    kw = dict(clip_ratio=config.clip_ratio, clip_ratio_low=config.clip_ratio_low, clip_ratio_high=config.clip_ratio_high)
    if mode == "vanilla":
        kw["clip_ratio_c"] = config.get("clip_ratio_c", 3.0)
    if mode == "sapo":
        kw.update(tau_pos=config.tau_pos, tau_neg=config.tau_neg)
    return presets.verl(mode, loss_agg_mode, **kw)


def policy_loss_fn(mode: str):
    """verl ``PolicyLossFn`` computing verl's loss ``mode`` with :func:`fusedrl.policy_loss`."""
    if mode not in presets.VERL_LOSS_MODES:
        raise ValueError(f"mode must be one of {presets.VERL_LOSS_MODES}, got {mode!r}")

    def loss_fn(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                rollout_is_weights: torch.Tensor | None = None):
        if config is None:
            raise ValueError(f"fusedrl_{mode}: config (verl's ActorConfig) is required")
        if rollout_is_weights is not None:
            raise ValueError(f"fusedrl_{mode}: rollout_is_weights (precomputed rollout-correction weights) are not "
                             "supported; pass the rollout log-probs to fusedrl.policy_loss(rollout_logp=...) instead")
        info = dict(config.global_batch_info or {})
        dp = info.get("dp_size", 1) or 1
        counts = {}
        if mode != "geo_mean":  # verl's geo_mean is a plain mean over rows whatever global_batch_info says
            counts = dict(num_tokens=info.get("batch_num_tokens"), num_sequences=info.get("global_batch_size"),
                          max_length=info.get("loss_scale_factor"))
        else:
            dp = 1
        loss, metrics = fusedrl.policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                            **_options(config, mode, loss_agg_mode), **counts)
        with torch.no_grad():
            m = response_mask.to(log_prob.dtype)
            ppo_kl = ((old_log_prob - log_prob.detach()) * m).sum() / m.sum().clamp(min=1)
        out = {"actor/pg_clipfrac": (metrics["clipfrac_low"] + metrics["clipfrac_high"]).item(),
               "actor/ppo_kl": ppo_kl.item()}
        if "clipfrac_dual" in metrics:
            out["actor/pg_clipfrac_lower"] = metrics["clipfrac_dual"].item()
        return loss * dp, out

    loss_fn.__name__ = f"fusedrl_{mode}"
    return loss_fn


def _group_ids(index, n: int, device) -> torch.Tensor:
    """verl's ``index`` (an array of uids, any hashable values) as int64 group ids [n]."""
    import numpy as np  # noqa: PLC0415

    if isinstance(index, torch.Tensor):
        index = index.cpu().numpy()
    index = np.asarray(index)
    if index.shape != (n,):
        raise ValueError(f"index must have one uid per response, shape ({n},), got {index.shape}")
    _, inverse = np.unique(index.astype(str) if index.dtype == object else index, return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64, device=device)


def advantage_fn(name: str):
    """verl advantage estimator ``name`` (grpo, rloo, opo, gpg, grpo_passk,
    reinforce_plus_plus_baseline) computed by :func:`fusedrl.group_advantages`; verl's signature,
    returns ``(advantages, returns)`` (the same tensor, as verl's outcome estimators)."""
    key = f"fusedrl_{name}"
    if key not in ADV_NAMES:
        raise ValueError(f"name must be one of {[v[0] for v in ADV_NAMES.values()]}, got {name!r}")
    estimator = ADV_NAMES[key][1]

    def fn(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None, epsilon: float = 1e-6,
           norm_adv_by_std_in_grpo: bool = True, config=None, f_norm: float = 1.0, alpha: float = 1.0, **_):
        if index is None:
            raise ValueError(f"{key}: index (the uid of each response's prompt) is required")
        if name == "gpg" and (f_norm != 1.0 or alpha != 1.0):
            raise ValueError(f"{key}: f_norm / alpha other than 1.0 are not supported (got {f_norm}, {alpha})")
        if name == "grpo_passk" and config is not None:  # verl's passk reads the switch from the config
            norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo", True)
        scores = token_level_rewards.sum(dim=-1)
        ids = _group_ids(index, scores.shape[0], scores.device)
        scale = "group" if norm_adv_by_std_in_grpo or name not in ("grpo", "grpo_passk") else "none"
        adv = fusedrl.group_advantages(scores, ids, estimator=estimator, scale=scale, eps=epsilon, mask=response_mask)
        return adv, adv

    fn.__name__ = key
    return fn


def _check_free(registry: dict, names, what: str) -> None:
    for name in names:
        current = registry.get(name)
        if current is not None and getattr(current, "__module__", None) != __name__:
            raise ValueError(f"verl {what} {name!r} is already registered by {current.__module__}")


def register() -> list[str]:
    """Adds the ``fusedrl_*`` policy losses (POLICY_LOSS_REGISTRY) and advantage estimators
    (ADV_ESTIMATOR_REGISTRY) to verl's registries; returns their names. A name already registered
    to something else raises a ValueError, and nothing is registered then."""
    _check_free(core_algos.POLICY_LOSS_REGISTRY, NAMES, "policy loss")
    _check_free(core_algos.ADV_ESTIMATOR_REGISTRY, ADV_NAMES, "advantage estimator")
    for name, mode in NAMES.items():
        core_algos.register_policy_loss(name)(policy_loss_fn(mode))
    for name, (verl_name, _) in ADV_NAMES.items():
        core_algos.ADV_ESTIMATOR_REGISTRY.pop(name, None)  # a previous register()'s function
        core_algos.register_adv_est(name)(advantage_fn(verl_name))
    return list(NAMES) + list(ADV_NAMES)


def unregister() -> None:
    """Removes the names :func:`register` added (only those whose function is fusedrl's)."""
    for registry, names in ((core_algos.POLICY_LOSS_REGISTRY, NAMES), (core_algos.ADV_ESTIMATOR_REGISTRY, ADV_NAMES)):
        for name in names:
            fn = registry.get(name)
            if fn is not None and getattr(fn, "__module__", None) == __name__:
                del registry[name]


# ---------------------------------------------------------------------------------------------
# value loss


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float, loss_agg_mode: str = "token-mean",
                       dp_size: int = 1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl 0.9.1's ``core_algos.compute_value_loss`` computed by :func:`fusedrl.value_loss`:
    the same signature, returns ``(vf_loss, vf_clipfrac)`` (0-dim tensors).

    ``vpreds`` are the critic's predictions (the gradient flows to them), ``values`` the rollout's
    values, clipped to ``values -+ cliprange_value`` with verl's tie convention
    (``clip_ties="verl"``). The loss is fusedrl's with verl's normalizers (``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor``; fully masked rows excluded from the seq-mean
    counts), times ``dp_size`` as verl's ``agg_loss``; without the global count of the mode, verl
    raises when ``dp_size > 1``, and so does this function. Where verl divides by a count of 0 (a
    fully masked micro-batch) it gives NaN; fusedrl gives 0. verl adds 1e-8 to the seq-mean-token-mean
    row counts and to the clipfrac's token count; fusedrl does not (1e-8 relative at most).
    """
    dp = int(dp_size.item()) if isinstance(dp_size, torch.Tensor) else (1 if dp_size is None else dp_size)
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")
    mode = loss_agg_mode if isinstance(loss_agg_mode, str) else ""
    if dp > 1 and mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp > 1 and mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    loss, metrics = fusedrl.value_loss(
        vpreds, values, returns, response_mask, clip=cliprange_value, clip_ties="verl", aggregation=loss_agg_mode,
        num_tokens=batch_num_tokens, num_sequences=global_batch_size, max_length=loss_scale_factor,
        exclude_empty_rows=True,
    )
    return loss * dp, metrics["clipfrac"].float()  # float32, as verl's (a mean of .float() flags)


def value_loss(config, model_output, data, dp_group=None):
    """verl 0.9.1's critic loss ``verl.workers.utils.losses.value_loss`` (the same steps, inputs and
    metrics) with :func:`compute_value_loss`; pass it to ``critic_wg.set_loss_fn`` (module docstring)."""
    from verl.utils.metric import AggregationType, Metric  # noqa: PLC0415
    from verl.workers.utils.padding import no_padding_2_padding  # noqa: PLC0415

    vpreds = no_padding_2_padding(model_output["values"], data)  # (bsz, response_length)
    dp_size = data["dp_size"]
    batch_num_tokens = data["batch_num_tokens"]
    global_batch_size = data["global_batch_size"]
    if (dp_size > 1 or batch_num_tokens is not None or global_batch_size is not None
            or config.loss_scale_factor is not None):
        metric_aggregation = AggregationType.SUM  # each micro-batch adds its share of the global mean
    else:
        metric_aggregation = AggregationType.MEAN
    data = data.select("values", "returns", "response_mask").to_padded_tensor()
    response_mask = data["response_mask"].to(bool)
    vf_loss, vf_clipfrac = compute_value_loss(
        vpreds=vpreds, values=data["values"], returns=data["returns"], response_mask=response_mask,
        cliprange_value=config.cliprange_value, loss_agg_mode=config.loss_agg_mode, dp_size=dp_size,
        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
        loss_scale_factor=config.loss_scale_factor,
    )
    with torch.no_grad():
        m = response_mask.to(vpreds.dtype)
        vpred_mean = (torch.where(response_mask, vpreds.detach(), 0.0) * m).sum() / (m.sum() + 1e-8)
    metrics = {
        "critic/vf_loss": Metric(value=vf_loss, aggregation=metric_aggregation),
        "critic/vf_clipfrac": vf_clipfrac.detach().item(),
        "critic/vpred_mean": vpred_mean.item(),
    }
    return vf_loss, metrics
