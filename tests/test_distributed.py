"""fusedrl.distributed on gloo, 2 and 4 CPU processes: data-parallel normalizers and group
advantages, vocabulary-parallel log-probs, each against the one-process computation.

One spawn per world size runs every case (``CASES``) in order on every rank; each rank builds the
same global batch from a seeded generator, keeps its slice, runs the distributed function and
compares with the one-process result it computes itself. The ranks record each case's outcome in a
JSON file; one pytest test per (world size, case) reads it. A rank that fails a case stops (its
peers then time out in their next collective and stop too), so a failure shows as that case's
traceback and the later cases as not run.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedrl
import fusedrl.distributed as fd

WORLD_SIZES = (2, 4)
TOL = {torch.float64: dict(rtol=1e-6, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-6)}
AGGREGATIONS = fusedrl.policy.AGGREGATIONS
CASES: dict = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _row_split(n, world, seed, cut_at=1):
    """Uneven contiguous row ranges of ``n`` rows over ``world`` ranks (each non-empty), cut at
    multiples of ``cut_at``."""
    g = _gen(seed)
    blocks = n // cut_at
    cuts = sorted(torch.randperm(blocks - 1, generator=g)[: world - 1].add(1).tolist())
    edges = [0] + [c * cut_at for c in cuts] + [n]
    return [(edges[r], edges[r + 1]) for r in range(world)]


def _ddp_mean(t):
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def _sum(t):
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def _close(actual, expected, dtype=torch.float64, what=""):
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# data parallel: the policy loss and aggregate with global normalizers


def _policy_batch(seed, dtype, groups, group_rows=3, T=7, float_mask=False):
    g = _gen(seed)
    B = groups * group_rows
    base = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    feat = torch.randn(B, T, generator=g, dtype=torch.float64)
    old = base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[1] = 0  # an empty row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if float_mask:
        mask = mask * (0.5 + torch.rand(B, T, generator=g, dtype=torch.float64))
    T_used = max(1, int(lengths.max()))
    cast = lambda t: t[:, :T_used].to(dtype)  # noqa: E731
    return dict(base=cast(base), feat=cast(feat), old=cast(old), adv=adv.to(dtype),
                mask=mask[:, :T_used].to(dtype) if float_mask else mask[:, :T_used],
                ref=cast(base + 0.2 * feat), ent=cast(torch.rand(B, T, generator=g, dtype=torch.float64)),
                group_ids=torch.arange(B) // group_rows * 7 + 3, lengths=lengths)


def _rows(batch, lo, hi):
    """A rank's rows, its columns trimmed to its own longest row (T differs between ranks)."""
    T_r = max(1, int(batch["lengths"][lo:hi].max()))
    out = {}
    for k, v in batch.items():
        out[k] = v[lo:hi, :T_r] if (v.dim() == 2) else v[lo:hi]
    return out


def _loss_of(b, theta, *, mode, backend, options, norms=None, exclude_empty_rows=False):
    logp = theta[0] * b["base"] + theta[1] * b["feat"]
    extra = dict(options)
    if extra.pop("with_terms", False):
        extra.update(ref_logp=b["ref"], beta=0.05, entropy=b["ent"] * theta[1], entropy_coef=0.01,
                     kl_aggregation="seq-mean-token-sum", entropy_aggregation="token-mean")
    loss, _ = fusedrl.policy_loss(logp, b["old"], b["adv"], b["mask"], aggregation=mode, group_ids=b["group_ids"],
                                  exclude_empty_rows=exclude_empty_rows, backend=backend, **extra, **(norms or {}))
    return loss


POLICY_OPTIONS = [
    dict(),
    dict(ratio="sequence"),
    dict(surrogate="sapo", with_terms=True),
    dict(surrogate="cispo", clip_high=0.3),
]


def _check_policy(rank, world, dtype, backend, float_mask, seed):
    groups = 2 * world + 1
    batch = _policy_batch(seed, dtype, groups, float_mask=float_mask)
    lo, hi = _row_split(groups * 3, world, seed, cut_at=3)[rank]
    mine = _rows(batch, lo, hi)
    for k, mode in enumerate(AGGREGATIONS):
        options = POLICY_OPTIONS[(k + seed) % len(POLICY_OPTIONS)]
        for exclude in (False, True):
            theta = torch.tensor([1.0, 0.3], dtype=dtype, requires_grad=True)
            full = _loss_of(batch, theta, mode=mode, backend=backend, options=options, exclude_empty_rows=exclude)
            (g_full,) = torch.autograd.grad(full, theta)
            theta_r = theta.detach().clone().requires_grad_(True)
            norms = fd.global_normalizers(mine["mask"], exclude_empty_rows=exclude, advantages=mine["adv"],
                                          group_ids=mine["group_ids"])
            assert norms.scale == world
            loss = _loss_of(mine, theta_r, mode=mode, backend=backend, options=options, norms=norms)
            (loss * norms.scale).backward()
            what = f"{mode} {options} exclude_empty_rows={exclude} {dtype} {backend}"
            _close(_sum(loss), full.detach(), dtype, what + " loss")
            _close(_ddp_mean(theta_r.grad), g_full, dtype, what + " DDP gradient")


@case
def policy_loss_every_aggregation_fp64_cpu(rank, world):
    _check_policy(rank, world, torch.float64, "cpu", False, 1)


@case
def policy_loss_every_aggregation_fp32_cpu_float_mask(rank, world):
    _check_policy(rank, world, torch.float32, "cpu", True, 2)


@case
def policy_loss_every_aggregation_fp64_torch(rank, world):
    _check_policy(rank, world, torch.float64, "torch", False, 3)


@case
def aggregate_every_mode_and_gradient_per_token(rank, world):
    groups = 2 * world + 1
    batch = _policy_batch(4, torch.float64, groups, float_mask=True)
    lo, hi = _row_split(groups * 3, world, 4, cut_at=3)[rank]
    mine = _rows(batch, lo, hi)
    for mode in AGGREGATIONS:
        for exclude in (False, True):
            values = batch["base"].clone().requires_grad_(True)
            full = fusedrl.aggregate(values, batch["mask"], mode, advantages=batch["adv"], group_ids=batch["group_ids"],
                                     exclude_empty_rows=exclude)
            full.backward()
            v_r = mine["base"].clone().requires_grad_(True)
            norms = fd.global_normalizers(mine["mask"], exclude_empty_rows=exclude, advantages=mine["adv"],
                                          group_ids=mine["group_ids"])
            part = fusedrl.aggregate(v_r, mine["mask"], mode, advantages=mine["adv"], group_ids=mine["group_ids"], **norms)
            part.backward()
            _close(_sum(part), full.detach(), what=f"aggregate {mode}")
            # d loss / d values of this rank's tokens: the one-process gradient's slice
            _close(v_r.grad, values.grad[lo:hi, : v_r.shape[1]], what=f"aggregate {mode} gradient")


@case
def micro_batches_and_ranks_together(rank, world):
    """Two gradient-accumulation micro-batches per rank: norms from the list of masks, the summed
    micro-batch losses times D averaged over ranks = the one-process step."""
    groups = 4 * world
    batch = _policy_batch(5, torch.float64, groups)
    lo, hi = _row_split(groups * 3, world, 5, cut_at=6)[rank]
    mid = lo + 3 * ((hi - lo) // 6)
    micro = [_rows(batch, lo, mid), _rows(batch, mid, hi)]
    for mode in AGGREGATIONS:
        theta = torch.tensor([1.0, 0.3], dtype=torch.float64, requires_grad=True)
        full = _loss_of(batch, theta, mode=mode, backend="cpu", options={})
        (g_full,) = torch.autograd.grad(full, theta)
        theta_r = theta.detach().clone().requires_grad_(True)
        norms = fd.global_normalizers([m["mask"] for m in micro], advantages=[m["adv"] for m in micro],
                                      group_ids=[m["group_ids"] for m in micro])
        total = 0
        for m in micro:
            loss = _loss_of(m, theta_r, mode=mode, backend="cpu", options={}, norms=norms)
            (loss * norms.scale).backward()
            total = total + loss.detach()
        _close(_sum(total), full.detach(), what=f"{mode} micro-batch loss")
        _close(_ddp_mean(theta_r.grad), g_full, what=f"{mode} micro-batch DDP gradient")


@case
def packed_layout(rank, world):
    groups = 2 * world + 1
    batch = _policy_batch(6, torch.float64, groups)
    lo, hi = _row_split(groups * 3, world, 6, cut_at=3)[rank]
    mine = _rows(batch, lo, hi)
    lengths = mine["lengths"]
    valid = mine["mask"]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])

    def pack(t):
        return t[valid].reshape(1, -1)

    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        for exclude in (False, True):
            theta = torch.tensor([1.0, 0.3], dtype=torch.float64, requires_grad=True)
            extra = dict(max_length=11) if mode == "seq-mean-token-sum-norm" else {}
            full = _loss_of(batch, theta, mode=mode, backend="cpu", options=extra, exclude_empty_rows=exclude)
            (g_full,) = torch.autograd.grad(full, theta)
            theta_r = theta.detach().clone().requires_grad_(True)
            norms = fd.global_normalizers(pack(valid), cu_seqlens=cu, exclude_empty_rows=exclude, **extra)
            assert ("max_length" in norms) == bool(extra)
            logp = theta_r[0] * pack(mine["base"]) + theta_r[1] * pack(mine["feat"])
            loss, _ = fusedrl.policy_loss(logp, pack(mine["old"]), mine["adv"], pack(valid), aggregation=mode,
                                          cu_seqlens=cu, **norms)
            (loss * norms.scale).backward()
            _close(_sum(loss), full.detach(), what=f"packed {mode}")
            _close(_ddp_mean(theta_r.grad), g_full, what=f"packed {mode} gradient")


@case
def balanced_groups_split_over_ranks_raise_everywhere(rank, world):
    batch = _policy_batch(7, torch.float64, 2 * world + 1)
    n = batch["adv"].shape[0]
    lo, hi = _row_split(n, world, 7)[rank]  # cuts inside groups
    cuts_inside = any(a % 3 for a, _ in _row_split(n, world, 7)[1:])
    gid = batch["group_ids"][lo:hi]
    if not cuts_inside:  # force a split group: every rank names group 3
        gid = torch.full_like(gid, 3)
    mask = batch["mask"][lo:hi]
    adv = torch.ones(hi - lo, dtype=torch.float64)
    with pytest.raises(ValueError, match="whole in one micro-batch of one rank"):
        fd.global_normalizers(mask, advantages=adv, group_ids=gid)
    with pytest.raises(ValueError, match="group_ids=None"):
        fd.global_normalizers(mask, advantages=adv)
    # without advantages no group count is formed: the other counts still come back
    norms = fd.global_normalizers(mask)
    assert set(norms) == {"num_tokens", "num_sequences", "max_length"}
    assert float(norms["num_tokens"]) == float(batch["mask"].sum())


@case
def dp_average_false_and_counts(rank, world):
    mask = torch.ones(rank + 1, 3 + rank, dtype=torch.bool)
    mask[0, 1:] = False
    norms = fd.global_normalizers(mask, dp_average=False)
    rows = sum(r + 1 for r in range(world))
    tokens = sum((r + 1) * (3 + r) - (2 + r) for r in range(world))
    assert norms.scale == 1.0 and fd.dp_scale() == world
    assert float(norms["num_tokens"]) == tokens and float(norms["num_sequences"]) == rows
    assert norms["max_length"] == 3 + world - 1
    excl = fd.global_normalizers(mask, exclude_empty_rows=True)
    assert float(excl["num_sequences"]) == rows  # no empty row here
    dump = {k: float(v) for k, v in norms.items()}
    assert dump["num_sequences"] == rows


@case
def verl_agg_loss_inputs(rank, world):
    """Saves this rank's loss matrix, mask, counts and scaled loss for the verl parity test (run in
    the parent, which imports verl once)."""
    groups = 2 * world + 1
    batch = _policy_batch(8, torch.float64, groups)
    lo, hi = _row_split(groups * 3, world, 8, cut_at=3)[rank]
    mine = _rows(batch, lo, hi)
    out = {}
    for mode in ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        norms = fd.global_normalizers(mine["mask"], exclude_empty_rows=True, max_length=9)
        loss = fusedrl.aggregate(mine["base"], mine["mask"], mode, **norms) * norms.scale
        out[mode] = dict(loss=float(loss), tokens=float(norms["num_tokens"]), seqs=float(norms["num_sequences"]))
    torch.save(dict(values=mine["base"], mask=mine["mask"], out=out), os.environ["FUSEDRL_TEST_OUT"] + f"/verl{rank}.pt")


# ---------------------------------------------------------------------------------------------
# data parallel: group advantages over groups that span ranks


def _reward_batch(seed, N, T=6, K=None):
    g = _gen(seed)
    rewards = torch.randn(N, generator=g, dtype=torch.float64) if K is None else torch.randn(
        N, K, generator=g, dtype=torch.float64)
    rewards[:3] = rewards[0]  # ties, a zero-variance stretch
    ids = torch.randint(0, max(2, N // 4), (N,), generator=g) * 11 - 5  # groups scattered over the rows
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return rewards, ids, mask, lengths


def _local_tokens(t, lengths, lo, hi):
    T_r = int(lengths[lo:hi].max())
    return t[lo:hi, :T_r]


@case
def group_advantages_every_estimator(rank, world):
    N = 6 * world + 1
    lo, hi = _row_split(N, world, 11)[rank]
    for k, (est, spec) in enumerate([
        ("grpo", {}), ("grpo", dict(scale="batch")), ("grpo", dict(scale="none", singleton="zero")), ("rloo", {}),
        ("reinforce++-baseline", {}), ("gpg", {}), ("opo", dict(use_mask=True)), ("grpo", dict(use_mask=True)),
        ("reinforce++-baseline", dict(use_mask=True)), ("reinforce++", dict(use_mask=True, gamma=0.9)),
        ("remax", dict(baseline=True)),
    ]):
        for dtype in (torch.float64, torch.float32):
            rewards, ids, mask, lengths = _reward_batch(20 + k, N)
            rewards = rewards.to(dtype)
            kw = dict(spec)
            use_mask = kw.pop("use_mask", False)
            baseline = torch.linspace(-1, 1, N, dtype=dtype) if kw.pop("baseline", False) else None
            full = fusedrl.group_advantages(rewards, ids, estimator=est, mask=mask if use_mask else None,
                                            baseline=baseline, **kw)
            mine = fd.group_advantages(rewards[lo:hi], ids[lo:hi], estimator=est,
                                       mask=_local_tokens(mask, lengths, lo, hi) if use_mask else None,
                                       baseline=None if baseline is None else baseline[lo:hi], **kw)
            expected = full[lo:hi] if not use_mask else _local_tokens(full, lengths, lo, hi)
            _close(mine, expected, dtype, f"group_advantages {est} {kw} mask={use_mask} {dtype}")


@case
def group_advantages_group_size_layout_and_objectives(rank, world):
    N = 4 * world + 4  # contiguous groups of 4, rank boundaries anywhere
    lo, hi = _row_split(N, world, 12)[rank]
    rewards, _, mask, lengths = _reward_batch(30, N, K=3)
    for combine, kw in (("sum_then_normalize", dict(weights=[1.0, 0.5, 2.0])), ("normalize_then_sum", {}),
                        ("chebyshev", dict(ideal=[1.0, 1.0, 1.0])), ("min", {}), ("mean_minus_var", {})):
        full = fusedrl.group_advantages(rewards, group_size=4, combine=combine, **kw)
        mine = fd.group_advantages(rewards[lo:hi], group_size=4, combine=combine, **kw)
        _close(mine, full[lo:hi], what=f"group_size combine={combine}")
    full = fusedrl.group_advantages(rewards[:, 0], group_size=4, estimator="grpo_passk")
    _close(fd.group_advantages(rewards[lo:hi, 0], group_size=4, estimator="grpo_passk"), full[lo:hi], what="passk")
    full = fusedrl.group_advantages(rewards, group_size=4, combine="normalize_then_sum", mask=mask)
    mine = fd.group_advantages(rewards[lo:hi], group_size=4, combine="normalize_then_sum",
                               mask=_local_tokens(mask, lengths, lo, hi))
    _close(mine, _local_tokens(full, lengths, lo, hi), what="gdpo over tokens")


@case
def phase_segment_advantages_and_gae_whiten(rank, world):
    N, T, P, S = 5 * world, 6, 3, 4
    lo, hi = _row_split(N, world, 13)[rank]
    g = _gen(40)
    rewards, ids, mask, lengths = _reward_batch(41, N, T=T)
    phase_rewards = torch.randn(N, P, generator=g, dtype=torch.float64)
    phase_ids = torch.randint(0, P, (N, T), generator=g)
    full = fusedrl.phase_advantages(phase_rewards, phase_ids, ids, mask=mask)
    mine = fd.phase_advantages(phase_rewards[lo:hi], _local_tokens(phase_ids, lengths, lo, hi), ids[lo:hi],
                               mask=_local_tokens(mask, lengths, lo, hi))
    _close(mine, _local_tokens(full, lengths, lo, hi), what="phase_advantages")
    seg_rewards = torch.randn(N, S, generator=g, dtype=torch.float64)
    seg_ids = torch.randint(-1, S, (N, T), generator=g)
    S_r = max(1, int(seg_ids[lo:hi].max()) + 1)  # ranks may hold fewer segment columns
    full = fusedrl.segment_advantages(rewards, seg_rewards, seg_ids, ids, mask=mask, lam=0.5)
    mine = fd.segment_advantages(rewards[lo:hi], seg_rewards[lo:hi, :S_r], _local_tokens(seg_ids, lengths, lo, hi),
                                 ids[lo:hi], mask=_local_tokens(mask, lengths, lo, hi), lam=0.5)
    _close(mine, _local_tokens(full, lengths, lo, hi), what="segment_advantages")
    tok_rewards = torch.randn(N, T, generator=g, dtype=torch.float64)
    values = torch.randn(N, T, generator=g, dtype=torch.float64)
    for backend in ("cpu", "torch"):
        adv, ret = fusedrl.gae(tok_rewards, values, mask, gamma=0.9, lam=0.8, whiten=True, backend=backend)
        adv_r, ret_r = fd.gae(*(_local_tokens(t, lengths, lo, hi) for t in (tok_rewards, values, mask)), gamma=0.9,
                              lam=0.8, whiten=True, backend=backend)
        _close(adv_r, _local_tokens(adv, lengths, lo, hi), what=f"gae whiten {backend}")
        _close(ret_r, _local_tokens(ret, lengths, lo, hi), what=f"gae returns {backend}")


# ---------------------------------------------------------------------------------------------
# vocabulary parallel


def _shards(V, world, seed):
    """Uneven shard widths (each >= 1) summing to V: the contiguous ranges of a random split."""
    return [hi - lo for lo, hi in _row_split(V, world, seed)]


def _vocab_case(seed, N, V, dtype):
    g = _gen(seed)
    logits = (3 * torch.randn(N, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = -100
    logits[2, : V // 2] = float("-inf")  # masked vocabulary entries (a whole shard on some ranks)
    logits[3] = 40.0  # a uniform row
    logits[4, labels[4]] = 60.0  # a peaked row: entropy ~ 0, p_label ~ 1
    return logits, labels, torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)


LOGPROB_TOL = {torch.float64: dict(rtol=1e-6, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5),
               torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _check_vocab(rank, world, V, dtype, backend, seed, given_range, temperature=0.7):
    N = 9
    logits, labels, g_lp, g_h = _vocab_case(seed, N, V, dtype)
    widths = _shards(V, world, seed)
    start = sum(widths[:rank])
    full_z = logits.clone().requires_grad_(True)
    lp, h = fusedrl.token_logprobs(full_z, labels, temperature=temperature, return_entropy=True, backend=backend)
    ((lp * g_lp.to(lp.dtype)).sum() + (h * g_h.to(h.dtype)).sum()).backward()
    shard = logits[:, start: start + widths[rank]].clone().requires_grad_(True)
    rng = dict(vocab_start=start, vocab_size=V) if given_range else {}
    lp_r, h_r = fd.token_logprobs(shard, labels, temperature=temperature, return_entropy=True, backend=backend, **rng)
    ((lp_r * g_lp.to(lp.dtype)).sum() + (h_r * g_h.to(h.dtype)).sum()).backward()
    tol = LOGPROB_TOL[dtype]
    what = f"V={V} widths={widths} {dtype} {backend}"
    torch.testing.assert_close(lp_r, lp.detach(), **tol, msg=lambda m: f"logp {what}: {m}")
    torch.testing.assert_close(h_r, h.detach(), **tol, msg=lambda m: f"entropy {what}: {m}")
    torch.testing.assert_close(shard.grad, full_z.grad[:, start: start + widths[rank]], **tol,
                               msg=lambda m: f"d logits {what}: {m}")
    # log-probs only (no entropy): the other backward path
    shard.grad = None
    full_z.grad = None
    fusedrl.token_logprobs(full_z, labels, backend=backend).mul(g_lp.to(lp.dtype)).sum().backward()
    fd.token_logprobs(shard, labels, backend=backend, **rng).mul(g_lp.to(lp.dtype)).sum().backward()
    torch.testing.assert_close(shard.grad, full_z.grad[:, start: start + widths[rank]], **tol,
                               msg=lambda m: f"d logits (logp only) {what}: {m}")


@case
def vocab_parallel_token_logprobs(rank, world):
    for V in (2 * world + 3, 29):  # not a multiple of the world size
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for backend in ("cpu", "torch"):
                _check_vocab(rank, world, V, dtype, backend, seed=V, given_range=(dtype == torch.float32))


@case
def vocab_parallel_ignore_index_inside_the_shard(rank, world):
    """ignore_index = 0, a valid local column of every shard: the shard's labels are remapped."""
    V, N = 3 * world + 1, 6
    logits, labels, g_lp, _ = _vocab_case(50, N, V, torch.float64)
    labels[1] = 0
    widths = _shards(V, world, 50)
    start = sum(widths[:rank])
    lp = fusedrl.token_logprobs(logits, labels, ignore_index=0)
    lp_r = fd.token_logprobs(logits[:, start: start + widths[rank]].contiguous(), labels, ignore_index=0)
    _close(lp_r, lp, what="ignore_index=0")
    assert bool((lp_r[labels == 0] == 0).all())


@case
def vocab_parallel_linear_logprobs(rank, world):
    N, H = 11, 5
    for V in (2 * world + 1, 17):
        for dtype in (torch.float64, torch.float32):
            for backend, with_bias, chunk in (("cpu", True, 3), ("cpu", False, None), ("torch", True, 4)):
                g = _gen(60 + V)
                hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
                weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
                bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
                labels = torch.randint(0, V, (N,), generator=g)
                labels[0] = -100
                g_lp = torch.randn(N, generator=g, dtype=torch.float64)
                g_h = torch.randn(N, generator=g, dtype=torch.float64)
                widths = _shards(V, world, V + 1)
                lo, hi = sum(widths[:rank]), sum(widths[: rank + 1])
                leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
                if with_bias:
                    leaves.append(bias.clone().requires_grad_(True))
                lp, h = fusedrl.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if with_bias else None,
                                                temperature=0.8, return_entropy=True, chunk_size=chunk)
                ((lp * g_lp.to(lp.dtype)).sum() + (h * g_h.to(h.dtype)).sum()).backward()
                for reduce in (True, False):
                    mine = [hidden.clone().requires_grad_(True), weight[lo:hi].clone().requires_grad_(True)]
                    if with_bias:
                        mine.append(bias[lo:hi].clone().requires_grad_(True))
                    lp_r, h_r = fd.linear_logprobs(mine[0], mine[1], labels, bias=mine[2] if with_bias else None,
                                                   temperature=0.8, return_entropy=True, chunk_size=chunk,
                                                   reduce_hidden_grad=reduce, backend=backend)
                    ((lp_r * g_lp.to(lp.dtype)).sum() + (h_r * g_h.to(h.dtype)).sum()).backward()
                    what = f"linear V={V} {dtype} {backend} bias={with_bias} chunk={chunk} reduce={reduce}"
                    tol = LOGPROB_TOL[dtype]
                    torch.testing.assert_close(lp_r, lp.detach(), **tol, msg=lambda m: f"logp {what}: {m}")
                    torch.testing.assert_close(h_r, h.detach(), **tol, msg=lambda m: f"entropy {what}: {m}")
                    d_hidden = mine[0].grad if reduce else _sum(mine[0].grad)
                    torch.testing.assert_close(d_hidden, leaves[0].grad, **tol, msg=lambda m: f"d hidden {what}: {m}")
                    torch.testing.assert_close(mine[1].grad, leaves[1].grad[lo:hi], **tol,
                                               msg=lambda m: f"d weight {what}: {m}")
                    if with_bias:
                        torch.testing.assert_close(mine[2].grad, leaves[2].grad[lo:hi], **tol,
                                                   msg=lambda m: f"d bias {what}: {m}")


@case
def vocab_range_derived(rank, world):
    start, total = fd.vocab_range(rank + 1)
    assert start == sum(r + 1 for r in range(rank)) and total == sum(r + 1 for r in range(world))
    with pytest.raises(ValueError, match="labels must be in"):
        fd.token_logprobs(torch.zeros(2, rank + 1), torch.tensor([0, total]))


# ---------------------------------------------------------------------------------------------
# the harness


def _worker(rank, world, init, out):
    torch.set_num_threads(1)
    os.environ["FUSEDRL_TEST_OUT"] = out
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results = {}
    path = Path(out) / f"rank{rank}.json"
    try:
        for name, fn in CASES.items():
            try:
                fn(rank, world)
                results[name] = "ok"
            except BaseException:  # noqa: BLE001  (recorded for the parent, then this rank stops)
                results[name] = traceback.format_exc()
                break
            finally:
                path.write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world size: [per-rank results]}: one spawn of every world size, all cases inside."""
    out = {}
    for world in WORLD_SIZES:
        folder = tmp_path_factory.mktemp(f"world{world}")
        error = None
        try:
            mp.spawn(_worker, args=(world, f"file://{folder}/init", str(folder)), nprocs=world, join=True)
        except Exception as exc:  # noqa: BLE001  (the per-case results say which case failed)
            error = exc
        ranks = []
        for r in range(world):
            p = folder / f"rank{r}.json"
            ranks.append(json.loads(p.read_text()) if p.exists() else {})
        out[world] = dict(ranks=ranks, error=error, folder=folder)
    return out


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_case(runs, world, name):
    run = runs[world]
    for rank, results in enumerate(run["ranks"]):
        outcome = results.get(name)
        assert outcome is not None, f"rank {rank} of {world} did not run {name} (an earlier case failed): {run['error']}"
        assert outcome == "ok", f"rank {rank} of {world}, case {name}:\n{outcome}"


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_verl_agg_loss_on_each_rank(runs, world):
    """verl's ``agg_loss(dp_size=D, batch_num_tokens, global_batch_size, loss_scale_factor)`` on a
    rank's rows = ``aggregate(..., **norms) * norms.scale`` with ``exclude_empty_rows=True``."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    for rank in range(world):
        path = runs[world]["folder"] / f"verl{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no verl inputs: {runs[world]['error']}"
        saved = torch.load(path)
        for mode, ours in saved["out"].items():
            verl = core_algos.agg_loss(saved["values"], saved["mask"].to(torch.float64), mode, dp_size=world,
                                       batch_num_tokens=ours["tokens"], global_batch_size=ours["seqs"],
                                       loss_scale_factor=9)
            # (verl divides a row's sum by its count + 1e-8: a relative 1e-8 / count)
            assert abs(float(verl) - ours["loss"]) <= 1e-7 * max(1.0, abs(ours["loss"])), (mode, float(verl), ours)


# ---------------------------------------------------------------------------------------------
# one process: no process group, and argument checks


def test_import_fusedrl_loads_no_distributed_module():
    code = ("import sys, torch\n"
            "before = {m for m in sys.modules if m.startswith('torch.distributed')}\n"
            "import fusedrl\n"
            "extra = {m for m in sys.modules if m.startswith('torch.distributed')} - before\n"
            "assert 'fusedrl.distributed' not in sys.modules and not extra, extra\n"
            "assert fusedrl.distributed.global_normalizers is not None\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_without_a_process_group_everything_is_the_one_process_computation():
    assert not dist.is_initialized()
    batch = _policy_batch(9, torch.float64, 3)
    norms = fd.global_normalizers(batch["mask"], advantages=batch["adv"], group_ids=batch["group_ids"])
    assert norms.scale == 1.0 and fd.dp_scale() == 1.0
    for mode in AGGREGATIONS:
        local = fusedrl.aggregate(batch["base"], batch["mask"], mode, advantages=batch["adv"], group_ids=batch["group_ids"])
        ours = fusedrl.aggregate(batch["base"], batch["mask"], mode, advantages=batch["adv"], group_ids=batch["group_ids"],
                                 **norms)
        torch.testing.assert_close(ours, local, rtol=1e-12, atol=0)
    rewards, ids, mask, _ = _reward_batch(3, 9)
    torch.testing.assert_close(fd.group_advantages(rewards, ids), fusedrl.group_advantages(rewards, ids))
    logits, labels, _, _ = _vocab_case(4, 6, 7, torch.float32)
    torch.testing.assert_close(fd.token_logprobs(logits, labels), fusedrl.token_logprobs(logits, labels))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: fd.global_normalizers("mask"), TypeError, "mask must be a tensor or a list"),
    (lambda: fd.global_normalizers(torch.ones(3)), ValueError, r"mask must have shape \[B, T\]"),
    (lambda: fd.global_normalizers([]), ValueError, "mask must hold at least one"),
    (lambda: fd.global_normalizers(torch.ones(2, 3), advantages=torch.ones(3)), ValueError, "advantages must have shape"),
    (lambda: fd.global_normalizers([torch.ones(2, 3)] * 2, advantages=[torch.ones(2)]), ValueError,
     "advantages must have one entry per micro-batch"),
    (lambda: fd.global_normalizers(torch.ones(2, 3), max_length=0), ValueError, "max_length must be >= 1"),
    (lambda: fd.global_normalizers(torch.ones(2, 3), dp_average=1), TypeError, "dp_average must be a bool"),
    (lambda: fd.token_logprobs(torch.ones(2, 3), torch.tensor([0, 3])), ValueError, r"labels must be in \[0, 3\)"),
    (lambda: fd.token_logprobs(torch.ones(2, 3), torch.tensor([0, 1]), vocab_start=2, vocab_size=4), ValueError,
     "vocab_start must be in"),
    (lambda: fd.token_logprobs(torch.ones(2, 3), torch.tensor([0, 1]), vocab_start=0), ValueError,
     "pass both vocab_start and vocab_size"),
    (lambda: fd.token_logprobs(torch.ones(2, 0), torch.tensor([0, 1])), ValueError, "V_r >= 1"),
    (lambda: fd.linear_logprobs(torch.ones(2, 3), torch.ones(4, 2), torch.tensor([0, 1])), ValueError,
     "weight must have shape"),
    (lambda: fd.linear_logprobs(torch.ones(2, 3), torch.ones(4, 3), torch.tensor([0, 1]), reduce_hidden_grad=None),
     TypeError, "reduce_hidden_grad must be a bool"),
    (lambda: fd.gae(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), whiten=1), TypeError, "whiten must be a bool"),
])
def test_bad_arguments_are_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
