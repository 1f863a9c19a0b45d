"""Parity of fusedrl's advantage estimators with verl's (``verl.trainer.ppo.core_algos``) and with
TRL's GRPO / RLOO advantage code.

verl: every outcome estimator registered in ``core_algos`` that fusedrl offers (grpo with
``norm_adv_by_std_in_grpo`` on/off, grpo_vectorized, rloo, rloo_vectorized, reinforce_plus_plus,
reinforce_plus_plus_baseline, grpo_passk, opo, remax, gpg, gdpo) and ``compute_gae_advantage_return``
(its whitening included), called on the same batches.

TRL: its advantage code lives inside ``GRPOTrainer._generate_and_score_completions`` and
``RLOOTrainer._generate_and_score_completions``, which need a whole trainer. The tests read the
installed source file, cut out the advantage block (between the marker lines quoted below), and
execute that very code on our rewards with a stand-in ``self`` -- so the oracle is TRL's installed
code, not a transcription. (Nothing of TRL is imported: that saves ~20 s of transformers import.)

Advantages are constants for the loss (verl and TRL compute them under ``torch.no_grad``): there is
no gradient to compare. Values are compared in float64 where the peer keeps the input dtype, and at
float32 precision where the peer casts (verl's vectorized estimators and gdpo).

Not covered here: TRL's NaN ("unscorable completion") handling and RLOO's
``normalize_advantages=True`` (not offered by fusedrl); verl's optimal-token-baseline estimators
(not outcome estimators; not offered).
"""

from __future__ import annotations

import ast
import importlib.util
import textwrap
import types
from importlib import metadata

import numpy as np
import pytest
import torch

import fusedrl

# The versions these tests were written and run against (a newer peer may change behaviour: the
# tests then fail and say where).
VERL_VERSION = "0.9.1"
TRL_VERSION = "1.16.0"

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")

F64 = dict(rtol=1e-7, atol=1e-8)  # float64 (verl keeps a float32 "std = 1" for singletons: ~5e-8 relative)
F32 = dict(rtol=1e-5, atol=1e-5)  # the peer computes in float32


# ----------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------


def make_batch(seed, *, B=16, T=7, binary=False, min_group=1, holes=False):
    """A verl-style batch: left-aligned response masks (``holes``: random masked tokens inside the
    response, as multi-turn observations), the outcome reward at each row's last valid token, group
    ids in random order with groups of random sizes >= ``min_group`` (1: one singleton at least)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).to(torch.float64)
    if holes:
        inner = torch.rand(B, T, generator=g) < 0.3
        inner[torch.arange(B), 0] = False
        inner[torch.arange(B), lengths - 1] = False
        mask = mask * (~inner)
    if binary:
        R = torch.randint(0, 2, (B,), generator=g).to(torch.float64)
    else:
        R = torch.randn(B, generator=g, dtype=torch.float64)
    # group ids: sizes drawn until B rows are covered, then shuffled; ids are arbitrary integers
    sizes, left = ([1], B - 1) if min_group == 1 else ([], B)  # min_group 1: one singleton at least
    while left:
        size = int(torch.randint(min_group, max(min_group, 5) + 1, (1,), generator=g))
        size = min(size, left)
        if left - size and left - size < min_group:
            size = left
        sizes.append(size)
        left -= size
    labels = torch.randint(0, 10_000, (len(sizes),), generator=g)
    labels = labels + torch.arange(len(sizes)) * 10_000  # distinct
    ids = torch.repeat_interleave(labels, torch.tensor(sizes))[torch.randperm(B, generator=g)]
    token_rewards = torch.zeros(B, T, dtype=torch.float64)
    token_rewards[torch.arange(B), lengths - 1] = R
    uid = np.array([f"uid-{int(i)}" for i in ids], dtype=object)
    return R, ids, mask, token_rewards, uid


SEEDS = [0, 1, 2, 3]
CASES = [dict(seed=s, binary=b) for s in SEEDS for b in (False, True)]  # binary: zero-variance groups


def close(ours, theirs, tol=F64, where=None):
    theirs = theirs.to(ours.dtype)
    if where is not None:
        ours, theirs = ours[where], theirs[where]
    torch.testing.assert_close(ours, theirs, **tol)


# ----------------------------------------------------------------------------------------------
# verl outcome estimators
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_grpo(case, norm, eps):
    R, ids, mask, tr, uid = make_batch(**case)
    theirs, returns = core_algos.compute_grpo_outcome_advantage(
        tr, mask, uid, epsilon=eps, norm_adv_by_std_in_grpo=norm
    )
    ours = fusedrl.group_advantages(R, ids, scale="group" if norm else "none", eps=eps, mask=mask)
    assert ours.shape == theirs.shape and ours.dtype == torch.float64
    close(ours, theirs)
    close(ours, returns)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_vectorized(case, norm):
    """verl's vectorized GRPO (float32 statistics) equals its loop GRPO, and ours."""
    R, ids, mask, tr, _ = make_batch(**case)
    theirs, _ = core_algos.compute_grpo_vectorized_outcome_advantage(
        tr, mask, ids.numpy(), epsilon=1e-6, norm_adv_by_std_in_grpo=norm
    )
    ours = fusedrl.group_advantages(R, ids, scale="group" if norm else "none", mask=mask)
    close(ours, theirs, F32)


@pytest.mark.parametrize("case", CASES)
def test_rloo(case):
    R, ids, mask, tr, uid = make_batch(**case)
    theirs, _ = core_algos.compute_rloo_outcome_advantage(tr, mask, uid)
    close(fusedrl.group_advantages(R, ids, estimator="rloo", mask=mask), theirs)
    # without a mask: the per-sequence advantages
    close(fusedrl.group_advantages(R, ids, estimator="rloo"), theirs.sum(-1) / mask.sum(-1))


@pytest.mark.parametrize("case", CASES)
def test_rloo_vectorized_is_singleton_zero(case):
    """verl's two RLOOs disagree on singleton groups: ``rloo`` keeps R, ``rloo_vectorized`` gives 0.
    fusedrl's default follows ``rloo`` (and grpo's mean-0 rule); singleton="zero" gives the other."""
    R, ids, mask, tr, uid = make_batch(**case)
    theirs, _ = core_algos.compute_rloo_vectorized_outcome_advantage(tr, mask, ids.numpy())
    close(fusedrl.group_advantages(R, ids, estimator="rloo", mask=mask, singleton="zero"), theirs)
    loop, _ = core_algos.compute_rloo_outcome_advantage(tr, mask, uid)
    inverse = torch.unique(ids, return_inverse=True)[1]
    single = torch.bincount(inverse)[inverse] == 1
    assert bool(single.any()), "the batch should hold a singleton group"
    assert not torch.allclose(loop[single], theirs[single])  # the disagreement is real


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("holes", [False, True])
def test_reinforce_plus_plus_baseline(case, holes):
    R, ids, mask, tr, uid = make_batch(**case, holes=holes)
    theirs, returns = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(tr, mask, uid)
    close(fusedrl.group_advantages(R, ids, estimator="reinforce++-baseline", mask=mask), theirs, F64)
    close(fusedrl.group_advantages(R, ids, estimator="reinforce_plus_plus_baseline", mask=mask), returns, F64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("holes", [False, True])
def test_reinforce_plus_plus(seed, gamma, holes):
    R, ids, mask, tr, _ = make_batch(seed, holes=holes)
    config = types.SimpleNamespace(gamma=gamma)
    theirs, theirs_returns = core_algos.compute_reinforce_plus_plus_outcome_advantage(tr, mask, config=config)
    # outcome reward: group_advantages places it at the last valid token itself
    close(fusedrl.group_advantages(R, estimator="reinforce++", mask=mask, gamma=gamma), theirs)
    close(fusedrl.discounted_returns(tr, mask, gamma=gamma), theirs_returns)
    # dense token rewards (also at masked tokens, which both sides ignore)
    g = torch.Generator().manual_seed(100 + seed)
    dense = torch.randn(tr.shape, generator=g, dtype=torch.float64)
    theirs, theirs_returns = core_algos.compute_reinforce_plus_plus_outcome_advantage(dense, mask, config=config)
    close(fusedrl.discounted_returns(dense, mask, gamma=gamma), theirs_returns)
    adv, ret = fusedrl.gae(dense, torch.zeros_like(dense), mask, gamma=gamma, lam=1.0, whiten=True)
    close(adv, theirs)
    close(ret, theirs_returns)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk(seed, binary, norm):
    R, ids, mask, tr, uid = make_batch(seed, binary=binary, min_group=2)
    theirs, _ = core_algos.compute_grpo_passk_outcome_advantage(
        tr, mask, uid, epsilon=1e-6, config={"norm_adv_by_std_in_grpo": norm}
    )
    ours = fusedrl.group_advantages(R, ids, estimator="grpo_passk", scale="group" if norm else "none", mask=mask)
    close(ours, theirs)
    assert int((ours.abs().sum(-1) > 0).sum()) <= int(torch.unique(ids).numel())  # at most one row per group


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("holes", [False, True])
def test_opo(case, holes):
    R, ids, mask, tr, uid = make_batch(**case, holes=holes)
    theirs, _ = core_algos.compute_opo_outcome_advantage(tr, mask, uid)
    close(fusedrl.group_advantages(R, ids, estimator="opo", mask=mask), theirs)


@pytest.mark.parametrize("seed", SEEDS)
def test_remax(seed):
    R, ids, mask, tr, _ = make_batch(seed)
    b = torch.randn(R.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theirs, _ = core_algos.compute_remax_outcome_advantage(tr, b, mask)
    close(fusedrl.group_advantages(R, estimator="remax", baseline=b, mask=mask), theirs)


@pytest.mark.parametrize("case", CASES)
def test_gpg(case):
    R, ids, mask, tr, uid = make_batch(**case)
    theirs, _ = core_algos.compute_gpg_outcome_advantage(tr, mask, uid)
    close(fusedrl.group_advantages(R, ids, estimator="gpg", mask=mask), theirs)


@pytest.mark.parametrize("seed", SEEDS)
def test_gdpo_is_normalize_then_sum_with_mask(seed):
    """verl's GDPO: grpo per reward key, weighted sum, masked whitening over tokens. Its reward
    keys arrive as float32 numpy arrays, so its computation is float32."""
    _, ids, mask, tr, uid = make_batch(seed)
    B, T = mask.shape
    g = torch.Generator().manual_seed(seed)
    Rk = torch.randn(B, 3, generator=g, dtype=torch.float64).to(torch.float32)
    weights = [1.0, 0.5, 2.0]
    prompt_len = 3
    batch = {
        "prompts": torch.zeros(B, prompt_len, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(B, prompt_len), mask], dim=1).long(),
    }
    non_tensor = {"uid": uid, **{f"r{k}": Rk[:, k].numpy() for k in range(3)}}
    config = {"gdpo_reward_keys": ["r0", "r1", "r2"], "gdpo_reward_weights": weights}
    theirs, _ = core_algos.compute_gdpo_outcome_advantage(
        tr, mask.to(torch.float32), uid, config=config, non_tensor_batch=non_tensor, batch=batch
    )
    ours = fusedrl.group_advantages(
        Rk.to(torch.float64), ids, combine="normalize_then_sum", weights=weights, mask=mask
    )
    close(ours, theirs, F32)


# ----------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae(seed, gamma, lam, holes):
    """verl always whitens (unbiased variance, +1e-8 inside the square root, over valid tokens);
    its masked positions hold carried values, so the comparison is on valid tokens, and ours are 0
    there."""
    _, _, mask, _, _ = make_batch(seed, holes=holes)
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    theirs_adv, theirs_ret = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    valid = mask != 0
    adv, ret = fusedrl.gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=True)
    close(adv, theirs_adv, where=valid)
    close(ret, theirs_ret, where=valid)
    assert bool((adv[~valid] == 0).all()) and bool((ret[~valid] == 0).all())
    # unwhitened advantages = verl's returns - values
    raw, ret2 = fusedrl.gae(rewards, values, mask, gamma=gamma, lam=lam)
    close(raw, theirs_ret - values, where=valid)
    torch.testing.assert_close(ret2, ret, rtol=0, atol=0)
    # and the whitening itself is verl's masked_whiten
    close(fusedrl.gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=True)[0],
          verl_F.masked_whiten(raw, mask), where=valid)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8)])
def test_gae_bootstrap_against_an_extra_value_token(seed, gamma, lam):
    """T-PPO bootstrap b, checked through verl: give each row one extra valid token after its last
    one, with reward 0 and value b. In verl's GAE that token has delta = -b (nothing follows it), so
    every earlier token t of the row carries an extra (gamma lam)^(L - t) (-b) -- everything else is
    the bootstrapped GAE:  A_ours_t = A_verl_t + (gamma lam)^(L - t) b  (L = row length)."""
    _, _, mask, _, _ = make_batch(seed, T=6)
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    b = torch.randn(B, generator=g, dtype=torch.float64)
    L = mask.sum(-1).long()
    ext = lambda x: torch.cat([x * mask, torch.zeros(B, 1, dtype=x.dtype)], dim=1)  # noqa: E731
    ext_mask, ext_r, ext_v = ext(mask), ext(rewards), ext(values)
    ext_mask[torch.arange(B), L] = 1.0
    ext_v[torch.arange(B), L] = b
    _, theirs_ret = core_algos.compute_gae_advantage_return(ext_r, ext_v, ext_mask, gamma, lam)
    theirs_adv = (theirs_ret - ext_v)[:, :T]
    adv, ret = fusedrl.gae(rewards, values, mask, gamma=gamma, lam=lam, bootstrap=b)
    steps = (L[:, None] - torch.arange(T)[None, :]).to(torch.float64)
    valid = mask != 0
    close(adv, theirs_adv + (gamma * lam) ** steps * b[:, None], where=valid)
    close(ret, adv + values, where=valid)


# ----------------------------------------------------------------------------------------------
# TRL (GRPOTrainer / RLOOTrainer advantage blocks, executed from the installed source)
# ----------------------------------------------------------------------------------------------


def trl_block(module: str, cls: str, first: str, last: str) -> str:
    """The lines of ``cls._generate_and_score_completions`` in the installed TRL ``module`` from the
    line starting with ``first`` to the next line equal to ``last``, dedented."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"{module} is not installed")
    source = open(spec.origin, encoding="utf-8").read()
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    method = next(
        n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "_generate_and_score_completions"
    )
    lines = ast.get_source_segment(source, method).splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
    stop = next(i for i in range(start, len(lines)) if lines[i].strip() == last)
    return textwrap.dedent("\n".join(lines[start : stop + 1]))


def trl_function(module: str, name: str):
    """A module-level function of the installed TRL, compiled from its source (no TRL import)."""
    spec = importlib.util.find_spec(module)
    source = open(spec.origin, encoding="utf-8").read()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"torch": torch}
    exec(compile(ast.get_source_segment(source, node), f"<{module}.{name}>", "exec"), ns)
    return ns[name]


if importlib.util.find_spec("trl") is not None:
    # GRPOTrainer (trl/trainer/grpo_trainer.py), from
    #     if self.multi_objective_aggregation == "sum_then_normalize":
    #         rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
    #         ...
    #             advantages = advantages / (std_rewards + 1e-4)
    #     elif self.multi_objective_aggregation == "normalize_then_sum":
    #         ...
    #         reward_k = (grouped - mean_k) / (std_k + 1e-4)
    #         ...
    #         advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    #     ...
    #     advantages = torch.nan_to_num(advantages, nan=0.0)
    GRPO_BLOCK = trl_block(
        "trl.trainer.grpo_trainer", "GRPOTrainer",
        'if self.multi_objective_aggregation == "sum_then_normalize":',
        "advantages = torch.nan_to_num(advantages, nan=0.0)",
    )
    # RLOOTrainer (trl/trainer/rloo_trainer.py), from
    #     grouped_rewards = rewards.view(-1, num_generations)
    #     ...
    #         baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    #     ...
    #     advantages = torch.nan_to_num(advantages, nan=0.0)
    RLOO_BLOCK = trl_block(
        "trl.trainer.rloo_trainer", "RLOOTrainer",
        "grouped_rewards = rewards.view(-1, num_generations)", "advantages = torch.nan_to_num(advantages, nan=0.0)",
    )
    NANSTD = trl_function("trl.trainer.utils", "nanstd")


def run_trl_grpo(rewards_per_func, weights, num_generations, aggregation, scale_rewards):
    this = types.SimpleNamespace(
        multi_objective_aggregation=aggregation,
        scale_rewards=scale_rewards,
        reward_weights=torch.tensor(weights, dtype=torch.float32),
        reward_funcs=[object()] * rewards_per_func.shape[1],
    )
    ns = dict(
        torch=torch, nanstd=NANSTD, self=this, rewards_per_func=rewards_per_func, num_generations=num_generations,
        device=rewards_per_func.device, unscorable_mask=torch.isnan(rewards_per_func).all(dim=1),
    )
    exec(compile(GRPO_BLOCK, "<trl GRPOTrainer advantages>", "exec"), ns)
    return ns["advantages"]


trl_missing = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")


@trl_missing
def test_trl_source_blocks_are_the_advantage_code():
    """The cut-out blocks are the advantage computations the tests below rely on (TRL version is
    reported on failure)."""
    version = metadata.version("trl")
    for needle in ("scale_rewards", "normalize_then_sum", "std_rewards + 1e-4", "std_k + 1e-4"):
        assert needle in GRPO_BLOCK, f"trl {version} (tests written for {TRL_VERSION}): {needle!r} not in the block"
    assert "baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)" in RLOO_BLOCK, f"trl {version}"


@trl_missing
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_generations", [1, 2, 4])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("binary", [False, True])
def test_trl_grpo_sum_then_normalize(seed, num_generations, K, scale_rewards, binary):
    g = torch.Generator().manual_seed(seed)
    N = 4 * num_generations
    if binary:
        rpf = torch.randint(0, 2, (N, K), generator=g).to(torch.float64)
    else:
        rpf = torch.randn(N, K, generator=g, dtype=torch.float64)
    weights = [1.0, 0.5, 2.0][:K]
    theirs = run_trl_grpo(rpf, weights, num_generations, "sum_then_normalize", scale_rewards)
    # TRL's eps is 1e-4; num_generations = 1 (evaluation only) gives 0, fusedrl's singleton="zero"
    ours = fusedrl.group_advantages(
        rpf, group_size=num_generations, scale=scale_rewards, eps=1e-4, combine="sum_then_normalize",
        weights=weights, singleton="zero",
    )
    close(ours, theirs)
    if K == 1:  # one reward function: plain [N] rewards
        plain = fusedrl.group_advantages(
            rpf[:, 0], group_size=num_generations, scale=scale_rewards, eps=1e-4, singleton="zero"
        )
        close(plain, theirs)
    if num_generations > 1:  # layouts are interchangeable: the same groups as shuffled arbitrary ids
        perm = torch.randperm(N, generator=g)
        ids = (torch.arange(N) // num_generations) * 7 - 3
        shuffled = fusedrl.group_advantages(
            rpf[perm], ids[perm], scale=scale_rewards, eps=1e-4, combine="sum_then_normalize", weights=weights
        )
        close(shuffled, theirs[perm])


@trl_missing
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_generations", [2, 4])
@pytest.mark.parametrize("binary", [False, True])
def test_trl_grpo_normalize_then_sum(seed, num_generations, binary):
    g = torch.Generator().manual_seed(seed)
    N, K = 4 * num_generations, 3
    if binary:
        rpf = torch.randint(0, 2, (N, K), generator=g).to(torch.float64)
    else:
        rpf = torch.randn(N, K, generator=g, dtype=torch.float64)
    weights = [1.0, 0.5, 2.0]
    theirs = run_trl_grpo(rpf, weights, num_generations, "normalize_then_sum", "group")
    ours = fusedrl.group_advantages(
        rpf, group_size=num_generations, eps=1e-4, combine="normalize_then_sum", weights=weights
    )
    close(ours, theirs)


@trl_missing
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_generations", [1, 2, 3, 5])
def test_trl_rloo(seed, num_generations):
    g = torch.Generator().manual_seed(seed)
    N = 3 * num_generations
    rewards = torch.randn(N, generator=g, dtype=torch.float64)
    ns = dict(torch=torch, nanstd=NANSTD, self=types.SimpleNamespace(normalize_advantages=False),
              rewards=rewards, num_generations=num_generations)
    exec(compile(RLOO_BLOCK, "<trl RLOOTrainer advantages>", "exec"), ns)
    ours = fusedrl.group_advantages(rewards, group_size=num_generations, estimator="rloo", singleton="zero")
    close(ours, ns["advantages"])
