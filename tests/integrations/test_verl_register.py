"""fusedrl.integrations.verl: the fusedrl_* policy losses registered in verl's own registry equal
verl's functions of the same mode (values, gradients and the shared metrics), locally and with
verl's global_batch_info (dp_size included); the fusedrl_* advantage estimators equal verl's of the
same name on string uids in shuffled order (zero-variance groups included); refusals; register /
unregister."""

from __future__ import annotations

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
ActorConfig = pytest.importorskip("verl.workers.config.actor").ActorConfig

from fusedrl.integrations import verl as fverl  # noqa: E402

B, T = 6, 9
MODES = ["vanilla", "gspo", "gpg", "cispo", "sapo", "geo_mean"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum"]
GLOBAL = dict(dp_size=4, batch_num_tokens=97, global_batch_size=19, loss_scale_factor=11)


@pytest.fixture(autouse=True, scope="module")
def registered():
    names = fverl.register()
    yield names
    fverl.unregister()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    old[0, :3] = logp[0, :3] - torch.tensor([1.6, -1.6, 2.5], dtype=torch.float64)  # beyond the dual clip
    lengths = torch.tensor([T, 4, 0, 1, 6, 3])  # a fully masked row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv[0] = -1.0
    return logp, old, adv, mask


def config(agg, global_info):
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2, clip_ratio_low=0.15,
                      clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=1.3, tau_neg=0.8, loss_agg_mode=agg)
    if global_info:
        cfg.global_batch_info.update(GLOBAL)
    return cfg


def run(name, agg, cfg):
    logp, old, adv, mask = batch()
    x = logp.clone().requires_grad_(True)
    loss, metrics = core_algos.get_policy_loss_fn(name)(old_log_prob=old, log_prob=x, advantages=adv,
                                                        response_mask=mask, loss_agg_mode=agg, config=cfg)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mode", MODES)
def test_equals_verls_function_of_the_same_mode(mode, agg, global_info):
    cfg = config(agg, global_info)
    v_ref, g_ref, m_ref = run(mode, agg, cfg)
    v, g, m = run(f"fusedrl_{mode}", agg, cfg)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert abs(m["actor/ppo_kl"] - verl_ppo_kl()) < 1e-12
    if mode == "vanilla":
        for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
            assert m[key] == pytest.approx(m_ref[key], abs=1e-6), key  # verl counts in float32
        assert m["actor/pg_clipfrac_lower"] > 0


def verl_ppo_kl():
    logp, old, _, mask = batch()
    return float(((old - logp) * mask).sum() / mask.sum())


def test_refusals():
    logp, old, adv, mask = batch()
    fn = core_algos.get_policy_loss_fn("fusedrl_vanilla")
    with pytest.raises(ValueError, match="rollout_is_weights"):
        fn(old, logp, adv, mask, "token-mean", config("token-mean", False), torch.ones(B, T, dtype=torch.float64))
    with pytest.raises(ValueError, match="config"):
        fn(old, logp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match="mode must be one of"):
        fverl.policy_loss_fn("dppo_kl")


def test_register_is_reversible_and_leaves_verls_entries(registered):
    assert set(registered) == {f"fusedrl_{m}" for m in MODES} | {f"fusedrl_{e}" for e in ESTIMATORS}
    assert all(f"fusedrl_{e}" in core_algos.ADV_ESTIMATOR_REGISTRY for e in ESTIMATORS)
    before = dict(core_algos.POLICY_LOSS_REGISTRY)
    fverl.unregister()
    assert not any(n.startswith("fusedrl_") for n in core_algos.POLICY_LOSS_REGISTRY)
    assert not any(n.startswith("fusedrl_") for n in core_algos.ADV_ESTIMATOR_REGISTRY)
    assert all(core_algos.POLICY_LOSS_REGISTRY[n] is f for n, f in before.items() if not n.startswith("fusedrl_"))
    fverl.register()
    core_algos.POLICY_LOSS_REGISTRY["fusedrl_gpg"] = core_algos.POLICY_LOSS_REGISTRY["gpg"]
    try:
        with pytest.raises(ValueError, match="already registered"):
            fverl.register()
    finally:
        del core_algos.POLICY_LOSS_REGISTRY["fusedrl_gpg"]
        fverl.register()


ESTIMATORS = ["grpo", "rloo", "opo", "gpg", "grpo_passk", "reinforce_plus_plus_baseline"]


def adv_batch(seed, binary, singleton):
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 2, 4, 3] + ([1] if singleton else [])
    n = sum(sizes)
    labels = [f"uid-{seed}-{k}" for k in range(len(sizes))]
    perm = torch.randperm(n, generator=g)
    index = np.array([labels[k] for k, size in enumerate(sizes) for _ in range(size)], dtype=object)[perm.numpy()]
    T = 7
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.float64)
    R = torch.randint(0, 2, (n,), generator=g).double() if binary else torch.randn(n, generator=g, dtype=torch.float64)
    rewards = torch.zeros(n, T, dtype=torch.float64)
    rewards[torch.arange(n), lengths - 1] = R
    return rewards, mask, index


@pytest.mark.parametrize("binary", [False, True], ids=["gauss", "binary"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_advantage_estimators_equal_verls(estimator, norm, binary):
    rewards, mask, index = adv_batch(3, binary, singleton=estimator != "grpo_passk")
    kwargs = dict(token_level_rewards=rewards, response_mask=mask, index=index, epsilon=1e-6,
                  config={"norm_adv_by_std_in_grpo": norm})
    if estimator in ("grpo", "grpo_passk"):
        kwargs["norm_adv_by_std_in_grpo"] = norm
    theirs, their_returns = core_algos.get_adv_estimator_fn(estimator)(**kwargs)
    ours, returns = core_algos.get_adv_estimator_fn(f"fusedrl_{estimator}")(**kwargs)
    assert ours.shape == theirs.shape == (rewards.shape[0], rewards.shape[1])
    # verl mixes float32 into some float64 paths (its singleton constants torch.tensor(0.0) / (1.0),
    # gpg's scaling): float32 rounding of O(1) values is the tolerance
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(returns, their_returns.to(ours.dtype), rtol=1e-6, atol=1e-6)
    assert ours.abs().sum() > 0


def test_advantage_refusals():
    rewards, mask, index = adv_batch(0, False, False)
    with pytest.raises(ValueError, match="index"):
        core_algos.get_adv_estimator_fn("fusedrl_grpo")(rewards, mask, None)
    with pytest.raises(ValueError, match="index must have one uid per response"):
        core_algos.get_adv_estimator_fn("fusedrl_grpo")(rewards, mask, index[:-1])
    with pytest.raises(ValueError, match="f_norm"):
        core_algos.get_adv_estimator_fn("fusedrl_gpg")(rewards, mask, index, f_norm=2.0)
    with pytest.raises(ValueError, match="name must be one of"):
        fverl.advantage_fn("gae")
