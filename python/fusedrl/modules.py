r"""``torch.nn.Module`` losses: thin wrappers that store options and call the public functions.

- :class:`PolicyLoss` stores keyword options of :func:`fusedrl.policy_loss`;
- :class:`GRPOLoss` is a :class:`PolicyLoss` built from TRL's ``GRPOConfig`` names and defaults
  through :func:`fusedrl.presets.trl`;
- :class:`DPOLoss` stores keyword options of :func:`fusedrl.preference_loss`;
- :class:`ValueLoss` stores keyword options of :func:`fusedrl.value_loss` (the PPO critic's loss).

No math lives here: ``forward`` calls the function with the stored options and returns what it
returns, ``(loss, metrics)``. Options are validated when the module is built (by a dry call of the
function on tiny tensors, so the checks and their messages are the function's own: an error names
the option). Tensors that change with every batch (reference log-probs, lengths, entropies, ...)
and the global normalizers (``num_tokens``, ``num_sequences``, ...) are passed to ``forward``.

>>> loss_fn = fusedrl.GRPOLoss(loss_type="dapo", epsilon_high=0.28)
>>> loss, metrics = loss_fn(logp, old_logp, advantages, mask, num_tokens=global_tokens)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from fusedrl import dispatch, presets
from fusedrl.policy import policy_loss
from fusedrl.preference import preference_loss
from fusedrl.value import value_loss

__all__ = ["PolicyLoss", "GRPOLoss", "DPOLoss", "LinearPolicyLoss", "ValueLoss"]


def _keyword_options(fn) -> tuple[str, ...]:
    return tuple(n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _relabel(owner: str, call):
    """Run ``call()``; a ValueError / TypeError it raises is re-raised prefixed by ``owner``."""
    try:
        return call()
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{owner}: {exc}") from exc


def _check_backend(owner: str, options: dict) -> None:
    """The backend name is checked here; whether it can run is decided per call (device, dtype)."""
    backend = options.get("backend")
    if backend is not None:
        _relabel(owner, lambda: dispatch.requested_backend(backend))


def _split_call(owner: str, per_call: dict, allowed: tuple[str, ...], options: tuple[str, ...]) -> None:
    for name in per_call:
        if name not in allowed:
            if name in options:
                raise TypeError(
                    f"{owner}.forward: {name} is an option of the module: set it when building the module, "
                    f"not per call (per-call keywords: {', '.join(allowed)})"
                )
            raise TypeError(f"{owner}.forward: unexpected keyword {name!r} (per-call keywords: {', '.join(allowed)})")


def _options_repr(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


# ---------------------------------------------------------------------------------------------
# policy loss

#: Tensors of :func:`fusedrl.policy_loss` that ``forward`` takes per call, besides the four positional ones.
POLICY_CALL_TENSORS = ("ref_logp", "rollout_logp", "entropy", "group_ids")
#: Normalizers: options of the module (defaults) that ``forward`` may override per call.
POLICY_COUNTS = ("num_tokens", "num_sequences", "max_length", "num_groups")
POLICY_OPTIONS = tuple(n for n in _keyword_options(policy_loss) if n not in POLICY_CALL_TENSORS)
_POSITIONAL = ("logp", "old_logp", "advantages", "mask")


def _validate_policy_options(owner: str, options: dict) -> dict:
    for name in options:
        if name in POLICY_CALL_TENSORS or name in _POSITIONAL:
            raise TypeError(f"{owner}: {name} is a per-call tensor; pass it to forward(), not to the constructor")
        if name not in POLICY_OPTIONS:
            hint = ""
            if name in presets.trl.__kwdefaults__ or name == "loss_type":
                hint = " (a TRL GRPOConfig name: use fusedrl.GRPOLoss(...) or PolicyLoss(**fusedrl.presets.trl(...)))"
            elif name in presets.verl.__kwdefaults__ or name in ("loss_mode", "loss_agg_mode"):
                hint = " (a verl name: use PolicyLoss(**fusedrl.presets.verl(...)))"
            raise TypeError(f"{owner}: unknown option {name!r}{hint}; options: {', '.join(POLICY_OPTIONS)}")
    _check_backend(owner, options)
    # Dry call on a tiny batch holding every optional tensor, so that options needing a per-call
    # tensor (beta needs ref_logp, ...) pass here and are checked again at call time.
    B, T = 2, 2
    z = torch.zeros(B, T, dtype=torch.float64)
    tiny = dict(ref_logp=z, rollout_logp=z, entropy=torch.ones(B, T, dtype=torch.float64), group_ids=torch.arange(B))
    dry = {k: v for k, v in options.items() if k != "backend"}
    advantages, mask = torch.ones(B, dtype=torch.float64), torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():
        _relabel(owner, lambda: policy_loss(z, z, advantages, mask, **tiny, **dry))
    return dict(options)


class PolicyLoss(nn.Module):
    r"""The policy-gradient loss :func:`fusedrl.policy_loss` as a module.

    ``PolicyLoss(**options)`` takes any keyword option of :func:`fusedrl.policy_loss` (``surrogate``,
    ``ratio``, ``clip_low``, ``clip_high``, ``beta``, ``kl``, ``aggregation``, ...; see its docstring
    for the math), validated at construction: a bad value raises the function's ValueError /
    TypeError, naming the option. A TRL or verl user builds it from a preset:
    ``PolicyLoss(**fusedrl.presets.verl("gspo", "seq-mean-token-mean"))``.

    ``forward(logp, old_logp, advantages, mask, **per_call)`` returns ``(loss, metrics)`` exactly as
    ``fusedrl.policy_loss(logp, old_logp, advantages, mask, **options, **per_call)``. Per-call
    keywords: the tensors ``ref_logp``, ``rollout_logp``, ``entropy``, ``group_ids`` and the
    normalizers ``num_tokens``, ``num_sequences``, ``max_length``, ``num_groups`` (a normalizer given
    at construction is a default that a per-call value overrides; pass global counts per call so that
    micro-batches and ranks add up, see "Scaling" in :func:`fusedrl.policy_loss`).

    The module holds no parameters or buffers. ``options`` returns a copy of the stored options.
    """

    def __init__(self, **options):
        super().__init__()
        self._options = _validate_policy_options(type(self).__name__, options)

    @property
    def options(self) -> dict:
        """The stored keyword options of :func:`fusedrl.policy_loss` (a copy)."""
        return dict(self._options)

    def forward(self, logp, old_logp, advantages, mask, **per_call):
        _split_call(type(self).__name__, per_call, POLICY_CALL_TENSORS + POLICY_COUNTS, POLICY_OPTIONS)
        return policy_loss(logp, old_logp, advantages, mask, **{**self._options, **per_call})

    def extra_repr(self) -> str:
        return _options_repr(self._options)


# TRL GRPOConfig (trl 1.16.0) field defaults of the names presets.trl accepts, plus use_vllm.
_TRL_GRPO_DEFAULTS = dict(
    loss_type="dapo",
    epsilon=0.2,
    epsilon_high=None,
    delta=None,
    importance_sampling_level="token",
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    use_bias_correction_kl=True,
    beta=0.0,
    entropy_coef=0.0,
    use_vllm=False,
    vllm_importance_sampling_correction=True,
    vllm_importance_sampling_mode="sequence_mask",
    vllm_importance_sampling_clip_max=3.0,
    vllm_importance_sampling_clip_min=None,
)

# policy_loss options that GRPOLoss derives from TRL names: set them through the TRL name.
_TRL_DERIVED = dict(
    clip_low="epsilon",
    clip_high="epsilon_high",
    ratio="importance_sampling_level",
    surrogate="loss_type",
    aggregation="loss_type",
    cispo_bounds="loss_type",
    tau_pos="sapo_temperature_pos",
    tau_neg="sapo_temperature_neg",
    rollout_correction="use_vllm / vllm_importance_sampling_mode",
    rollout_cap="vllm_importance_sampling_clip_max",
    rollout_cap_low="vllm_importance_sampling_clip_min",
)

# policy_loss option -> the TRL name it comes from (to name it in errors).
_TRL_SOURCES = dict(
    clip_low="epsilon",
    clip_high="epsilon_high",
    tau_pos="sapo_temperature_pos",
    tau_neg="sapo_temperature_neg",
    rollout_cap="vllm_importance_sampling_clip_max",
    rollout_cap_low="vllm_importance_sampling_clip_min",
)


class GRPOLoss(PolicyLoss):
    r""":class:`PolicyLoss` with TRL's ``GRPOTrainer`` loss and ``GRPOConfig`` defaults (trl 1.16.0).

    ``GRPOLoss(**overrides)`` takes TRL's names, with ``GRPOConfig``'s defaults:
    ``loss_type="dapo"`` (TRL's default, not ``"grpo"``: a token mean normalized by TRL's
    ``num_items_in_batch``, i.e. pass ``num_tokens=`` the global token count to ``forward``),
    ``epsilon=0.2``, ``epsilon_high=None`` (= ``epsilon``), ``delta=None``,
    ``importance_sampling_level="token"``, ``beta=0.0``, ``use_bias_correction_kl=True``,
    ``sapo_temperature_pos=1.0``, ``sapo_temperature_neg=1.05``, ``entropy_coef=0.0``, and the vLLM
    importance-sampling correction (``vllm_importance_sampling_correction=True``,
    ``vllm_importance_sampling_mode="sequence_mask"``, ``vllm_importance_sampling_clip_max=3.0``,
    ``vllm_importance_sampling_clip_min=None``), which TRL applies only with ``use_vllm=True``
    (default False) and so does this module (then pass ``rollout_logp=`` the sampler's log-probs).
    The defaults are in ``GRPOLoss.TRL_DEFAULTS``; they are translated by
    :func:`fusedrl.presets.trl`, whose docstring gives the mapping.

    Other :func:`fusedrl.policy_loss` options are accepted too (``kl``, ``log_ratio_clamp``,
    ``max_length`` for ``dr_grpo`` = TRL's ``max_completion_length``, ...), except those derived
    from a TRL name (``clip_low`` comes from ``epsilon``, ``aggregation`` from ``loss_type``, ...):
    those raise a TypeError naming the TRL option to use. ``trl_options`` holds the TRL-named
    settings after overrides; ``options`` the resulting ``policy_loss`` keywords.
    """

    TRL_VERSION = "1.16.0"
    TRL_DEFAULTS = dict(_TRL_GRPO_DEFAULTS)

    def __init__(self, **overrides):
        owner = type(self).__name__
        trl_names = set(self.TRL_DEFAULTS) | {"kl"}
        trl_kw = {**self.TRL_DEFAULTS, **{k: v for k, v in overrides.items() if k in trl_names}}
        extra = {k: v for k, v in overrides.items() if k not in trl_names}
        for name in extra:
            if name in _TRL_DERIVED:
                raise TypeError(f"{owner}: {name} is set from TRL's {_TRL_DERIVED[name]}; pass that instead")
            if name in presets._NORMALIZER_HINTS:
                raise TypeError(f"{owner}: {name} is a normalizer; pass {presets._NORMALIZER_HINTS[name]} to forward()")
        use_vllm = trl_kw.pop("use_vllm")
        if not isinstance(use_vllm, bool):
            raise TypeError(f"{owner}: use_vllm must be a bool, got {type(use_vllm).__name__}")
        preset_kw = dict(trl_kw)
        preset_kw["vllm_importance_sampling_correction"] = use_vllm and trl_kw["vllm_importance_sampling_correction"]
        options = _relabel(owner, lambda: presets.trl(**preset_kw))
        options.update(extra)
        try:
            super().__init__(**options)
        except (ValueError, TypeError) as exc:  # name the TRL option behind a derived one
            sources = [f"{trl}={trl_kw[trl]!r}" for derived, trl in _TRL_SOURCES.items()
                       if trl in overrides and re.search(rf"\b{derived}\b", str(exc))]
            if not sources:
                raise
            raise type(exc)(f"{exc} (set from TRL's {', '.join(sources)})") from exc
        self.trl_options = {**trl_kw, "use_vllm": use_vllm}


# ---------------------------------------------------------------------------------------------
# preference loss

#: Tensors of :func:`fusedrl.preference_loss` that ``forward`` takes per call (``soft_labels`` may
#: also be a number option of the module).
DPO_CALL_TENSORS = ("chosen_lengths", "rejected_lengths", "weights", "soft_labels")
DPO_OPTIONS = tuple(n for n in _keyword_options(preference_loss) if n not in DPO_CALL_TENSORS[:3])
_DPO_POSITIONAL = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _validate_dpo_options(owner: str, options: dict) -> dict:
    for name in options:
        if name in DPO_CALL_TENSORS[:3] or name in _DPO_POSITIONAL:
            raise TypeError(f"{owner}: {name} is a per-call tensor; pass it to forward(), not to the constructor")
        if name not in DPO_OPTIONS:
            raise TypeError(f"{owner}: unknown option {name!r}; options: {', '.join(DPO_OPTIONS)}")
    if isinstance(options.get("soft_labels"), torch.Tensor):
        raise TypeError(f"{owner}: soft_labels as a tensor is per call (pass it to forward()); a number is an option")
    _check_backend(owner, options)
    B = 2
    pc = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    pr = torch.tensor([-2.0, -1.5], dtype=torch.float64)
    lengths = torch.ones(B, dtype=torch.float64)
    dry = {k: v for k, v in options.items() if k != "backend"}
    with torch.no_grad():
        _relabel(owner, lambda: preference_loss(pc, pr, pc - 0.5, pr - 0.5, chosen_lengths=lengths,
                                                rejected_lengths=lengths, **dry))
    return {k: (list(v) if isinstance(v, list) else v) for k, v in options.items()}


class DPOLoss(nn.Module):
    r"""The pairwise preference loss :func:`fusedrl.preference_loss` (DPO family) as a module.

    ``DPOLoss(**options)`` takes any option of :func:`fusedrl.preference_loss` with TRL
    ``DPOConfig``'s names and defaults (``loss_type="sigmoid"`` or a list, ``beta=0.1``,
    ``label_smoothing=0.0``, ``loss_weights``, ``f_divergence_type``, ``discopop_tau``, SimPO's
    ``gamma``, ``rpo_alpha``, ``soft_labels`` as a number, ...), validated at construction (errors
    name the option).

    ``forward(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
    ref_rejected_logps=None, **per_call)`` returns ``(loss, metrics)`` exactly as the function;
    per-call keywords: ``chosen_lengths``, ``rejected_lengths`` (required by ipo, sigmoid_norm,
    sft, simpo, rpo_alpha), ``weights``, ``soft_labels`` (a tensor, or a number overriding the
    module's). The reduction is the mean over the pairs of the call (see :mod:`fusedrl.preference`).
    """

    def __init__(self, **options):
        super().__init__()
        self._options = _validate_dpo_options(type(self).__name__, options)

    @property
    def options(self) -> dict:
        """The stored keyword options of :func:`fusedrl.preference_loss` (a copy)."""
        return dict(self._options)

    def forward(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                **per_call):
        _split_call(type(self).__name__, per_call, DPO_CALL_TENSORS, DPO_OPTIONS)
        return preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               **{**self._options, **per_call})

    def extra_repr(self) -> str:
        return _options_repr(self._options)


class LinearPolicyLoss(PolicyLoss):
    r"""The policy loss straight from hidden states and the language-model head, never holding
    ``[N, V]`` logits: ``policy_loss(linear_logprobs(hidden, weight, labels, ...), old_logp, ...)``.

    Args:
        temperature: applied to the logits of the policy and of the reference (> 0).
        chunk_size: tokens per chunk of :func:`fusedrl.linear_logprobs` (None: about 128 MiB of
            logits per chunk, at least 512 tokens).
        **options: keyword options of :func:`fusedrl.policy_loss` (as :class:`PolicyLoss`).

    ``forward(hidden, weight, labels, old_logp, advantages, mask, *, bias=None, ref_hidden=None,
    ref_weight=None, ref_bias=None, ref_logp=None, rollout_logp=None, **per_call)`` ->
    ``(loss, metrics)``: ``hidden`` is ``[B, T, H]``, ``weight`` ``[V, H]``, ``labels`` ``[B, T]``
    (padded positions, ``mask == 0``, are skipped by the kernel). The reference log-probs come
    either precomputed (``ref_logp``) or from the reference model's hidden states and head
    (``ref_hidden``, ``ref_weight`` (default: ``weight``), ``ref_bias``), chunked the same way, at
    the same temperature, without gradient. Entropies are computed in the same pass when the
    options use them (``entropy_coef`` != 0 or ``hybrid_mixing="entropy"``). Gradients flow to
    ``hidden``, ``weight`` and ``bias``.

    Two paths, the same numbers. Single pass (``single_pass=None`` picks it whenever it applies):
    when d loss / d logp of a token depends on that token alone (``ratio="token"``, a surrogate
    other than geo_mean, a token-level rollout correction: any aggregation), each chunk's gradient
    is taken while its logits exist, so each chunk costs three GEMMs (logits, d hidden, d weight)
    and the backward only scales the stored gradients. Otherwise (sequence-level ratios couple the
    tokens of a row, and rows may span chunks) the general path: log-probs for all tokens first,
    and the backward recomputes each chunk's logits (four GEMMs per chunk).
    """

    def __init__(self, *, temperature: float = 1.0, chunk_size: int | None = None, ignore_index: int = -100,
                 single_pass: bool | None = None, **options):
        super().__init__(**options)
        from fusedrl import _validate as check  # noqa: PLC0415

        owner = type(self).__name__
        self.temperature = _relabel(owner, lambda: check.positive_float("temperature", temperature))
        self.ignore_index = _relabel(owner, lambda: check.integer("ignore_index", ignore_index))
        if chunk_size is not None and _relabel(owner, lambda: check.integer("chunk_size", chunk_size)) < 1:
            raise ValueError(f"{owner}: chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        from fusedrl.linear import single_pass_declines  # noqa: PLC0415

        why = single_pass_declines(self._options)
        if single_pass and why is not None:
            raise ValueError(f"{owner}: single_pass=True does not apply to these options: {why}")
        self.single_pass = why is None if single_pass is None else bool(single_pass)

    def _logps(self, hidden, weight, labels, bias, entropy: bool):
        from fusedrl.linear import linear_logprobs  # noqa: PLC0415

        return linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=self.temperature, ignore_index=self.ignore_index,
            return_entropy=entropy, chunk_size=self.chunk_size, backend=self._options.get("backend"),
        )

    def forward(self, hidden, weight, labels, old_logp, advantages, mask, *, bias=None, ref_hidden=None,
                ref_weight=None, ref_bias=None, ref_logp=None, **per_call):
        owner = type(self).__name__
        if not isinstance(mask, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError(f"{owner}.forward: labels and mask must be tensors")
        if mask.shape != labels.shape:
            raise ValueError(f"{owner}.forward: mask must have the shape of labels {tuple(labels.shape)}, got {tuple(mask.shape)}")
        labels = labels.masked_fill(mask == 0, self.ignore_index)  # padding: the kernel skips the row
        if ref_hidden is not None:
            if ref_logp is not None:
                raise ValueError(f"{owner}.forward: pass ref_logp or ref_hidden, not both")
            with torch.no_grad():
                ref_logp = self._logps(ref_hidden, weight if ref_weight is None else ref_weight, labels, ref_bias, False)
        elif ref_weight is not None or ref_bias is not None:
            raise ValueError(f"{owner}.forward: ref_weight and ref_bias need ref_hidden")
        if self.single_pass:
            out = self._single_pass(hidden, weight, labels, old_logp, advantages, mask, bias, ref_logp, dict(per_call))
            if out is not None:
                return out
        wants_entropy = self._options.get("entropy_coef", 0.0) != 0.0 or self._options.get("hybrid_mixing") == "entropy"
        out = self._logps(hidden, weight, labels, bias, wants_entropy)
        logp, entropy = out if wants_entropy else (out, None)
        if ref_logp is not None:
            per_call["ref_logp"] = ref_logp
        if entropy is not None:
            per_call["entropy"] = entropy
        return super().forward(logp, old_logp, advantages, mask, **per_call)

    def _single_pass(self, hidden, weight, labels, old_logp, advantages, mask, bias, ref_logp, per_call):
        """The single-pass path, or None when the kernel backends decline these tensors (then the
        general path runs, on whichever backend accepts them)."""
        from fusedrl.linear import single_pass_policy_loss  # noqa: PLC0415
        from fusedrl.ops import logprobs as op  # noqa: PLC0415

        owner = type(self).__name__
        _split_call(owner, per_call, POLICY_CALL_TENSORS + POLICY_COUNTS, POLICY_OPTIONS)
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"{owner}.forward: hidden must be a torch.Tensor, got {type(hidden).__name__}")
        backend = dispatch.select("linear_logprobs", op.BACKENDS, hidden.device, hidden.dtype, self._options.get("backend"))
        if backend == "torch" or "entropy" in per_call:
            return None
        options = {k: v for k, v in self._options.items() if k not in POLICY_COUNTS}
        tensors = {k: self._options[k] for k in POLICY_COUNTS if self._options.get(k) is not None}
        tensors.update(per_call)
        tensors["ref_logp"] = ref_logp
        return single_pass_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, bias=bias, temperature=self.temperature,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size, options=options, tensors=tensors,
            backend=backend,
        )


# ---------------------------------------------------------------------------------------------
# value loss

#: Normalizers of :func:`fusedrl.value_loss`: options of the module that ``forward`` may override per call.
VALUE_COUNTS = ("num_tokens", "num_sequences", "max_length")
VALUE_OPTIONS = _keyword_options(value_loss)
_VALUE_POSITIONAL = ("values", "old_values", "returns", "mask")


def _validate_value_options(owner: str, options: dict) -> dict:
    for name in options:
        if name in _VALUE_POSITIONAL or name == "cu_seqlens":
            raise TypeError(f"{owner}: {name} is a per-call tensor; pass it to forward(), not to the constructor")
        if name not in VALUE_OPTIONS:
            raise TypeError(f"{owner}: unknown option {name!r}; options: {', '.join(VALUE_OPTIONS)}")
    _check_backend(owner, options)
    z = torch.zeros(2, 2, dtype=torch.float64)
    dry = {k: v for k, v in options.items() if k != "backend"}
    with torch.no_grad():
        _relabel(owner, lambda: value_loss(z, z, z, torch.ones(2, 2, dtype=torch.bool), **dry))
    return dict(options)


class ValueLoss(nn.Module):
    r"""The clipped value loss :func:`fusedrl.value_loss` as a module.

    ``ValueLoss(**options)`` takes the keyword options of :func:`fusedrl.value_loss` (``clip``,
    ``clip_ties``, ``aggregation``, ``exclude_empty_rows``, default normalizers, ``backend``),
    validated at construction (errors name the option). ``forward(values, old_values, returns, mask,
    **per_call)`` returns ``(loss, metrics)`` exactly as the function; per-call keywords: the
    normalizers ``num_tokens``, ``num_sequences``, ``max_length`` (overriding the module's) and
    ``cu_seqlens``. OpenRLHF's ``ValueLoss(clip_eps)`` is ``ValueLoss(clip=clip_eps)`` (its
    ``token_level_loss=False`` is ``aggregation="seq-mean-token-mean", exclude_empty_rows=True``).
    """

    def __init__(self, **options):
        super().__init__()
        self._options = _validate_value_options(type(self).__name__, options)

    @property
    def options(self) -> dict:
        """The stored keyword options of :func:`fusedrl.value_loss` (a copy)."""
        return dict(self._options)

    def forward(self, values, old_values, returns, mask, **per_call):
        _split_call(type(self).__name__, per_call, VALUE_COUNTS + ("cu_seqlens",), VALUE_OPTIONS)
        return value_loss(values, old_values, returns, mask, **{**self._options, **per_call})

    def extra_repr(self) -> str:
        return _options_repr(self._options)
