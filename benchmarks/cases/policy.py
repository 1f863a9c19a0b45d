"""The fused policy objective, forward+backward of the loss w.r.t. logp at B x T:
fusedrl.policy_loss (cpu kernel) vs the reference (fusedrl's torch backend) vs TRL's
GRPOTrainer._compute_loss math (called unmodified on a stub trainer, docs/PEERS.md) vs verl's
compute_policy_loss_vanilla / gspo / cispo + kl_penalty + agg_loss vs the memory floor.

Configurations (each also with ``+tis``: token_truncate rollout correction, cap 2):
- ``grpo_k3``: GRPO clip 0.2, token-mean, k3 KL (beta 0.04; TRL loss_type="bnpo" and its k3;
  verl vanilla + kl_penalty "low_var_kl", verl's k3);
- ``dapo``: clip-higher (0.2 / 0.28), token-mean over a global token count (TRL "dapo" with
  num_items_in_batch; verl token-mean with batch_num_tokens);
- ``gspo``: sequence-level ratio, clip 3e-4 / 4e-4, seq-mean-token-mean (TRL
  importance_sampling_level="sequence"; verl compute_policy_loss_gspo);
- ``dual_clip``: clip 0.2 with dual clip c = 3 (verl vanilla clip_ratio_c; TRL has no dual clip);
- ``cispo``: CISPO, clip above at 1 + 5 (TRL "cispo", epsilon_high=5; verl compute_policy_loss_cispo).

For ``+tis`` the rollout weights are part of every implementation's step: fusedrl computes them in
the kernel from rollout_logp; TRL multiplies by an ``importance_sampling_ratio`` that its trainer
computes once per batch (here exp(old - rollout) clamped at 2, in the step); verl
compute_rollout_correction_weights then rollout_is_weights=. Inputs: logp / old / ref / rollout
[B, T] in the config's dtype, per-sequence advantages, a bool mask (random lengths, right padded).
"""

from __future__ import annotations

import torch

CASE = "policy"
floor_note = "one read of logp, old_logp, ref_logp (rollout_logp) and the mask, one write of the gradient"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BETA = 0.04
CAP = 2.0
OBJECTIVES = ("grpo_k3", "dapo", "gspo", "dual_clip", "cispo")


def configs(quick: bool):
    shapes = [(4, 256)] if quick else [(64, 8192), (512, 1024)]
    dtypes = ["fp32"] if quick else ["fp32", "bf16"]
    objectives = OBJECTIVES[:2] if quick else OBJECTIVES
    return [
        {"objective": o, "tis": tis, "B": B, "T": T, "dtype": dt}
        for (B, T) in shapes for dt in dtypes for o in objectives for tis in (False, True)
    ]


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    B, T, dtype = cfg["B"], cfg["T"], DTYPES[cfg["dtype"]]
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + 0.05 * torch.randn(B, T, generator=g)
    ref = logp + 0.05 * torch.randn(B, T, generator=g)
    rollout = old + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    to = lambda t: t.to(dtype)  # noqa: E731
    return to(logp).requires_grad_(True), to(old), to(ref), to(rollout), adv, mask


def _step(logp, loss_fn):
    def step():
        loss = loss_fn()
        loss.backward()
        grad = logp.grad
        logp.grad = None
        return grad

    return step


def fusedrl_kwargs(cfg, num_tokens):
    o = cfg["objective"]
    kw = {
        "grpo_k3": dict(beta=BETA, kl="k3"),
        "dapo": dict(clip_low=0.2, clip_high=0.28, num_tokens=num_tokens),
        "gspo": dict(ratio="sequence", clip_low=3e-4, clip_high=4e-4, aggregation="seq-mean-token-mean"),
        "dual_clip": dict(clip_ratio_c=3.0),
        "cispo": dict(surrogate="cispo", clip_high=5.0),
    }[o]
    if cfg["tis"]:
        kw.update(rollout_correction="token_truncate", rollout_cap=CAP)
    return kw


def _fusedrl(cfg, backend):
    import fusedrl

    logp, old, ref, rollout, adv, mask = _inputs(cfg)
    kw = fusedrl_kwargs(cfg, num_tokens=int(mask.sum()))
    extra = dict(ref_logp=ref) if cfg["objective"] == "grpo_k3" else {}
    if cfg["tis"]:
        extra["rollout_logp"] = rollout
    return _step(logp, lambda: fusedrl.policy_loss(logp, old, adv, mask, backend=backend, **kw, **extra)[0])


def make_fusedrl(cfg):
    return _fusedrl(cfg, "cpu")


def make_reference(cfg):
    return _fusedrl(cfg, "torch")


def make_trl(cfg):
    """GRPOTrainer._compute_loss on a SimpleNamespace trainer (as tests/peers/test_trl_grpo.py)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    o = cfg["objective"]
    if o == "dual_clip":
        raise NotImplementedError("TRL has no dual-clip loss")
    logp, old, ref, rollout, adv, mask = _inputs(cfg)
    B, T = logp.shape
    entropy = torch.rand(B, T, generator=torch.Generator().manual_seed(1)).to(logp.dtype)  # TRL logs its mean
    loss_type = {"grpo_k3": "bnpo", "dapo": "dapo", "gspo": "grpo", "cispo": "cispo"}[o]
    eps_low, eps_high = {"grpo_k3": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "cispo": (0.2, 5.0)}[o]
    args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1,
                           sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction="sum": x, num_processes=1, sync_gradients=True)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, *a, **k: (logp, entropy, None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="sequence" if o == "gspo" else "token", beta=BETA if o == "grpo_k3" else 0.0,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, args=args, use_vllm=cfg["tis"],
        vllm_importance_sampling_correction=cfg["tis"], model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=T, accelerator=accelerator,
        _entropy_bonus_enabled=False, use_adaptive_entropy=False, entropy_coef=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    base = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.to(torch.long),
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }

    def loss():
        inputs = dict(base)
        if cfg["tis"]:
            inputs["importance_sampling_ratio"] = torch.exp(old.float() - rollout.float()).clamp(max=CAP)
        return GRPOTrainer._compute_loss(stub, None, inputs)

    return _step(logp, loss)


def make_verl(cfg):
    """verl's policy loss function by name + kl_penalty + agg_loss (the actor's composition)."""
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo import rollout_corr_helper as rc
    from verl.workers.config.actor import ActorConfig

    o = cfg["objective"]
    logp, old, ref, rollout, adv, mask = _inputs(cfg)
    B, T = logp.shape
    loss_mode = {"grpo_k3": "vanilla", "dapo": "vanilla", "gspo": "gspo", "dual_clip": "vanilla", "cispo": "cispo"}[o]
    agg = "seq-mean-token-mean" if o == "gspo" else "token-mean"
    clips = {"grpo_k3": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "dual_clip": (0.2, 0.2),
             "cispo": (0.2, 5.0)}[o]
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=clips[0],
                         clip_ratio_low=clips[0], clip_ratio_high=clips[1], clip_ratio_c=3.0, loss_agg_mode=agg)
    if o == "dapo":
        config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=B)
    fn = core_algos.get_policy_loss_fn(loss_mode)
    adv_bt = adv[:, None].expand(B, T)

    def loss():
        weights = None
        if cfg["tis"]:
            weights, _ = rc.compute_rollout_correction_weights(old - rollout, mask, "token", CAP)
        pg, _ = fn(old_log_prob=old, log_prob=logp, advantages=adv_bt, response_mask=mask, loss_agg_mode=agg,
                   config=config, rollout_is_weights=weights)
        if o == "grpo_k3":
            kld = core_algos.kl_penalty(logp, ref, "low_var_kl")
            pg = pg + BETA * core_algos.agg_loss(kld, mask, agg, **config.global_batch_info)
        return pg

    return _step(logp, loss)


def make_floor(cfg):
    """One read of each input and one write of the gradient: addcmul(logp, old, ref) into the
    gradient buffer (+ a sum over rollout_logp) and the mask's sum."""
    logp, old, ref, rollout, adv, mask = _inputs(cfg)
    x = logp.detach()

    def step():
        g = torch.empty_like(x)
        torch.addcmul(x, old, ref, out=g)
        extra = rollout.sum() if cfg["tis"] else None
        return g, mask.sum(), extra

    return step


IMPLS = {"fusedrl": make_fusedrl, "reference": make_reference, "trl": make_trl, "verl": make_verl,
         "floor": make_floor}


def extra_buffers_bytes(cfg) -> int:
    """Bytes every implementation must hold beyond its inputs: d loss / d logp."""
    return cfg["B"] * cfg["T"] * DTYPES[cfg["dtype"]].itemsize


def targets(cfg, res) -> list[str]:
    """The issue's targets on this run's numbers: >= 15x TRL and verl, <= 3x the floor, peak extra
    memory <= two [B, T] float32 buffers."""
    from benchmarks.harness import floor_ratio  # noqa: PLC0415

    ours = res.get("fusedrl", {})
    if "median_s" not in ours:
        return ["fusedrl failed: no targets checked"]
    out = []
    for peer in ("trl", "verl"):
        r = res.get(peer, {})
        if "median_s" in r:
            x = r["median_s"] / ours["median_s"]
            out.append(f"speed vs {peer}: {x:.1f}x (target >= 15x: {'met' if x >= 15 else 'MISSED'})")
    r = res.get("reference", {})
    if "median_s" in r:
        out.append(f"speed vs reference: {r['median_s'] / ours['median_s']:.1f}x")
    floor = res.get("floor", {})
    if "median_s" in floor:
        x, how = floor_ratio(ours, floor)
        out.append(f"time / floor: {x:.2f}x (target <= 3x: {'met' if x <= 3 else 'MISSED'}{how})")
    limit = 2 * cfg["B"] * cfg["T"] * 4
    mem = ours["peak_extra_bytes"]
    out.append(f"peak extra memory: {mem / 2**20:.1f} MB vs two [B, T] fp32 buffers {limit / 2**20:.1f} MB "
               f"({'met' if mem <= limit else 'MISSED'})")
    return out
