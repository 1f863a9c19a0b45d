"""Per-token log-probs of Hugging Face causal LMs without their ``[B, T, V]`` logits.

:func:`token_logprobs` runs the model's backbone, then :func:`fusedrl.linear_logprobs` on the last
hidden state and the LM head's weight, scoring only the positions whose next-token label is not
``ignore_index`` (prompt and padding tokens are skipped). :func:`add_fused_head` gives one model
instance a ``model(..., labels=labels, fused_lm_head=True)`` forward that returns those log-probs
(the interface of TRL 1.16's ``add_fused_lm_head``, which TRL's trainers call); the handle it
returns restores the previous forward. Nothing is patched globally. Its ``statistics`` are the
no-gradient per-token fields of TRL's fused head that trainers log or weight with (``mean_logits``,
``is_top1``, ``log_sum_sq_probs``), computed from the same hidden states in chunks of tokens.

Logit scaling follows the model config as TRL's fused head reads it: ``logit_scale`` (Cohere),
``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1) multiply the logits, ``logits_scaling``
(Granite, MiniCPM3) divides them (HyperCLOVA X multiplies); the scale s folds into the temperature
(softmax((h W^T + b) s / T) = softmax((h W^T + b) / (T / s))). ``final_logit_softcapping``
(Gemma 2) is refused with a ValueError: the log-prob kernels have no soft-capping.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

import fusedrl

__all__ = ["token_logprobs", "add_fused_head", "FusedHead", "FusedHeadOutput", "logit_scale", "STATISTICS"]

#: The no-gradient per-token statistics :func:`add_fused_head` can add to its output (TRL 1.16's
#: ``FusedCausalLMOutput`` names): ``mean_logits`` (mean over the vocabulary of the scaled,
#: temperature-divided logits), ``is_top1`` (the label is the first argmax), ``log_sum_sq_probs``
#: (:math:`\log\sum_v p_v^2`, WPO's normalizer).
STATISTICS = ("mean_logits", "is_top1", "log_sum_sq_probs")


@dataclass
class FusedHeadOutput(ModelOutput):
    """What a ``fused_lm_head=True`` forward returns. ``log_probs`` / ``entropy``: ``[B, L - 1]``
    (position t scores the label at t + 1; ``[B, L]`` with pre-shifted ``shift_labels``), 0 where
    the label is ``-100``; ``label_mask``: where it is not; ``loss``: the mean negative log-prob of
    the scored tokens (over ``num_items_in_batch`` when given); ``mean_logits``, ``is_top1``,
    ``log_sum_sq_probs``: the requested :data:`STATISTICS` (same shape, 0 / False where the label is
    ``-100``, no gradient), None otherwise."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None


def logit_scale(config) -> float:
    """The factor the model multiplies its logits by (1.0 for most models); ValueError for
    soft-capped logits, which fusedrl's kernels do not compute."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        raise ValueError(f"model config final_logit_softcapping={cap}: soft-capped logits are not supported by "
                         "fusedrl's log-prob kernels (set it to None only if the model was trained without it)")
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / text.logits_scaling
    scale = 1.0 if scale is None else float(scale)
    if not scale > 0.0:
        raise ValueError(f"model config logit scale must be > 0, got {scale}")
    return scale


def _causal_lm(model):
    """The Hugging Face model under DDP / FSDP-style (``.module``) and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and not hasattr(model, "config"):
        model = model.module
    if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT: adapters sit inside it
        model = model.get_base_model()
    return model


def _head(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"model ({type(model).__name__}) has no output embeddings (lm_head); fusedrl needs a causal LM")
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"model's lm_head must be a plain torch.nn.Linear, got {type(head).__name__} (a PEFT "
                         "adapter on lm_head, or a custom head, is not supported; keep lm_head out of target_modules)")
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor shards: gather the head once per call
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


def _check_text_model(model):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        raise ValueError(f"model ({type(model).__name__}) is a multimodal model; fusedrl.integrations.transformers "
                         "supports text-only causal LMs")
    if getattr(config, "output_router_logits", False):
        raise ValueError("model config output_router_logits=True (MoE load-balancing loss) is not supported by "
                         "fusedrl.integrations.transformers")


@torch.no_grad()
def _statistics(hidden, weight, bias, labels, *, scale, names, chunk_size):
    """The :data:`STATISTICS` ``names`` of the N scored tokens (``hidden`` [N, H], ``labels`` [N]) under
    z = (hidden @ weight.T + bias) * scale, computed in float32 over chunks of tokens (the [N, V]
    logits are never held; one chunk's are)."""
    from fusedrl.linear import default_chunk_size  # noqa: PLC0415

    N, V = hidden.shape[0], weight.shape[0]
    out = {name: torch.empty(N, dtype=torch.bool if name == "is_top1" else torch.float32, device=hidden.device)
           for name in names}
    chunk = chunk_size or default_chunk_size(N, V, hidden.dtype)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        h = hidden[start:stop]
        z = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).float().mul_(scale)
        if "mean_logits" in out:
            out["mean_logits"][start:stop] = z.mean(-1)
        if "is_top1" in out:  # argmax returns the first maximum: a tie with an earlier token is not top-1 (as TRL)
            out["is_top1"][start:stop] = z.argmax(-1) == labels[start:stop]
        if "log_sum_sq_probs" in out:  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
            out["log_sum_sq_probs"][start:stop] = torch.logsumexp(2.0 * z, -1) - 2.0 * torch.logsumexp(z, -1)
    return out


def _score(model, hidden, labels, *, temperature, return_entropy, cast_lm_head_to_fp32, ignore_index, chunk_size,
           backend, statistics=()):
    """linear_logprobs of the valid positions of ``hidden`` [B, L, H] / ``labels`` [B, L], scattered
    back into zeros [B, L]; also returns a dict of the requested :data:`STATISTICS`, scattered alike."""
    weight, bias = _head(model)
    hidden = hidden.to(weight.device)
    labels = labels.to(weight.device)
    mask = labels != ignore_index
    device_type = hidden.device.type
    dtype = weight.dtype
    if cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    ctx = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()
    effective_temperature = temperature / logit_scale(model.config)
    with ctx:
        h, w, b, y = hidden[mask].to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), labels[mask]
        out = fusedrl.linear_logprobs(
            h, w, y, bias=b, temperature=effective_temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, chunk_size=chunk_size, backend=backend,
        )
        stats = {}
        if statistics:
            stats = _statistics(h, w, b, y, scale=1.0 / effective_temperature, names=statistics, chunk_size=chunk_size)
    logp, entropy = out if return_entropy else (out, None)
    # masked_scatter keeps the outputs connected to the graph when no label is valid.
    logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    if entropy is not None:
        entropy = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
    stats = {name: x.new_zeros(mask.shape).masked_scatter(mask, x) for name, x in stats.items()}
    return logp, entropy, mask, stats


def _labels(input_ids, attention_mask, labels, ignore_index):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("input_ids must be an int32 or int64 tensor [B, L], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    elif not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    return labels


def token_logprobs(model, input_ids, attention_mask=None, labels=None, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, cast_lm_head_to_fp32: bool = False,
                   chunk_size: int | None = None, backend: str | None = None, **model_kwargs):
    """Log-probs (and entropy) of each next token of ``input_ids`` under ``model`` (a causal LM).

    Args:
        model: a transformers ``PreTrainedModel`` with a plain ``nn.Linear`` lm_head (PEFT-wrapped
            models are unwrapped; their adapters inside the backbone apply).
        input_ids, attention_mask: ``[B, L]``.
        labels: ``[B, L]`` aligned with ``input_ids`` (``ignore_index`` where not scored); default:
            ``input_ids`` with padding (``attention_mask == 0``) ignored.
        temperature: the sampling temperature the logits are divided by.
        cast_lm_head_to_fp32: score in float32 whatever the model's dtype (TRL's option).
        chunk_size, backend: as :func:`fusedrl.linear_logprobs`.
        model_kwargs: passed to the backbone.

    Returns:
        ``logp`` ``[B, L - 1]`` float32: ``logp[:, t]`` is the log-prob of ``labels[:, t + 1]``
        given the tokens up to t, 0 where that label is ignored; ``(logp, entropy)`` with
        ``return_entropy``. Differentiable w.r.t. the model's parameters.
    """
    labels = _labels(input_ids, attention_mask, labels, ignore_index)
    hf = _causal_lm(model)
    _check_text_model(hf)
    out = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    logp, entropy, _, _ = _score(hf, out.last_hidden_state[:, :-1], labels[:, 1:], temperature=temperature,
                                 return_entropy=return_entropy, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                 ignore_index=ignore_index, chunk_size=chunk_size, backend=backend)
    return (logp, entropy) if return_entropy else logp


class FusedHead:
    """The handle :func:`add_fused_head` returns: ``remove()`` restores the forward it replaced."""

    def __init__(self, model, previous, forward):
        self.model, self._previous, self._forward = model, previous, forward

    @property
    def installed(self) -> bool:
        return self.model.__dict__.get("forward") is self._forward

    def remove(self) -> None:
        if not self.installed:
            raise RuntimeError("fusedrl: the fused head is no longer the model's forward (removed already, or "
                               "patched again after it); remove the later patch first")
        if self._previous is None:
            del self.model.__dict__["forward"]
        else:
            self.model.forward = self._previous


def add_fused_head(model, *, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                   return_entropy: bool = True, chunk_size: int | None = None, backend: str | None = None,
                   statistics: tuple[str, ...] = ()) -> FusedHead:
    """Gives ``model`` (this instance only) a ``model(..., labels=labels, fused_lm_head=True)`` forward
    returning :class:`FusedHeadOutput` computed by fusedrl; without ``fused_lm_head`` the call goes
    to the forward it had before (generation is unchanged). The backbone and the head are looked
    up on every call (PEFT and FSDP replace them after patching). ``statistics``: names among
    :data:`STATISTICS` to add to the output (they cost one chunked GEMM pass over the scored tokens,
    without gradient, shared by all of them). Returns a :class:`FusedHead` whose ``remove()``
    undoes it."""
    if isinstance(statistics, str) or not all(name in STATISTICS for name in statistics):
        raise ValueError(f"statistics must be a tuple of names among {STATISTICS}, got {statistics!r}")
    statistics = tuple(dict.fromkeys(statistics))
    _check_text_model(model)
    logit_scale(model.config)  # refuse soft-capping now, not at the first training step
    previous = model.__dict__.get("forward")
    original = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            if labels is None:
                raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
            hidden, scored = hidden[:, :-1], labels[:, 1:]
        else:
            scored = shift_labels
        logp, entropy, mask, stats = _score(self, hidden, scored, temperature=temperature,
                                            return_entropy=return_entropy, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                            ignore_index=-100, chunk_size=chunk_size, backend=backend,
                                            statistics=statistics)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedHeadOutput(loss=-logp.sum() / count, log_probs=logp, entropy=entropy, label_mask=mask, **stats)

    bound = types.MethodType(forward, model)
    model.forward = bound
    return FusedHead(model, previous, bound)
