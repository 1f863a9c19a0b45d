"""kl_penalty, aggregate, policy_loss + presets.verl against verl's core_algos (verl 0.9.1).

Covers every verl kl_penalty name (and its straight-through "+" form), every agg_loss mode with and
without the global-count arguments (fusedrl = verl(dp_size=D) / D), the registered policy losses
vanilla (dual clip), gspo, gpg, cispo, sapo and geo_mean under every loss_agg_mode, verl's rollout
correction weights (token / sequence TIS and IcePop from rollout_corr_helper), and the actor's
composition of the policy loss with the entropy bonus and the KL loss (verl/workers/utils/losses.py
`ppo_loss`, re-composed here from the same verl functions since it needs verl's TensorDict plumbing).
"""

import pytest
import torch

import fusedrl
from fusedrl import presets

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
rollout_corr = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
ActorConfig = pytest.importorskip("verl.workers.config.actor").ActorConfig
TESTED_WITH = "verl 0.9.1"
TOL = dict(rtol=1e-6, atol=1e-9)

B, T = 6, 7
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_MODES = ["vanilla", "gspo", "gpg", "cispo", "sapo", "geo_mean"]
# dp_size, batch_num_tokens, global_batch_size, loss_scale_factor of a simulated global batch
GLOBAL = dict(dp_size=4, batch_num_tokens=97, global_batch_size=19, loss_scale_factor=11)


def make_batch(seed, spread=0.6, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    old[0, :3] = logp[0, :3] - torch.tensor([1.6, -1.6, 2.5], dtype=torch.float64)  # ratios beyond the dual clip
    lengths = torch.tensor([T, 4, 0, 1, 6, 3])  # includes a fully masked row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token_adv else torch.randn(B, generator=g, dtype=torch.float64)
    adv[0] = -1.0
    return dict(
        logp=logp, old=old, mask=mask, adv=adv,
        ref=logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64),
        rollout=old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64),
        entropy=torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
    )


def grad_of(fn, *tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


# ---------------------------------------------------------------------------------------------
# kl_penalty


@pytest.mark.parametrize("name", [n + plus for n in ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"] for plus in ("", "+")])
def test_kl_penalty(name):
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 9, generator=g, dtype=torch.float64)
    ref = logp + torch.randn(4, 9, generator=g, dtype=torch.float64) * 3
    ref[0, :4] = logp[0, :4] + torch.tensor([25.0, -25.0, 12.0, -12.0], dtype=torch.float64)  # both clamps of low_var_kl
    w = torch.randn(4, 9, generator=g, dtype=torch.float64)
    v_ref, g_ref = grad_of(lambda a, b: (core_algos.kl_penalty(a, b, name) * w).sum(), logp, ref)
    v, g_ours = grad_of(lambda a, b: (fusedrl.kl_penalty(a, b, presets.verl_kl(name)) * w).sum(), logp, ref)
    torch.testing.assert_close(v, v_ref, **TOL)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, **TOL)


def test_verl_k3_is_fusedrl_low_var_kl_not_k3():
    logp = torch.zeros(3, dtype=torch.float64)
    ref = torch.tensor([30.0, 0.5, -30.0], dtype=torch.float64)
    verl_k3 = core_algos.kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(fusedrl.kl_penalty(logp, ref, "low_var_kl"), verl_k3)
    assert presets.verl_kl("k3") == "low_var_kl" and presets.verl_kl("k3+") == "low_var_kl+"
    ours_k3 = fusedrl.kl_penalty(logp, ref, "k3")
    assert ours_k3[0] > 1e12 and verl_k3[0] == 10.0  # TRL's unclamped k3 vs verl's clamp


# ---------------------------------------------------------------------------------------------
# agg_loss


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.bool])
def test_agg_loss(mode, global_info, mask_dtype):
    batch = make_batch(2)
    values = torch.randn(B, T, dtype=torch.float64)
    mask = batch["mask"].to(mask_dtype)
    info = dict(GLOBAL) if global_info else {}
    dp = info.get("dp_size", 1)
    v_ref, (g_ref,) = grad_of(lambda v: core_algos.agg_loss(v, mask, mode, **info), values)
    counts = dict(num_tokens=info.get("batch_num_tokens"), num_sequences=info.get("global_batch_size"),
                  max_length=info.get("loss_scale_factor"))
    v, (g,) = grad_of(lambda x: fusedrl.aggregate(x, mask, mode, exclude_empty_rows=True, **counts), values)
    torch.testing.assert_close(v * dp, v_ref, **TOL)
    torch.testing.assert_close(g * dp, g_ref, **TOL)


def test_agg_loss_empty_rows_rule_differs_from_default():
    """verl leaves fully masked rows out of seq-mean; fusedrl's default (TRL) counts every row."""
    batch = make_batch(2)
    values = torch.randn(B, T, dtype=torch.float64)
    verl = core_algos.agg_loss(values, batch["mask"], "seq-mean-token-mean")
    ours_all_rows = fusedrl.aggregate(values, batch["mask"], "seq-mean-token-mean")
    torch.testing.assert_close(ours_all_rows * B / (B - 1), verl, **TOL)


# ---------------------------------------------------------------------------------------------
# policy losses


def verl_config(loss_mode, loss_agg_mode="token-mean", **overrides):
    cfg = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2, clip_ratio_low=0.15,
               clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=1.3, tau_neg=0.8, loss_agg_mode=loss_agg_mode)
    cfg.update(overrides)
    return ActorConfig(**cfg)  # the loss function is picked by name below (get_policy_loss_fn)


def verl_policy(batch, loss_mode, loss_agg_mode, config, rollout_is_weights=None):
    fn = core_algos.get_policy_loss_fn(loss_mode)
    adv = batch["adv"][:, None].expand(B, T) if batch["adv"].dim() == 1 else batch["adv"]

    def loss(logp):
        out, _ = fn(old_log_prob=batch["old"], log_prob=logp, advantages=adv, response_mask=batch["mask"].bool(),
                    loss_agg_mode=loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights)
        return out

    return grad_of(loss, batch["logp"])


def ours_policy(batch, kw, **extra):
    def loss(logp):
        out, _ = fusedrl.policy_loss(logp, batch["old"], batch["adv"], batch["mask"], **kw, **extra)
        return out

    return grad_of(loss, batch["logp"])


def preset_kwargs(loss_mode, loss_agg_mode, **more):
    return presets.verl(loss_mode, loss_agg_mode, clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                        clip_ratio_c=3.0, tau_pos=1.3, tau_neg=0.8, **more)


def global_counts(info):
    return dict(num_tokens=info["batch_num_tokens"], num_sequences=info["global_batch_size"],
                max_length=info["loss_scale_factor"])


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("per_token_adv", [False, True], ids=["seq_adv", "token_adv"])
def test_policy_loss(loss_mode, loss_agg_mode, global_info, per_token_adv):
    batch = make_batch(3, per_token_adv=per_token_adv)
    config = verl_config(loss_mode, loss_agg_mode)
    counts, dp = {}, 1
    if global_info:
        config.global_batch_info.update(GLOBAL)
        dp = GLOBAL["dp_size"]
        if loss_mode != "geo_mean":  # verl's geo_mean ignores global_batch_info (a plain mean over rows)
            counts = global_counts(GLOBAL)
    v_ref, (g_ref,) = verl_policy(batch, loss_mode, loss_agg_mode, config)
    v, (g,) = ours_policy(batch, preset_kwargs(loss_mode, loss_agg_mode), **counts)
    if loss_mode == "geo_mean":
        dp = 1
    torch.testing.assert_close(v * dp, v_ref, **TOL)
    torch.testing.assert_close(g * dp, g_ref, **TOL)


def test_dual_clip_is_active():
    """The batch has A < 0 tokens whose ratio exceeds clip_ratio_c: without the dual clip the loss differs."""
    batch = make_batch(3)
    kw = preset_kwargs("vanilla", "token-mean")
    v, _ = ours_policy(batch, kw)
    _, metrics = fusedrl.policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], **kw)
    assert metrics["clipfrac_dual"] > 0
    v_no_dual, _ = ours_policy(batch, {**kw, "clip_ratio_c": None})
    assert not torch.allclose(v, v_no_dual)


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
@pytest.mark.parametrize("rollout_is,threshold", [("token", 1.5), ("sequence", 2.0), ("token", "0.8_1.4"),
                                                   ("sequence", "0.5_3.0")])
def test_rollout_correction_weights(loss_mode, rollout_is, threshold):
    batch = make_batch(5)
    weights, _ = rollout_corr.compute_rollout_correction_weights(
        log_ratio=batch["old"] - batch["rollout"], response_mask=batch["mask"].bool(), rollout_is=rollout_is,
        rollout_is_threshold=threshold,
    )
    agg = "seq-mean-token-mean"
    v_ref, (g_ref,) = verl_policy(batch, loss_mode, agg, verl_config(loss_mode, agg), rollout_is_weights=weights)
    kw = preset_kwargs(loss_mode, agg, rollout_is=rollout_is, rollout_is_threshold=threshold)
    v, (g,) = ours_policy(batch, kw, rollout_logp=batch["rollout"])
    torch.testing.assert_close(v, v_ref, **TOL)
    torch.testing.assert_close(g, g_ref, **TOL)
    v_plain, _ = ours_policy(batch, preset_kwargs(loss_mode, agg))
    assert not torch.allclose(v, v_plain)  # the weights matter in this case


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl_loss_type", ["low_var_kl", "k3", "k1", "k2+"])
def test_actor_loss_with_entropy_and_kl(loss_mode, loss_agg_mode, kl_loss_type):
    """verl's actor: pg_loss - entropy_coeff * agg(entropy) + kl_loss_coef * agg(kl), each by loss_agg_mode."""
    batch = make_batch(7)
    if loss_mode == "geo_mean" and loss_agg_mode.startswith("seq-mean"):
        # Documented corner (presets.verl): verl's geo_mean policy term is a mean over every row
        # while its entropy / KL terms leave fully masked rows out of seq-mean modes; fusedrl has
        # one rule per call and follows the policy term, so this case is compared without an empty row.
        batch["mask"][2, :2] = 1.0
    config = verl_config(loss_mode, loss_agg_mode, entropy_coeff=0.03, use_kl_loss=True, kl_loss_coef=0.1,
                         kl_loss_type=kl_loss_type)
    config.global_batch_info.update(GLOBAL)
    fn = core_algos.get_policy_loss_fn(loss_mode)
    mask = batch["mask"].bool()
    adv = batch["adv"][:, None].expand(B, T)

    def verl_actor(logp, entropy):
        pg, _ = fn(old_log_prob=batch["old"], log_prob=logp, advantages=adv, response_mask=mask,
                   loss_agg_mode=loss_agg_mode, config=config, rollout_is_weights=None)
        ent = core_algos.agg_loss(entropy, mask, loss_agg_mode, **config.global_batch_info)
        kld = core_algos.kl_penalty(logp, batch["ref"], config.kl_loss_type)
        kl = core_algos.agg_loss(kld, mask, config.loss_agg_mode, **config.global_batch_info)
        return pg - config.entropy_coeff * ent + kl * config.kl_loss_coef

    kw = preset_kwargs(loss_mode, loss_agg_mode, entropy_coeff=0.03, use_kl_loss=True, kl_loss_coef=0.1,
                       kl_loss_type=kl_loss_type)

    def ours_actor(logp, entropy):
        counts = {} if loss_mode == "geo_mean" else global_counts(GLOBAL)
        out, _ = fusedrl.policy_loss(logp, batch["old"], batch["adv"], batch["mask"], ref_logp=batch["ref"],
                                     entropy=entropy, **kw, **counts)
        return out

    if loss_mode == "geo_mean":
        # verl's geo_mean policy term is a plain local mean over rows while its entropy and KL terms
        # use the global counts: compare the terms that fusedrl scales alike.
        config.global_batch_info.clear()
    v_ref, g_ref = grad_of(verl_actor, batch["logp"], batch["entropy"])
    v, g = grad_of(ours_actor, batch["logp"], batch["entropy"])
    dp = 1 if loss_mode == "geo_mean" else GLOBAL["dp_size"]
    torch.testing.assert_close(v * dp, v_ref, **TOL)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a * dp, b, **TOL)
