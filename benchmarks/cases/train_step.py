"""One GRPO training step of a causal LM, TRL 1.16's GRPOTrainer vs fusedrl's
(fusedrl.integrations.trl.GRPOTrainer): the trainers' own ``_compute_loss`` (model forward with
each trainer's fused head, the loss, metrics) and its backward, on given completions; and the loss
section alone, from the backbone's last hidden state to the scalar loss and back.

Models (fusedrl.integrations.toy, random init, float32): the demo's (2 layers, hidden 128,
vocabulary 32,000; 32 sequences of 34 prompt + 8 completion tokens) and a bigger CPU-sized one
(4 layers, hidden 512, vocabulary 32,000; 8 sequences of 128 prompt + 384 completion tokens).
GRPO, beta 0.04 (k3 KL, reference log-probs given), on-policy (old log-probs = current).

Implementations:
- ``fusedrl`` / ``trl``: the whole step (trainer._compute_loss + backward).
- ``fusedrl_loss``: fusedrl.linear_logprobs on the completion tokens + fusedrl.policy_loss, from
  the hidden state (a leaf that requires grad) and the lm_head weight.
- ``trl_loss``: TRL's fused head as its trainer runs it on a device without Triton (every
  position scored, trl.trainer.utils._ChunkedLogProbFunction over hidden[:, :-1]) + TRL's
  ``GRPOTrainer._compute_loss`` on a stub trainer.
- ``trl_loss_compact``: the same head on the completion tokens only (what TRL does on Triton
  devices), + the same loss.
The floor is none (a model step has no single arithmetic floor here); the targets compare the
loss sections and the whole steps.
"""

from __future__ import annotations

import torch

from benchmarks.cases.linear import _step

CASE = "train_step"
floor_note = "none (the targets compare fusedrl with TRL)"
BETA = 0.04


def configs(quick: bool):
    if quick:
        return [{"model": "tiny", "B": 4, "P": 8, "C": 8, "H": 32, "layers": 1, "V": 1000}]
    return [{"model": "demo", "B": 32, "P": 34, "C": 8, "H": 128, "layers": 2, "V": 32000},
            {"model": "bigger", "B": 8, "P": 128, "C": 384, "H": 512, "layers": 4, "V": 32000}]


def _world(cfg):
    from fusedrl.integrations import toy  # noqa: PLC0415

    model = toy.model(seed=0, vocab_size=cfg["V"], hidden_size=cfg["H"], layers=cfg["layers"],
                      heads=4 if cfg["H"] >= 64 else 2, kv_heads=2, max_positions=cfg["P"] + cfg["C"] + 8)
    g = torch.Generator().manual_seed(1)
    B, P, C, V = cfg["B"], cfg["P"], cfg["C"], cfg["V"]
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[: B // 2, : P // 4] = 0  # left padding in half the rows
    completion_ids = torch.randint(3, V, (B, C), generator=g)
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                  ref_per_token_logps=-torch.rand(B, C, generator=g) * 8,
                  num_items_in_batch=completion_mask.sum())
    return model, inputs


def _trainer(cls, model, cfg):
    import tempfile  # noqa: PLC0415

    import trl  # noqa: PLC0415
    from fusedrl.integrations import toy  # noqa: PLC0415

    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg["B"],
                          num_generations=cfg["B"], max_completion_length=cfg["C"], loss_type="grpo", beta=0.0,
                          use_cpu=True, bf16=False, report_to=[], save_strategy="no", disable_tqdm=True)
    from datasets import Dataset  # noqa: PLC0415

    trainer = cls(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
                  processing_class=toy.tokenizer(cfg["V"]), train_dataset=Dataset.from_dict({"prompt": ["1+1="]}))
    trainer.beta = BETA  # the reference log-probs are an input: no reference model is built
    trainer.current_gradient_accumulation_steps = 1  # set by train(), which this step bypasses
    return trainer


def _whole(cls_name):
    def make(cfg):
        import trl  # noqa: PLC0415

        from fusedrl.integrations.trl import GRPOTrainer  # noqa: PLC0415

        model, inputs = _world(cfg)
        trainer = _trainer(GRPOTrainer if cls_name == "fusedrl" else trl.GRPOTrainer, model, cfg)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        return _step(params, lambda: trainer._compute_loss(trainer.model, inputs))

    return make


def _hidden(cfg):
    """The backbone's last hidden state (detached leaf, requires grad), the lm_head weight and the
    scoring inputs, computed once outside the timed step."""
    model, inputs = _world(cfg)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=am).last_hidden_state
    weight = model.lm_head.weight.detach().clone().requires_grad_(True)
    hidden = hidden.detach().requires_grad_(True)
    labels = ids.masked_fill(am == 0, -100)
    labels[:, : inputs["prompt_ids"].shape[1]] = -100
    return hidden, weight, labels, inputs


def make_fusedrl_loss(cfg):
    import fusedrl  # noqa: PLC0415

    hidden, weight, labels, inputs = _hidden(cfg)
    C = cfg["C"]
    mask = inputs["completion_mask"]
    options = fusedrl.presets.trl("grpo", beta=BETA)

    def loss():
        h = hidden[:, -C - 1:-1]
        lab = labels[:, -C:]
        keep = lab != -100
        lp, ent = fusedrl.linear_logprobs(h[keep], weight, lab[keep], return_entropy=True)
        logp = lp.new_zeros(keep.shape).masked_scatter(keep, lp)
        return fusedrl.policy_loss(logp, None, inputs["advantages"], mask, ref_logp=inputs["ref_per_token_logps"],
                                   num_sequences=cfg["B"], **options)[0]

    return _step([hidden, weight], loss)


def _stub(cfg, per_token):
    from collections import defaultdict  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    args = SimpleNamespace(delta=None, use_bias_correction_kl=True, steps_per_generation=1,
                           sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction="sum": x, num_processes=1, sync_gradients=True)
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, *a, **k: (*per_token(), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=BETA, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2,
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=cfg["C"], accelerator=accelerator,
        _entropy_bonus_enabled=False, use_adaptive_entropy=False, entropy_coef=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, args=args,
    )


def _make_trl_loss(compact):
    def make(cfg):
        from trl import GRPOTrainer  # noqa: PLC0415
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction  # noqa: PLC0415

        hidden, weight, labels, inputs = _hidden(cfg)
        C = cfg["C"]

        def per_token():
            h, lab = hidden[:, :-1], labels[:, 1:]
            keep = lab != -100
            if compact:
                lp, ent, *_ = _ChunkedLogProbFunction.apply(h[keep], weight, None, lab[keep], 1.0,
                                                            _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy"))
                lp, ent = (x.new_zeros(keep.shape).masked_scatter(keep, x) for x in (lp, ent))
            else:
                lp, ent, *_ = _ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), weight, None,
                                                            lab.clamp(min=0).reshape(-1), 1.0,
                                                            _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy"))
                lp, ent = (x.view(keep.shape).masked_fill(~keep, 0) for x in (lp, ent))
            return lp[:, -C:], ent[:, -C:]

        stub = _stub(cfg, per_token)
        return _step([hidden, weight], lambda: GRPOTrainer._compute_loss(stub, None, inputs))

    return make


IMPLS = {
    "fusedrl": _whole("fusedrl"),
    "trl": _whole("trl"),
    "fusedrl_loss": make_fusedrl_loss,
    "trl_loss": _make_trl_loss(False),
    "trl_loss_compact": _make_trl_loss(True),
}


def targets(cfg, res) -> list[str]:
    out = []
    ours, stock = res.get("fusedrl_loss", {}), res.get("trl_loss", {})
    if "median_s" in ours and "median_s" in stock:
        x = stock["median_s"] / ours["median_s"]
        mem = ours["peak_extra_bytes"] / max(stock["peak_extra_bytes"], 1)
        out.append(f"loss section vs stock TRL: {x:.2f}x faster (target >= 3x: {'met' if x >= 3 else 'MISSED'}), "
                   f"{100 * mem:.1f}% of its peak memory (target <= 20%: {'met' if mem <= 0.2 else 'MISSED'})")
    compact = res.get("trl_loss_compact", {})
    if "median_s" in ours and "median_s" in compact:
        out.append(f"loss section vs TRL's head on the completion tokens only: "
                   f"{compact['median_s'] / ours['median_s']:.2f}x faster, "
                   f"{100 * ours['peak_extra_bytes'] / max(compact['peak_extra_bytes'], 1):.1f}% of its peak memory")
    a, b = res.get("fusedrl", {}), res.get("trl", {})
    if "median_s" in a and "median_s" in b:
        x = b["median_s"] / a["median_s"]
        out.append(f"whole step vs stock TRL: {x:.2f}x faster (target > 1x: {'met' if x > 1 else 'MISSED'}), "
                   f"{100 * a['peak_extra_bytes'] / max(b['peak_extra_bytes'], 1):.1f}% of its peak memory")
    return out
