"""Presets: a TRL or verl user names their own loss and keeps their hyperparameter names.

Each preset returns a dict of :func:`fusedrl.policy_loss` keywords; normalizers stay explicit
keywords of ``policy_loss`` and are never hidden in a preset (TRL's ``num_items_in_batch`` is
``num_tokens=``, ``max_completion_length`` is ``max_length=``; verl's ``batch_num_tokens``,
``global_batch_size`` and ``loss_scale_factor`` are ``num_tokens`` / ``num_sequences`` /
``max_length``; ``dp_size`` is not a fusedrl argument, see "Scaling" in :func:`fusedrl.policy_loss`).

>>> import fusedrl, fusedrl.presets
>>> kw = fusedrl.presets.trl("dapo", epsilon=0.2, epsilon_high=0.28)
>>> loss, metrics = fusedrl.policy_loss(logp, old_logp, advantages, mask, **kw)  # doctest: +SKIP
>>> kw = fusedrl.presets.verl("gspo", "seq-mean-token-mean", clip_ratio_low=3e-4, clip_ratio_high=4e-4)
"""

from __future__ import annotations

__all__ = ["trl", "verl", "verl_kl", "TRL_LOSS_TYPES", "VERL_LOSS_MODES"]

# TRL GRPOTrainer._compute_loss (trl 1.16): loss_type -> the aggregation of its per-token loss.
TRL_LOSS_TYPES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
    "luspo": "seq-mean-token-sum",
    "vespo": "token-mean",
}

VERL_LOSS_MODES = ("vanilla", "gspo", "gpg", "cispo", "sapo", "geo_mean")
VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# verl core_algos.kl_penalty names -> fusedrl kinds (verl's "k3" is the clamped low_var_kl).
_VERL_KL = {
    "kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl", "k3": "low_var_kl",
}

_NORMALIZER_HINTS = {
    "num_items_in_batch": "num_tokens=",
    "max_completion_length": "max_length=",
    "batch_num_tokens": "num_tokens=",
    "global_batch_size": "num_sequences=",
    "loss_scale_factor": "max_length=",
    "dp_size": "nothing: fusedrl = verl(dp_size=D) / D (see fusedrl.policy_loss, 'Scaling')",
    "gradient_accumulation_steps": "num_sequences= / num_tokens= scaled by the accumulation steps",
    "current_gradient_accumulation_steps": "num_sequences= / num_tokens= scaled by the accumulation steps",
    "steps_per_generation": "num_tokens= (see fusedrl.policy_loss, 'Scaling')",
    "num_processes": "num_tokens= (see fusedrl.policy_loss, 'Scaling')",
}


def _reject(preset: str, others: dict, accepted: tuple[str, ...]) -> None:
    for name in others:
        if name in _NORMALIZER_HINTS:
            raise TypeError(
                f"presets.{preset}: {name} is a normalizer; pass {_NORMALIZER_HINTS[name]} to policy_loss instead"
            )
        raise TypeError(f"presets.{preset}: unsupported option {name!r}; accepted: {', '.join(accepted)}")


def verl_kl(name: str) -> str:
    """The fusedrl ``kl`` kind of a verl ``kl_penalty`` / ``kl_loss_type`` name: ``"kl"`` and ``"k1"``
    -> ``"k1"``, ``"mse"`` and ``"k2"`` -> ``"k2"``, ``"abs"``, ``"k3"`` and ``"low_var_kl"`` ->
    ``"low_var_kl"`` (verl clamps its k3); a trailing ``"+"`` (straight-through) is kept."""
    if not isinstance(name, str):
        raise TypeError(f"kl must be a verl kl_penalty name (str), got {type(name).__name__}")
    base, plus = (name[:-1], "+") if name.endswith("+") else (name, "")
    if base not in _VERL_KL:
        raise ValueError(f"kl must be a verl kl_penalty name, one of {tuple(_VERL_KL)} (optionally with '+'), got {name!r}")
    return _VERL_KL[base] + plus


def trl(
    loss_type: str,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = True,
    beta: float = 0.0,
    kl: str = "k3",
    entropy=None,
    entropy_coef: float = 0.0,
    vllm_importance_sampling_correction: bool = False,
    vllm_importance_sampling_mode: str = "sequence_mask",
    vllm_importance_sampling_clip_max: float | None = 3.0,
    vllm_importance_sampling_clip_min: float | None = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    top_entropy_quantile: float = 1.0,
    **others,
) -> dict:
    """:func:`fusedrl.policy_loss` keywords reproducing TRL's ``GRPOTrainer`` loss (trl 1.16).

    Defaults are ``GRPOConfig``'s. ``loss_type``: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo,
    vespo (aggregations in ``TRL_LOSS_TYPES``; vespo's ``vespo_k_pos`` / ``_lambda_pos`` /
    ``_k_neg`` / ``_lambda_neg`` are passed as they are); ``importance_sampling_level``: token or
    sequence (vespo: token); ``off_policy_mask_threshold`` and ``top_entropy_quantile`` (which needs
    ``entropy``) are passed as they are;
    ``epsilon`` / ``epsilon_high`` -> ``clip_low`` / ``clip_high``, except for cispo, whose TRL
    bound is the raw ``epsilon_high`` above only (``clip_high = epsilon_high - 1``,
    ``cispo_bounds="upper"``); ``delta`` (two-sided clip); ``sapo_temperature_pos/neg`` ->
    ``tau_pos/neg``; ``use_bias_correction_kl`` (TRL's default True: the KL term is multiplied by
    the ratio). TRL's entropy bonus is a token mean whatever the loss type:
    ``entropy_aggregation="token-mean"``. With ``vllm_importance_sampling_correction=True`` the
    ``vllm_importance_sampling_mode`` / ``_clip_max`` / ``_clip_min`` become ``rollout_correction``
    / ``rollout_cap`` / ``rollout_cap_low`` (pass ``rollout_logp=`` the sampler's log-probs).
    ``beta``, ``kl``, ``entropy`` and ``entropy_coef`` are passed straight through.

    Normalizers are ``policy_loss`` keywords: ``num_items_in_batch`` -> ``num_tokens``,
    ``max_completion_length`` -> ``max_length`` (``dr_grpo``), accumulation steps -> see
    "Scaling" in :func:`fusedrl.policy_loss`.
    """
    _reject("trl", others, tuple(trl.__kwdefaults__))
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {tuple(TRL_LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    high = epsilon if epsilon_high is None else epsilon_high
    kw = dict(
        surrogate="clip",
        ratio=importance_sampling_level,
        clip_low=epsilon,
        clip_high=high,
        delta=delta,
        aggregation=TRL_LOSS_TYPES[loss_type],
        beta=beta,
        kl=kl,
        use_bias_correction_kl=use_bias_correction_kl,
        entropy_coef=entropy_coef,
        entropy_aggregation="token-mean",
    )
    if entropy is not None:
        kw["entropy"] = entropy
    if off_policy_mask_threshold is not None:
        kw["off_policy_mask_threshold"] = off_policy_mask_threshold
    if top_entropy_quantile != 1.0:
        kw["top_entropy_quantile"] = top_entropy_quantile
    if loss_type == "cispo":
        kw.update(surrogate="cispo", clip_high=high - 1.0, cispo_bounds="upper", delta=None)
    elif loss_type == "sapo":
        kw.update(surrogate="sapo", tau_pos=sapo_temperature_pos, tau_neg=sapo_temperature_neg, delta=None)
    elif loss_type == "vespo":
        if importance_sampling_level != "token":
            raise ValueError("loss_type='vespo' computes its own sequence weight: importance_sampling_level must be "
                             f"'token', got {importance_sampling_level!r}")
        kw.update(surrogate="vespo", delta=None, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
                  vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    if vllm_importance_sampling_correction and loss_type == "vespo":
        raise ValueError("loss_type='vespo' with vllm_importance_sampling_correction: TRL folds the sampler's weights "
                         "into VESPO's sequence weight, which fusedrl does not support")
    if vllm_importance_sampling_correction:
        modes = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
        if vllm_importance_sampling_mode not in modes:
            raise ValueError(f"vllm_importance_sampling_mode must be one of {modes}, got {vllm_importance_sampling_mode!r}")
        kw.update(
            rollout_correction=vllm_importance_sampling_mode,
            rollout_cap=vllm_importance_sampling_clip_max,
            rollout_cap_low=vllm_importance_sampling_clip_min,
        )
    return kw


def verl(
    loss_mode: str,
    loss_agg_mode: str = "token-mean",
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float = 3.0,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    use_kl_loss: bool = False,
    kl_loss_coef: float = 0.001,
    kl_loss_type: str = "low_var_kl",
    beta: float | None = None,
    kl: str | None = None,
    entropy=None,
    entropy_coeff: float = 0.0,
    entropy_coef: float | None = None,
    rollout_is: str | None = None,
    rollout_is_threshold: float | str = 2.0,
    **others,
) -> dict:
    """:func:`fusedrl.policy_loss` keywords reproducing verl's actor loss (verl 0.9.1), divided by
    ``dp_size`` (fusedrl's losses add up over ranks; verl multiplies by ``dp_size``).

    ``loss_mode`` (verl ``policy_loss.loss_mode``): vanilla (PPO clip with the dual clip
    ``clip_ratio_c``, default 3.0), gspo (``ratio="sequence-token"``), gpg (``surrogate="gpg"``),
    cispo (clipped on both sides), sapo (always ``seq-mean-token-mean``, as verl), geo_mean (a mean
    over rows whatever ``loss_agg_mode``, as verl). ``loss_agg_mode`` -> ``aggregation`` with verl's
    rule that fully masked rows do not count (``exclude_empty_rows=True``; for geo_mean every row
    counts, as verl's ``torch.mean``; so with geo_mean, a seq-mean ``loss_agg_mode``, an entropy or
    KL term and fully masked rows, those two terms count the empty rows where verl does not). ``clip_ratio_low`` / ``clip_ratio_high`` default to
    ``clip_ratio``. The KL loss (``use_kl_loss``, ``kl_loss_coef`` -> ``beta``, ``kl_loss_type``)
    and the entropy bonus (``entropy_coeff``) are aggregated by ``loss_agg_mode`` on their own, as
    verl's actor does (``kl_aggregation`` / ``entropy_aggregation``). fusedrl's ``beta`` / ``kl`` /
    ``entropy`` / ``entropy_coef`` are accepted too; KL names are verl's (:func:`verl_kl`: verl's
    ``"k3"`` is fusedrl's ``"low_var_kl"``). Rollout correction (verl ``rollout_is`` and
    ``rollout_is_threshold``): "token" / "sequence" with a float cap -> ``token_truncate`` /
    ``sequence_truncate``; with a ``"lower_upper"`` string -> ``icepop`` / ``sequence_mask`` with
    both bounds (pass ``rollout_logp=``).

    Normalizers are ``policy_loss`` keywords: ``batch_num_tokens`` -> ``num_tokens``,
    ``global_batch_size`` -> ``num_sequences``, ``loss_scale_factor`` -> ``max_length``.
    """
    _reject("verl", others, tuple(verl.__kwdefaults__))
    if loss_mode not in VERL_LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {VERL_LOSS_MODES}, got {loss_mode!r}")
    if loss_agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {VERL_AGG_MODES}, got {loss_agg_mode!r}")
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    kw = dict(
        surrogate="clip",
        ratio="token",
        clip_low=low,
        clip_high=high,
        aggregation=loss_agg_mode,
        exclude_empty_rows=True,
        kl_aggregation=loss_agg_mode,
        entropy_aggregation=loss_agg_mode,
    )
    if loss_mode == "vanilla":
        kw["clip_ratio_c"] = clip_ratio_c
    elif loss_mode == "gspo":
        kw["ratio"] = "sequence-token"
    elif loss_mode == "gpg":
        kw["surrogate"] = "gpg"
    elif loss_mode == "cispo":
        kw.update(surrogate="cispo", cispo_bounds="both")
    elif loss_mode == "sapo":
        kw.update(surrogate="sapo", tau_pos=tau_pos, tau_neg=tau_neg, aggregation="seq-mean-token-mean")
    elif loss_mode == "geo_mean":
        kw.update(surrogate="geo_mean", aggregation="seq-mean-token-mean", exclude_empty_rows=False)

    if beta is not None:
        kw["beta"] = beta
    elif use_kl_loss:
        kw["beta"] = kl_loss_coef
    if kl is not None:
        kw["kl"] = verl_kl(kl)
    elif use_kl_loss or beta is not None:
        kw["kl"] = verl_kl(kl_loss_type)
    if entropy is not None:
        kw["entropy"] = entropy
    kw["entropy_coef"] = entropy_coeff if entropy_coef is None else entropy_coef

    if rollout_is is not None:
        if rollout_is not in ("token", "sequence"):
            raise ValueError(f"rollout_is must be 'token', 'sequence' or None, got {rollout_is!r}")
        lower, upper = _verl_threshold(rollout_is_threshold)
        if lower is None:
            kw.update(rollout_correction=f"{rollout_is}_truncate", rollout_cap=upper, rollout_cap_low=None)
        else:
            mode = "icepop" if rollout_is == "token" else "sequence_mask"
            kw.update(rollout_correction=mode, rollout_cap=upper, rollout_cap_low=lower)
    return kw


def _verl_threshold(spec) -> tuple[float | None, float]:
    """verl's ``rollout_is_threshold``: a float (upper cap) or a ``"lower_upper"`` string."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a float or a 'lower_upper' string, got {type(spec).__name__}")
    if isinstance(spec, str) and "_" in spec:
        lower, upper = spec.split("_", 1)
        try:
            return float(lower), float(upper)
        except ValueError:
            raise ValueError(f"rollout_is_threshold must be a float or a 'lower_upper' string, got {spec!r}") from None
    try:
        return None, float(spec)
    except ValueError:
        raise ValueError(f"rollout_is_threshold must be a float or a 'lower_upper' string, got {spec!r}") from None
