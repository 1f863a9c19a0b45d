"""``fusedrl.integrations.trl.DPOTrainer``: TRL 1.16's DPOTrainer with fusedrl's log-probs and loss.

:class:`DPOTrainer` subclasses ``trl.DPOTrainer`` and changes two things:

- **Log-probs.** TRL gives the policy and the reference model a fused LM head
  (``add_fused_lm_head``); this trainer replaces it, on the same model instances, with
  :func:`fusedrl.integrations.transformers.add_fused_head`: the backbone's last hidden state and
  the lm_head weight go to :func:`fusedrl.linear_logprobs`, only the completion tokens (labels
  not -100, TRL's labels: ``input_ids`` outside ``completion_mask`` set to -100, shifted by one)
  are scored and the ``[B, T, V]`` logits are never built. TRL's metrics ``logits/chosen``,
  ``logits/rejected`` and ``mean_token_accuracy`` and WPO's ``log_sum_sq_probs`` come from the
  head's no-gradient statistics (one more chunked GEMM pass over the completion tokens of the
  policy; ``fusedrl_token_metrics=False`` drops the two metrics and that pass unless WPO needs
  it). The reference log-probs, computed in the loop or precomputed
  (``precompute_ref_log_probs``), take the same path.
- **Loss.** Sequence log-probs are :func:`fusedrl.sequence_logps` of the per-token log-probs
  (LD-DPO's ``ld_alpha``: per-token weights 1 up to the shorter completion of the pair and
  ``ld_alpha`` after it, :func:`ld_weights`); the loss is :func:`fusedrl.preference_loss` with
  DPOConfig's ``loss_type`` list, ``loss_weights``, ``beta``, ``label_smoothing``,
  ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau`` and WPO's pair weights
  (``use_weighting``, :func:`wpo_weights`). The ``sft`` term is its own
  :func:`fusedrl.preference_loss` call: TRL takes it over the unweighted chosen log-probs (also
  under ``ld_alpha``) and the shifted completion mask. RPO is TRL 1.16's
  ``loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha]`` (DPOConfig 1.16 has no ``rpo_alpha``).
  It logs TRL's metrics under TRL's names.

Everything else (tokenization, truncation, collation, the reference model TRL builds or the one
passed, PEFT adapters as the reference, ``sync_ref_model``, gradient accumulation, evaluation) is
TRL's own code. Options this trainer cannot reproduce raise a ValueError naming them at
construction (:data:`UNSUPPORTED`); none is ignored.
"""

from __future__ import annotations

import contextlib

import torch
import trl
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

import fusedrl
from fusedrl.integrations.transformers import _causal_lm, add_fused_head

__all__ = ["DPOTrainer", "UNSUPPORTED", "TRL_DPO_LOSS_TYPES", "check_dpo_config", "ld_weights", "wpo_weights"]

#: DPOConfig.loss_type values of TRL 1.16 (all implemented by :func:`fusedrl.preference_loss`).
TRL_DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)

# DPOConfig options (trl 1.16) with a value this trainer refuses -> why.
UNSUPPORTED = {
    "use_liger_kernel=True": "Liger's kernels are applied when training starts and are untested with fusedrl's LM head",
    "activation_offloading=True": "activation offloading (a CUDA stream context around the training step) is "
                                  "untested with fusedrl's LM head",
    "label_smoothing >= 0.5 with loss_type 'robust'": "robust DPO's flip probability must be < 0.5 (TRL only "
                                                      "warns and divides by 1 - 2 * label_smoothing <= 0)",
    "router_aux_loss_coef (MoE models)": "the MoE load-balancing loss is not computed by the fused head",
    "vision-language models": "fusedrl's LM head supports text-only causal LMs (no pixel_values / image inputs)",
}


def check_dpo_config(args, *, aux_loss_enabled: bool = False, vision: bool = False) -> None:
    """Raises a ValueError naming the first DPOConfig option :class:`DPOTrainer` cannot reproduce."""
    def refuse(option, value):
        raise ValueError(f"fusedrl.integrations.trl.DPOTrainer: DPOConfig {option} (got {value!r}) is not "
                         f"supported: {UNSUPPORTED[option]}; use trl.DPOTrainer for it")

    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    unknown = [t for t in loss_types if t not in TRL_DPO_LOSS_TYPES]
    if not loss_types or unknown:
        raise ValueError(f"fusedrl.integrations.trl.DPOTrainer: DPOConfig loss_type must be a non-empty list of "
                         f"{TRL_DPO_LOSS_TYPES}, got {args.loss_type!r}")
    if getattr(args, "use_liger_kernel", False):
        refuse("use_liger_kernel=True", args.use_liger_kernel)
    if args.activation_offloading:
        refuse("activation_offloading=True", args.activation_offloading)
    if "robust" in loss_types and not args.label_smoothing < 0.5:
        refuse("label_smoothing >= 0.5 with loss_type 'robust'", args.label_smoothing)
    if aux_loss_enabled:
        refuse("router_aux_loss_coef (MoE models)", args.router_aux_loss_coef)
    if vision:
        raise ValueError("fusedrl.integrations.trl.DPOTrainer: vision-language models (a ProcessorMixin "
                         f"processing_class, or image data) are not supported: {UNSUPPORTED['vision-language models']}"
                         "; use trl.DPOTrainer for them")


def ld_weights(shift_completion_mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights of a ``[2B, T]`` [chosen; rejected] batch (TRL 1.16's shared/tail
    split): 1 on the first ``min(len_chosen, len_rejected)`` completion tokens of each pair's rows,
    ``ld_alpha`` on the later ones; pass them to :func:`fusedrl.sequence_logps` with the mask."""
    position = shift_completion_mask.cumsum(dim=1)
    chosen_lengths, rejected_lengths = shift_completion_mask.sum(dim=1).chunk(2, dim=0)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2).unsqueeze(1)
    one = torch.ones((), dtype=torch.float32, device=position.device)
    return torch.where(position <= shared, one, one * ld_alpha)


@torch.no_grad()
def wpo_weights(per_token_logps, log_sum_sq_probs, shift_completion_mask) -> torch.Tensor:
    """WPO's pair weights (TRL 1.16 ``use_weighting``) of a ``[2B, T]`` [chosen; rejected] batch:
    :math:`w_c w_r`, :math:`w = \\exp(\\mathrm{mean}_t(\\log p_t - \\log\\sum_v p_v^2))` over each
    row's completion tokens (at least 1), without gradient. Returns ``[B]``."""
    lengths = shift_completion_mask.sum(dim=1).clamp_min(1)
    aligned = (per_token_logps - log_sum_sq_probs) * shift_completion_mask
    chosen, rejected = torch.exp(aligned.sum(dim=1) / lengths).chunk(2, dim=0)
    return chosen * rejected


_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class DPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` with fusedrl's fused log-probs and preference loss (module docstring).

    Takes TRL's arguments, plus ``fusedrl_backend`` (``backend=`` of the fusedrl calls; None picks
    the fastest available), ``fusedrl_chunk_size`` (tokens per chunk of
    :func:`fusedrl.linear_logprobs`; None: its default) and ``fusedrl_token_metrics`` (False: do not
    log ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``, which cost one chunked GEMM
    pass without gradient over the completion tokens). ``remove_fused_heads()`` gives the models
    back their TRL forward.
    """

    def __init__(self, *args, fusedrl_backend: str | None = None, fusedrl_chunk_size: int | None = None,
                 fusedrl_token_metrics: bool = True, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # refuse before TRL loads models and tokenizes the data
            check_dpo_config(config)
        if not isinstance(fusedrl_token_metrics, bool):
            raise TypeError(f"fusedrl_token_metrics must be a bool, got {type(fusedrl_token_metrics).__name__}")
        self._fusedrl_options = dict(chunk_size=fusedrl_chunk_size, backend=fusedrl_backend)
        self._fusedrl_token_metrics = fusedrl_token_metrics
        self._fused_heads = None  # installed before TRL's precompute of the reference log-probs, or just after init
        super().__init__(*args, **kwargs)
        self._install_fused_heads()

    def _install_fused_heads(self) -> None:
        if self._fused_heads is not None:
            return
        check_dpo_config(self.args, aux_loss_enabled=self.aux_loss_enabled,
                         vision=self._is_vlm or self._is_vision_dataset)
        statistics = ("mean_logits", "is_top1") if self._fusedrl_token_metrics else ()
        if self.use_weighting:
            statistics += ("log_sum_sq_probs",)
        self._fused_heads = [add_fused_head(_causal_lm(self.model), return_entropy=True, statistics=statistics,
                                            **self._fusedrl_options)]
        if self.ref_model is not None:
            self._fused_heads.append(add_fused_head(_causal_lm(self.ref_model), return_entropy=False,
                                                    **self._fusedrl_options))

    def remove_fused_heads(self) -> None:
        """Restores the models' previous (TRL's) forward."""
        while self._fused_heads:
            self._fused_heads.pop().remove()

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._install_fused_heads()  # TRL precomputes inside its __init__: score with fusedrl there too
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # -----------------------------------------------------------------------------------------
    def _sequence_logps(self, per_token_logps, shift_completion_mask):
        weights = None if self.ld_alpha is None else ld_weights(shift_completion_mask, self.ld_alpha)
        return fusedrl.sequence_logps(per_token_logps, shift_completion_mask, weights=weights,
                                      backend=self._fusedrl_options["backend"])

    def compute_ref_log_probs(self, model, inputs):
        """Reference sequence log-probs ([chosen], [rejected]) of one padded batch (TRL's signature;
        used for the precompute and in the loop)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            # new adapter: the base model is the reference; re-trained adapter: its initial copy "ref"
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        # autocast explicitly: the reference model's forward is fusedrl's head, not accelerate's autocast wrapper
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter_context, self.accelerator.autocast()):
            per_token_logps = model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs
        shift_completion_mask = inputs["completion_mask"][..., 1:]
        # prompt-learning PEFT prepends virtual tokens to the outputs: keep the positions of the real tokens
        per_token_logps = per_token_logps[:, -shift_completion_mask.size(1):]
        return self._sequence_logps(per_token_logps, shift_completion_mask).chunk(2, dim=0)

    def _loss(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, per_token_logps,
              completion_mask, shift_completion_mask, weights):
        """TRL's combination of ``loss_type`` x ``loss_weights`` by fusedrl.preference_loss."""
        backend = self._fusedrl_options["backend"]
        pair = [(t, w) for t, w in zip(self.loss_types, self.loss_weights) if t != "sft"]
        sft = [w for t, w in zip(self.loss_types, self.loss_weights) if t == "sft"]
        loss = 0.0
        if pair:
            # ipo and sigmoid_norm divide by the (unshifted) completion_mask's lengths, as TRL
            chosen_lengths, rejected_lengths = completion_mask.sum(dim=1).chunk(2, dim=0)
            pair_loss, _ = fusedrl.preference_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                loss_type=[t for t, _ in pair], loss_weights=[w for _, w in pair], beta=self.beta,
                label_smoothing=self.label_smoothing, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                discopop_tau=self.args.discopop_tau, weights=weights, backend=backend,
            )
            loss = pair_loss
        if sft:
            # TRL: the mean NLL of the chosen completion tokens of the batch (unweighted by ld_alpha)
            chosen_mask = shift_completion_mask.chunk(2, dim=0)[0]
            chosen_sums = fusedrl.sequence_logps(per_token_logps.chunk(2, dim=0)[0], chosen_mask, backend=backend)
            sft_loss, _ = fusedrl.preference_loss(
                chosen_sums, rejected_logps.detach(), loss_type=["sft"] * len(sft), loss_weights=sft, beta=self.beta,
                chosen_lengths=chosen_mask.sum(dim=1), weights=weights, backend=backend,
            )
            loss = loss + sft_loss
        return loss

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        present = [k for k in _MULTIMODAL if inputs.get(k) is not None]
        if present:
            raise ValueError(f"fusedrl.integrations.trl.DPOTrainer supports text-only models; inputs carry {present}")
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        shift_completion_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = shift_completion_mask.size(1)
        # prompt-learning PEFT prepends virtual tokens to the outputs: keep the positions of the real tokens
        per_token_logps = outputs.log_probs[:, -seq_len:]
        chosen_logps, rejected_logps = self._sequence_logps(per_token_logps, shift_completion_mask).chunk(2, dim=0)

        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(
                self.model if self.ref_model is None else self.ref_model, inputs)

        weights = None
        if self.use_weighting:
            weights = wpo_weights(per_token_logps, outputs.log_sum_sq_probs[:, -seq_len:], shift_completion_mask)
        loss = self._loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, per_token_logps,
                          completion_mask, shift_completion_mask, weights)

        self._log_metrics(mode, inputs, outputs, seq_len, shift_completion_mask, chosen_logps, rejected_logps,
                          chosen_logps.detach() - ref_chosen_logps, rejected_logps.detach() - ref_rejected_logps)
        if return_outputs:  # TRL's (deprecated) compute_metrics path: it recomputes the logits, as TRL does
            import warnings  # noqa: PLC0415

            warnings.warn(
                "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated and will be "
                "removed in v2.0.0. The fused LM head does not build the logits, so they are recomputed with an extra "
                "forward pass.", FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _log_metrics(self, mode, inputs, outputs, seq_len, shift_completion_mask, chosen_logps, rejected_logps,
                     chosen_logratios, rejected_logratios):
        """TRL's metrics under TRL's names (its _compute_loss), from the detached tensors."""
        acc, m = self.accelerator, self._metrics[mode]
        mask = shift_completion_mask
        entropy_sum = acc.gather_for_metrics((outputs.entropy[:, -seq_len:] * mask).sum()).sum()
        total_tokens = acc.gather_for_metrics(mask.sum()).sum()
        m["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)

        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]

        chosen_mask, rejected_mask = mask.bool().chunk(2, dim=0)
        if self._fusedrl_token_metrics:
            chosen_mean_logits, rejected_mean_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
            for key, values, which in (("logits/chosen", chosen_mean_logits, chosen_mask),
                                       ("logits/rejected", rejected_mean_logits, rejected_mask)):
                total = acc.gather_for_metrics(values[which].sum()).sum().item()
                count = acc.gather_for_metrics(which.sum()).sum().item()
                m[key].append(total / count if count > 0 else 0.0)
            chosen_is_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
            correct = acc.gather_for_metrics((chosen_is_top1 & chosen_mask).sum()).sum()
            count = acc.gather_for_metrics(chosen_mask.sum()).sum()
            m["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        chosen_rewards = self.beta * chosen_logratios
        rejected_rewards = self.beta * rejected_logratios
        m["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        m["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        m["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        m["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        m["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
        m["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())
