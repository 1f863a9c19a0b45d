"""TRL 1.16 trainers whose log-probs and loss run on fusedrl: ``from fusedrl.integrations.trl import
GRPOTrainer`` in place of ``from trl import GRPOTrainer`` (or ``DPOTrainer`` for ``trl.DPOTrainer``)
is the whole change. :class:`DPOTrainer` (fused log-probs of the chosen and rejected completions,
:func:`fusedrl.preference_loss`) is documented in :mod:`fusedrl.integrations._trl_dpo`.

:class:`GRPOTrainer` subclasses ``trl.GRPOTrainer`` and changes two things:

- **Log-probs.** TRL's trainer gives its models a fused LM head (``add_fused_lm_head``); this
  trainer replaces that head, on the same model instances, with
  :func:`fusedrl.integrations.transformers.add_fused_head`: the backbone's last hidden state and
  the lm_head weight go to :func:`fusedrl.linear_logprobs`, only the completion tokens are scored,
  and the ``[B, T, V]`` logits are never built. TRL's ``_get_per_token_logps_and_entropies`` is
  unchanged, so the policy, old and reference log-probs all take this path.
- **Loss.** ``_compute_loss`` calls :func:`fusedrl.policy_loss` with the keywords of
  :func:`fusedrl.presets.trl` and the normalizer of TRL's loss type (see "Scaling" in
  :func:`fusedrl.policy_loss`): every loss type of TRL 1.16 (vespo included), the off-policy
  sequence mask (``off_policy_mask_threshold``) and the top-entropy-quantile mask
  (``top_entropy_quantile``, its threshold the quantile over every process, as TRL's
  ``get_high_entropy_mask``) run in the fused kernel; the entropy bonus is TRL's token mean over
  the tokens the entropy mask keeps, from :func:`fusedrl.aggregate`. It logs TRL's metrics under
  TRL's names.

Everything else (generation, rewards, multi-objective reward aggregation, group advantages,
``scale_rewards``, ``mask_truncated_completions``, gradient accumulation, ``num_iterations``,
PEFT with a plain ``nn.Linear`` lm_head) is TRL's own code. Options this trainer cannot reproduce
raise a ValueError naming them at construction (:data:`UNSUPPORTED`); none is ignored.
"""

from __future__ import annotations

import torch
import trl
from trl.trainer.utils import nanmax, nanmin

import fusedrl
from fusedrl import presets
from fusedrl.integrations._trl_dpo import DPOTrainer
from fusedrl.integrations.transformers import _causal_lm, add_fused_head

__all__ = ["GRPOTrainer", "DPOTrainer", "UNSUPPORTED", "check_grpo_config"]

# GRPOConfig options (trl 1.16) with a value this trainer refuses -> why.
UNSUPPORTED = {
    "use_adaptive_entropy=True": "the adaptive entropy controller is not reproduced",
    "use_vllm=True": "vLLM generation (and its importance-sampling correction) is untested with fusedrl",
    "router_aux_loss_coef (MoE models)": "the MoE load-balancing loss is not computed by the fused head",
    "use_liger_kernel=True": "Liger's kernels and fusedrl's would both replace the LM head",
}


def check_grpo_config(args, *, aux_loss_enabled: bool = False) -> None:
    """Raises a ValueError naming the first GRPOConfig option :class:`GRPOTrainer` cannot reproduce."""
    def refuse(option, value):
        raise ValueError(f"fusedrl.integrations.trl.GRPOTrainer: GRPOConfig {option} (got {value!r}) is not "
                         f"supported: {UNSUPPORTED[option]}; use trl.GRPOTrainer for it")

    if args.loss_type not in presets.TRL_LOSS_TYPES:
        raise ValueError(f"fusedrl.integrations.trl.GRPOTrainer: GRPOConfig loss_type must be one of "
                         f"{tuple(presets.TRL_LOSS_TYPES)}, got {args.loss_type!r}")
    if args.use_adaptive_entropy:
        refuse("use_adaptive_entropy=True", args.use_adaptive_entropy)
    if args.use_vllm:
        refuse("use_vllm=True", args.use_vllm)
    if getattr(args, "use_liger_kernel", False):
        refuse("use_liger_kernel=True", args.use_liger_kernel)
    if aux_loss_enabled:
        refuse("router_aux_loss_coef (MoE models)", args.router_aux_loss_coef)


_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with fusedrl's fused log-probs and policy loss (module docstring).

    Takes TRL's arguments, plus ``fusedrl_backend`` (``backend=`` of the fusedrl calls; None picks
    the fastest available) and ``fusedrl_chunk_size`` (tokens per chunk of
    :func:`fusedrl.linear_logprobs`; None: its default). ``remove_fused_heads()`` gives the models
    back their TRL forward.
    """

    def __init__(self, *args, fusedrl_backend: str | None = None, fusedrl_chunk_size: int | None = None, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # refuse before TRL loads models or starts vLLM
            check_grpo_config(config)
        super().__init__(*args, **kwargs)
        check_grpo_config(self.args, aux_loss_enabled=self.aux_loss_enabled)
        self._fusedrl_backend = fusedrl_backend
        options = dict(temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                       chunk_size=fusedrl_chunk_size, backend=fusedrl_backend)
        self._fused_heads = [add_fused_head(_causal_lm(self.model), return_entropy=True, **options)]
        if self.ref_model is not None:
            self._fused_heads.append(add_fused_head(_causal_lm(self.ref_model), return_entropy=False, **options))

    def remove_fused_heads(self) -> None:
        """Restores the models' previous (TRL's) forward."""
        while self._fused_heads:
            self._fused_heads.pop().remove()

    # -----------------------------------------------------------------------------------------
    def _normalizers(self, mask, inputs, train: bool) -> dict:
        """policy_loss normalizers reproducing TRL's division for this loss type (one rank's loss)."""
        gas = self.current_gradient_accumulation_steps if train else 1
        B = mask.shape[0]
        lt = self.loss_type
        if lt in ("grpo", "sapo", "luspo"):
            return dict(num_sequences=B * gas)
        if lt == "dr_grpo":
            return dict(num_sequences=B * gas, max_length=self.max_completion_length)
        if lt == "bnpo":
            return dict(num_tokens=mask.sum().clamp(min=1.0) * gas)
        # dapo, cispo: num_items_in_batch spans the generation batch
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if train:
            normalizer = normalizer * gas / self.args.steps_per_generation
        return dict(num_tokens=normalizer)

    def _compute_loss(self, model, inputs):
        present = [k for k in _MULTIMODAL if inputs.get(k) is not None]
        if present:
            raise ValueError(f"fusedrl.integrations.trl.GRPOTrainer supports text-only models; inputs carry {present}")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        logp, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)
        entropy_threshold = self._entropy_threshold(entropies, mask) if self.top_entropy_quantile < 1.0 else None
        advantages = inputs["advantages"]
        old_logp = inputs.get("old_per_token_logps")
        train = self.model.training
        mode = "train" if train else "eval"

        kw = presets.trl(
            self.loss_type, epsilon=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
            importance_sampling_level=self.importance_sampling_level,
            sapo_temperature_pos=self.args.sapo_temperature_pos, sapo_temperature_neg=self.args.sapo_temperature_neg,
            use_bias_correction_kl=self.args.use_bias_correction_kl, beta=self.beta, kl="k3",
            vespo_k_pos=self.args.vespo_k_pos, vespo_lambda_pos=self.args.vespo_lambda_pos,
            vespo_k_neg=self.args.vespo_k_neg, vespo_lambda_neg=self.args.vespo_lambda_neg,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
        )
        ref_logp = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        masks = {}
        if self.off_policy_mask_threshold is not None:  # TRL: the sampler's log-probs when it has them
            masks["rollout_logp"] = inputs.get("sampling_per_token_logps")
        if entropy_threshold is not None:
            masks.update(entropy=entropies.detach(), entropy_mask_threshold=entropy_threshold)
        loss, metrics = fusedrl.policy_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, **kw, **masks, **self._normalizers(mask, inputs, train),
            backend=self._fusedrl_backend,
        )
        gas = self.current_gradient_accumulation_steps if train else 1.0

        if self._entropy_bonus_enabled:  # TRL: a token mean of H over the mask, divided by the accumulation steps
            policy_loss = loss.detach() * (1.0 if self.loss_type in ("dapo", "cispo", "vespo") else gas)
            bonus_mask = mask  # TRL: the tokens the entropy mask keeps
            if entropy_threshold is not None:
                bonus_mask = mask * ((entropies.detach() * mask >= entropy_threshold) & mask.bool())
            loss = loss - self.entropy_coef * fusedrl.aggregate(entropies, bonus_mask, "token-mean") / gas
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if train and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

        self._log_metrics(mode, logp, old_logp, advantages, mask, entropies, metrics)
        if self.loss_type == "vespo":
            self._log_vespo(mode, logp, old_logp, advantages, mask)
        return loss

    @torch.no_grad()
    def _entropy_threshold(self, entropies, mask) -> float:
        """TRL's get_high_entropy_mask threshold: the (1 - top_entropy_quantile)-quantile of the valid
        entropies of every process (+inf when there are none: every token is masked)."""
        local = entropies[mask.bool()].float()
        pad_value = -1e9  # TRL's sentinel (entropies are >= 0)
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=pad_value))
        gathered = gathered[gathered != pad_value]
        if gathered.numel() == 0:
            return float("inf")
        return float(torch.quantile(gathered, 1 - self.top_entropy_quantile))

    @torch.no_grad()
    def _log_vespo(self, mode, logp, old_logp, advantages, mask):
        """TRL's vespo/phi_seq_mean: the mean over sequences of the gamma weights (TRL's own function)."""
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old = logp.detach() if old_logp is None else old_logp
        phi = trl.GRPOTrainer.get_gamma_weights(
            advantages=adv, log_ratio_per_token=logp.detach() - old, mask=mask, importance_sampling_ratio=None,
            k_pos=self.args.vespo_k_pos, lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
            lambda_neg=self.args.vespo_lambda_neg,
        )
        if phi.shape[1] == 1:
            local = torch.stack([phi.sum(), torch.tensor(float(phi.shape[0]), device=phi.device)])
        else:
            local = torch.stack([(phi * mask).sum(), mask.sum().float()])
        totals = self.accelerator.reduce(local, reduction="sum")
        self._metrics[mode]["vespo/phi_seq_mean"].append((totals[0] / totals[1].clamp(min=1.0)).item())

    @torch.no_grad()
    def _log_metrics(self, mode, logp, old_logp, advantages, mask, entropies, metrics):
        """TRL's metrics under TRL's names (its _compute_loss), from the detached tensors."""
        maskf = mask.float()
        count = maskf.sum()

        def global_mean(local_sum, local_count):
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_mean(x):  # TRL's global_masked_mean: one value per sequence at the sequence level
            if x.shape[1] == 1:
                return global_mean(x.sum(), torch.tensor(float(x.shape[0]), device=x.device))
            return global_mean((x * maskf).sum(), count)

        def seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * maskf).sum(-1) / maskf.sum(-1)

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_mean(metrics["kl_mean"].float() * count, count))
        self._metrics[mode]["entropy"].append(masked_mean(entropies))

        log_ratio = logp.detach() - (logp.detach() if old_logp is None else old_logp)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            low = ((coef_1 < 1 - self.epsilon_low) & (adv < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (adv > 0)).float()
            m = self._metrics[mode]
            m["clip_ratio/low_mean"].append(masked_mean(low))
            m["clip_ratio/high_mean"].append(masked_mean(high))
            m["clip_ratio/region_mean"].append(masked_mean(torch.maximum(low, high)))
            m["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
            m["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())
        elif self.loss_type == "cispo":
            clipped = ((coef_1 > self.epsilon_high) & (adv > 0)).float()
            self._metrics[mode]["cispo_clip_ratio"].append(masked_mean(clipped))
