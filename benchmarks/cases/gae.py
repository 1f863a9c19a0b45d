"""GAE and REINFORCE++ returns along T (the scan primitive) at B x T, right-padded responses.

Configs:
- ``scan="gae"``: (advantages, returns) of GAE with verl's whitening of the advantages, as verl
  ``compute_gae_advantage_return`` (gamma 1.0, lambda 0.95).
- ``scan="returns"``: REINFORCE++ as verl ``compute_reinforce_plus_plus_outcome_advantage``:
  returns = discounted returns (gamma 1.0), advantages = their masked whitening. fusedrl runs it
  as ``fusedrl.gae(r, 0, mask, lam=1, whiten=True)`` (GAE with V = 0 and lambda = 1 is the
  discounted return; the zero values are one [1, T] row broadcast over B, so nothing extra is read).

Inputs: token rewards with the outcome score at each row's last valid token plus a small dense
term, values (GAE), and verl's int64 ``response_mask`` (right-padded, random lengths 1..T), the
same tensors for every implementation. Outputs are float32.
"""

from __future__ import annotations

import torch

CASE = "gae"
floor_note = "one read of rewards, values (gae) and the mask, one write of advantages and returns"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GAMMA, LAM = 1.0, 0.95


def configs(quick: bool):
    B, T = (64, 512) if quick else (512, 4096)
    return [
        {"scan": "gae", "B": B, "T": T, "dtype": "fp32"},
        {"scan": "gae", "B": B, "T": T, "dtype": "bf16"},
        {"scan": "returns", "B": B, "T": T, "dtype": "fp32"},
    ]


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    B, T, dtype = cfg["B"], cfg["T"], DTYPES[cfg["dtype"]]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    pos = torch.arange(T)
    mask = (pos < lengths[:, None]).to(torch.int64)  # verl's response_mask dtype
    rewards = 0.01 * torch.randn(B, T, generator=g)
    rewards[pos == (lengths[:, None] - 1)] += torch.randn(B, generator=g)  # the outcome score
    rewards = (rewards * mask).to(dtype)
    values = (torch.randn(B, T, generator=g) * mask).to(dtype) if cfg["scan"] == "gae" else None
    return rewards, values, mask


def _zeros_row(rewards):
    """V = 0 for the returns config: one row broadcast over B (row stride 0)."""
    return torch.zeros(1, rewards.shape[1], dtype=rewards.dtype).expand_as(rewards)


def _fusedrl(cfg, backend):
    import fusedrl

    r, v, m = _inputs(cfg)
    if cfg["scan"] == "gae":
        return lambda: fusedrl.gae(r, v, m, gamma=GAMMA, lam=LAM, whiten=True, backend=backend)
    zeros = _zeros_row(r)
    return lambda: fusedrl.gae(r, zeros, m, gamma=GAMMA, lam=1.0, whiten=True, backend=backend)


def make_fusedrl(cfg):
    return _fusedrl(cfg, "cpu")


def make_reference(cfg):
    """fusedrl's torch backend: the plain-PyTorch reference (a Python loop over T)."""
    return _fusedrl(cfg, "torch")


def make_verl(cfg):
    """verl compute_gae_advantage_return (gae) / compute_reinforce_plus_plus_outcome_advantage
    (returns): Python loops over T with several torch ops per step, then masked_whiten."""
    from verl.trainer.ppo import core_algos

    r, v, m = _inputs(cfg)
    if cfg["scan"] == "gae":
        return lambda: core_algos.compute_gae_advantage_return(r, v, m, gamma=GAMMA, lam=LAM)
    from verl.trainer.config import AlgoConfig

    config = AlgoConfig(gamma=GAMMA)
    return lambda: core_algos.compute_reinforce_plus_plus_outcome_advantage(r, m, config=config)


def make_floor(cfg):
    r, v, m = _inputs(cfg)

    def step():
        adv = torch.empty(r.shape, dtype=torch.float32)
        ret = torch.empty(r.shape, dtype=torch.float32)
        adv.copy_(r)
        ret.copy_(v if v is not None else r)  # (returns: r is read once more, a cached second read)
        return adv, ret, m.sum()  # the mask, read once

    return step


IMPLS = {"fusedrl": make_fusedrl, "reference": make_reference, "verl": make_verl, "floor": make_floor}


def extra_buffers_bytes(cfg) -> int:
    """Bytes every implementation must hold beyond its inputs: the float32 advantages and returns."""
    return 2 * cfg["B"] * cfg["T"] * 4


def targets(cfg, res) -> list[str]:
    """The issue's targets, checked on this run's numbers: >= 50x verl, <= 3x the floor."""
    from benchmarks.harness import floor_ratio  # noqa: PLC0415

    ours = res.get("fusedrl", {})
    if "median_s" not in ours:
        return ["fusedrl failed: no targets checked"]
    out = []
    verl = res.get("verl", {})
    name = "compute_gae_advantage_return" if cfg["scan"] == "gae" else "compute_reinforce_plus_plus_outcome_advantage"
    if "median_s" in verl:
        x = verl["median_s"] / ours["median_s"]
        out.append(f"speed vs verl {name}: {x:.1f}x (target >= 50x: {'met' if x >= 50 else 'MISSED'})")
    r = res.get("reference", {})
    if "median_s" in r:
        out.append(f"speed vs reference: {r['median_s'] / ours['median_s']:.1f}x")
    floor = res.get("floor", {})
    if "median_s" in floor:
        x, how = floor_ratio(ours, floor)
        out.append(f"time / floor: {x:.2f}x (target <= 3x: {'met' if x <= 3 else 'MISSED'}{how})")
    return out
