"""Group advantages (GRPO) at N rows: fixed groups of 16 or random group sizes 1..64 with shuffled
ids; K = 1 objective, or K = 4 weighted objectives combined by "sum_then_normalize" or
"normalize_then_sum" (GDPO).

Implementations (all produce float32 advantages; eps = 1e-6 for fusedrl / verl, TRL's 1e-4 in
TRL's lines):

- fusedrl: ``fusedrl.group_advantages(..., backend="cpu")`` (the segment-statistics kernel).
- reference: the same call with ``backend="torch"``.
- verl_loop: verl ``compute_grpo_outcome_advantage`` (a Python loop over rows and groups);
  verl_vectorized: verl ``compute_grpo_vectorized_outcome_advantage``. Both take token-level
  scores ``[N, T]`` and a response mask: here T = 1 (the outcome score as the only token, mask of
  ones), so they do no token work. K = 4: "sum_then_normalize" scalarizes first (``R @ w``, timed)
  and runs the estimator once; "normalize_then_sum" is verl's GDPO
  (``compute_gdpo_outcome_advantage``: the estimator per objective, weighted sum,
  ``verl_F.masked_whiten``), written out here because verl's function reads the per-objective
  scores from a trainer batch (its loop body is reproduced with each estimator).
- trl: TRL's lines from ``GRPOTrainer._generate_and_score_completions`` (trl 1.16), quoted
  below; TRL's layout is contiguous groups of ``num_generations``, so it runs on the fixed
  layout only (the random layout lists it as failed: not applicable).
- floor: a copy of the rewards ``[N, K]`` to a fresh output (one read and one write).
"""

from __future__ import annotations

import torch

CASE = "group_advantages"
floor_note = "a copy of the rewards [N, K] to a new tensor"
WEIGHTS = [1.0, 0.5, 0.25, 2.0]
GROUP = 16


def configs(quick: bool):
    N = 2048 if quick else 65536
    out = []
    for layout in ("size16", "random"):
        out.append({"N": N, "layout": layout, "K": 1, "combine": "none"})
        for combine in ("sum_then_normalize", "normalize_then_sum"):
            out.append({"N": N, "layout": layout, "K": 4, "combine": combine})
    return out


def _inputs(cfg):
    """rewards [N] or [N, K] float32 (binary, as verifiable rewards: many zero-variance groups),
    dense ids [N] (shuffled for "random"), and the fixed group size (None for "random")."""
    g = torch.Generator().manual_seed(0)
    N, K = cfg["N"], cfg["K"]
    R = (torch.rand(N, K, generator=g) > 0.5).float() + 0.1 * torch.rand(N, K, generator=g)
    R = R[:, 0].contiguous() if K == 1 else R
    if cfg["layout"] == "size16":
        size = GROUP if N % GROUP == 0 else N
        ids = torch.arange(N) // size
        return R, ids, size
    sizes, left = [], N
    while left:
        s = min(int(torch.randint(1, 65, (1,), generator=g)), left)
        sizes.append(s)
        left -= s
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ids = ids[torch.randperm(N, generator=g)] * 7 + 3  # shuffled, not dense
    return R, ids, None


def _fusedrl(cfg, backend):
    import fusedrl

    R, ids, size = _inputs(cfg)
    layout = dict(group_size=size) if size else dict(group_ids=ids)
    kw = {} if cfg["K"] == 1 else dict(weights=WEIGHTS, combine=cfg["combine"])
    return lambda: fusedrl.group_advantages(R, **layout, **kw, backend=backend)


def make_fusedrl(cfg):
    return _fusedrl(cfg, "cpu")


def make_reference(cfg):
    """fusedrl's torch backend: the plain-PyTorch reference (index_add_ / scatter_reduce_)."""
    return _fusedrl(cfg, "torch")


def _verl(cfg, estimator):
    import verl.utils.torch_functional as verl_F

    R, ids, _ = _inputs(cfg)
    index = ids.numpy()  # verl's uid array (one label per row)
    mask = torch.ones(R.shape[0], 1)
    w = torch.tensor(WEIGHTS)

    def run(scores):  # T = 1: the outcome score is the only token
        return estimator(scores.unsqueeze(-1), mask, index, epsilon=1e-6)[0]

    if cfg["K"] == 1:
        return lambda: run(R)
    if cfg["combine"] == "sum_then_normalize":
        return lambda: run(R @ w)

    def gdpo():  # verl compute_gdpo_outcome_advantage's body, one estimator call per objective
        total = None
        for k in range(R.shape[1]):
            a = w[k] * run(R[:, k].contiguous())
            total = a if total is None else total + a
        return verl_F.masked_whiten(total, mask) * mask

    return gdpo


def make_verl_loop(cfg):
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    return _verl(cfg, compute_grpo_outcome_advantage)


def make_verl_vectorized(cfg):
    from verl.trainer.ppo.core_algos import compute_grpo_vectorized_outcome_advantage

    return _verl(cfg, compute_grpo_vectorized_outcome_advantage)


def make_trl(cfg):
    """TRL's group mean/std lines (trl/trainer/grpo_trainer.py, _generate_and_score_completions),
    with scale_rewards="group" and no unscorable rows:

        # sum_then_normalize
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        advantages = rewards - mean_grouped_rewards
        advantages = advantages / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # for logging

        # normalize_then_sum
        grouped = rewards_per_func.view(-1, num_generations, len(self.reward_funcs))
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, len(self.reward_funcs))
        rewards = (reward_k * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # for logging

    (K = 1 is sum_then_normalize with one reward function of weight 1.)
    """
    from trl.trainer.utils import nanstd

    R, _, size = _inputs(cfg)
    if size is None:
        raise ValueError("not applicable: TRL's code needs contiguous groups of num_generations rows")
    num_generations = size
    rewards_per_func = R.unsqueeze(-1) if cfg["K"] == 1 else R
    reward_weights = torch.tensor(WEIGHTS[: rewards_per_func.shape[1]])

    if cfg["combine"] == "normalize_then_sum":

        def step():
            grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
            mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
            std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
            reward_k = (grouped - mean_k) / (std_k + 1e-4)
            reward_k = reward_k.view(-1, rewards_per_func.shape[1])
            rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
            std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
            advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
            torch.isclose(std_rewards, torch.zeros_like(std_rewards))
            return advantages

        return step

    def step():
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        advantages = rewards - mean_grouped_rewards
        advantages = advantages / (std_rewards + 1e-4)
        torch.isclose(std_rewards, torch.zeros_like(std_rewards))
        return advantages

    return step


def make_floor(cfg):
    R, _, _ = _inputs(cfg)

    def step():
        out = torch.empty_like(R)
        out.copy_(R)
        return out

    return step


IMPLS = {
    "fusedrl": make_fusedrl,
    "reference": make_reference,
    "verl_loop": make_verl_loop,
    "verl_vectorized": make_verl_vectorized,
    "trl": make_trl,
    "floor": make_floor,
}


def targets(cfg, res) -> list[str]:
    """The issue's targets on this run's numbers: >= 100x verl's loop, >= 10x its vectorized
    version, within 3x of the floor."""
    from benchmarks.harness import floor_ratio  # noqa: PLC0415

    ours = res.get("fusedrl", {})
    if "median_s" not in ours:
        return ["fusedrl failed: no targets checked"]
    out = []
    for peer, goal in (("verl_loop", 100), ("verl_vectorized", 10)):
        r = res.get(peer, {})
        if "median_s" in r:
            x = r["median_s"] / ours["median_s"]
            out.append(f"speed vs {peer}: {x:.1f}x (target >= {goal}x: {'met' if x >= goal else 'MISSED'})")
    trl = res.get("trl", {})
    if "median_s" in trl:
        out.append(f"speed vs trl: {trl['median_s'] / ours['median_s']:.1f}x (no target)")
    floor = res.get("floor", {})
    if "median_s" in floor:
        x, how = floor_ratio(ours, floor)
        out.append(f"time / floor: {x:.2f}x (target <= 3x: {'met' if x <= 3 else 'MISSED'}{how})")
    return out
