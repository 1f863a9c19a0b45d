"""Fuzz campaign over fusedrl's public functions and backends (a script, not part of CI).

    .venv/bin/python scripts/fuzz.py                          # every target, 10,000 examples each
    .venv/bin/python scripts/fuzz.py --examples 500 --only token_logprobs
    .venv/bin/python scripts/fuzz.py --triton                 # also the Triton kernels (interpreter)

Every target (a public function on one backend) runs in its own subprocess, so a segfault kills
only that target and is reported with the example that was running (each child writes the
example it is about to run to a file first). In a target, hypothesis draws tiny shapes and the
values come from a torch.Generator seeded by a drawn seed; each example is

- valid (half of them): the call must not raise, every output must be finite where the inputs are
  finite and the docs promise finite values, and a kernel backend must equal the ``torch``
  reference computed in float64 (values and gradients; float32 within 1e-5 of max(|gold|, 1),
  float64 1e-10, bfloat16 2e-2), including non-contiguous inputs (a stride-2 copy of one tensor)
  and NaN injected into one element (the kernel's NaN pattern must equal the reference's);
- invalid (the other half): one argument broken (a float tensor as int32 / an index tensor as
  float, an extra dimension, on the meta device, a label or id out of its range): the call must
  raise TypeError or ValueError whose message names an argument. Everything on meta must either
  work (shapes only) or raise TypeError / ValueError / NotImplementedError.

Failures are not raised inside the run (hypothesis would stop at the first): each is recorded by
its signature (check, exception type and message with numbers masked) with a count and the first
example. ``--big`` also probes N >= 2^31 rows faked with stride-0 expanded tensors, one subprocess
per function with a 4 GiB address-space limit and a time limit. Writes a JSON report
(``--report``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# targets: each builds valid keyword arguments from (draw, generator) and calls the function


def _targets():
    import torch

    import fusedrl
    import fusedrl.distributed as fd

    F = (torch.float32, torch.float64, torch.bfloat16)

    def randn(g, *shape, dtype=torch.float64, scale=1.0):
        return (scale * torch.randn(tuple(shape), generator=g, dtype=torch.float64)).to(dtype)

    def mask_of(g, d, B, T):
        kind = d["mask_kind"]
        m = torch.rand(B, T, generator=g) < 0.7
        if B:
            m[0] = False if d["empty_row"] else m[0]
        if kind == "bool":
            return m
        if kind == "int":
            return m.to(torch.int64)
        return m * (0.25 + torch.rand(B, T, generator=g, dtype=torch.float64))

    # (name, backends, builder(draw, g) -> (kwargs, meta), call(kwargs, backend) -> outputs, facts)
    # facts: float args (with gradient?), index args (with their valid range), options
    targets = {}

    def target(name, backends, facts):
        def wrap(build):
            targets[name] = dict(build=build, backends=backends, **facts)
            return build
        return wrap

    # --- token log-probs -------------------------------------------------------------------
    def call_token(kw, backend):
        out = fusedrl.token_logprobs(kw["logits"], kw["labels"], temperature=kw["temperature"],
                                     ignore_index=kw["ignore_index"], return_entropy=True, backend=backend)
        return out, ("logits",)

    @target("token_logprobs", ("cpu", "triton", "torch"),
            dict(call=call_token, floats=("logits",), grads=("logits",), index={"labels": "V"}))
    def build_token(draw, st, g):
        N, V = draw(st.integers(0, 6)), draw(st.integers(1, 9))
        dtype = draw(st.sampled_from(F))
        logits = randn(g, N, V, dtype=dtype, scale=draw(st.sampled_from([1.0, 5.0, 100.0])))
        if N and V > 1 and draw(st.booleans()):
            logits[0, : V // 2] = float("-inf")
        labels = torch.randint(0, V, (N,), generator=g)
        if N and V > 1:
            labels[0] = V - 1  # not a masked (-inf) entry: a finite log-prob
        if N and draw(st.booleans()):
            labels[-1] = -100
        return dict(logits=logits, labels=labels, temperature=draw(st.sampled_from([1.0, 0.7, 2.5])),
                    ignore_index=-100), dict(V=V, finite=True)

    def call_linear(kw, backend):
        out = fusedrl.linear_logprobs(kw["hidden"], kw["weight"], kw["labels"], bias=kw["bias"],
                                      temperature=kw["temperature"], return_entropy=True, chunk_size=kw["chunk_size"],
                                      backend=backend)
        return out, ("hidden", "weight", "bias")

    @target("linear_logprobs", ("cpu", "triton", "torch"),
            dict(call=call_linear, floats=("hidden", "weight", "bias"), grads=("hidden", "weight", "bias"),
                 index={"labels": "V"}))
    def build_linear(draw, st, g):
        N, H, V = draw(st.integers(0, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 9))
        dtype = draw(st.sampled_from(F))
        labels = torch.randint(0, V, (N,), generator=g)
        if N and draw(st.booleans()):
            labels[0] = -100
        bias = randn(g, V, dtype=dtype) if draw(st.booleans()) else None
        return dict(hidden=randn(g, N, H, dtype=dtype), weight=randn(g, V, H, dtype=dtype), bias=bias, labels=labels,
                    temperature=draw(st.sampled_from([1.0, 0.6])),
                    chunk_size=draw(st.sampled_from([None, 1, 2, 4]))), dict(V=V, finite=True)

    # --- vocabulary-parallel log-probs, one process (the whole vocabulary on this rank) -------
    def call_vp_token(kw, backend):
        out = fd.token_logprobs(kw["logits"], kw["labels"], temperature=kw["temperature"], return_entropy=True,
                                vocab_start=0, vocab_size=kw["logits"].shape[-1], backend=backend)
        return out, ("logits",)

    def call_vp_token_ref(kw, backend):
        return call_token(dict(kw, ignore_index=-100), backend)

    targets["distributed.token_logprobs"] = dict(
        build=build_token, backends=("cpu", "torch"), call=call_vp_token, reference=call_vp_token_ref,
        floats=("logits",), grads=("logits",), index={"labels": "V"})

    def call_vp_linear(kw, backend):
        out = fd.linear_logprobs(kw["hidden"], kw["weight"], kw["labels"], bias=kw["bias"],
                                 temperature=kw["temperature"], return_entropy=True, chunk_size=kw["chunk_size"],
                                 backend=backend)
        return out, ("hidden", "weight", "bias")

    targets["distributed.linear_logprobs"] = dict(
        build=build_linear, backends=("cpu", "torch"), call=call_vp_linear, reference=call_linear,
        floats=("hidden", "weight", "bias"), grads=("hidden", "weight", "bias"), index={"labels": "V"})

    # --- policy loss ---------------------------------------------------------------------------
    def call_policy(kw, backend):
        opts = dict(kw["options"])
        loss, metrics = fusedrl.policy_loss(
            kw["logp"], kw["old_logp"], kw["advantages"], kw["mask"], ref_logp=kw["ref_logp"],
            rollout_logp=kw["rollout_logp"], entropy=kw["entropy"], group_ids=kw["group_ids"], backend=backend, **opts)
        return (loss, *[metrics[k] for k in sorted(metrics)]), ("logp", "entropy")

    @target("policy_loss", ("cpu", "triton", "torch"),
            dict(call=call_policy, floats=("logp", "old_logp", "advantages", "ref_logp", "rollout_logp", "entropy"),
                 grads=("logp", "entropy"), masks=("mask",)))
    def build_policy(draw, st, g):
        B, T = draw(st.integers(0, 4)), draw(st.integers(1, 6))
        dtype = draw(st.sampled_from(F))
        surrogate = draw(st.sampled_from(fusedrl.policy.SURROGATES))
        # geo_mean and vespo define their own sequence weight: token ratio only (else a ValueError)
        ratio = "token" if surrogate in ("geo_mean", "vespo") else draw(st.sampled_from(fusedrl.policy.RATIOS))
        aggregation = draw(st.sampled_from(fusedrl.policy.AGGREGATIONS))
        opts = dict(surrogate=surrogate, ratio=ratio, aggregation=aggregation,
                    clip_low=draw(st.sampled_from([0.2, 0.0, 0.5])), clip_high=draw(st.sampled_from([None, 0.28])),
                    exclude_empty_rows=draw(st.booleans()))
        spread = draw(st.sampled_from([0.1, 1.0, 30.0]))
        logp = randn(g, B, T, dtype=dtype) - 1
        old = (logp.double() + randn(g, B, T, scale=spread)).to(dtype)
        per_token = draw(st.booleans())
        adv = randn(g, B, T, dtype=dtype) if per_token else randn(g, B, dtype=dtype)
        d = dict(mask_kind=draw(st.sampled_from(["bool", "int", "float"])), empty_row=draw(st.booleans()))
        kw = dict(logp=logp, old_logp=old if draw(st.booleans()) else None, advantages=adv, mask=mask_of(g, d, B, T),
                  ref_logp=None, rollout_logp=None, entropy=None, group_ids=None)
        if surrogate == "clip" and draw(st.booleans()):
            opts["clip_ratio_c"] = 3.0
        if draw(st.booleans()):
            kw["ref_logp"] = (logp.double() + randn(g, B, T)).to(dtype)
            opts.update(beta=0.04, kl=draw(st.sampled_from(fusedrl.policy.KL_KINDS)),
                        use_bias_correction_kl=draw(st.booleans()),
                        kl_aggregation=draw(st.sampled_from((None,) + fusedrl.policy.AGGREGATIONS)))
        if draw(st.booleans()) or (ratio == "hybrid" and draw(st.booleans())):
            kw["entropy"] = torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype)
            opts.update(entropy_coef=0.01, entropy_aggregation=draw(st.sampled_from((None, "token-mean"))))
            if ratio == "hybrid":
                opts["hybrid_mixing"] = draw(st.sampled_from(["average", "entropy"]))
        if surrogate != "vespo" and draw(st.booleans()):  # vespo takes no rollout correction (ValueError)
            corr = draw(st.sampled_from(fusedrl.policy.ROLLOUT_CORRECTIONS))
            kw["rollout_logp"] = (logp.double() + randn(g, B, T, scale=0.3)).to(dtype)
            opts.update(rollout_correction=corr, rollout_cap=2.0, rollout_cap_low=0.5 if corr == "icepop" else None)
        if aggregation == "balanced" or draw(st.booleans()):
            kw["group_ids"] = torch.randint(0, 3, (B,), generator=g)
        for count in ("num_tokens", "num_sequences", "max_length"):
            if draw(st.booleans()):
                opts[count] = float(draw(st.integers(1, 40)))
        kw["options"] = opts
        return kw, dict(finite=True)  # documented: finite for log-ratios up to 1e4

    def call_aggregate(kw, backend):
        out = fusedrl.aggregate(kw["values"], kw["mask"], kw["mode"], advantages=kw["advantages"],
                                group_ids=kw["group_ids"], exclude_empty_rows=kw["exclude"], backend=backend)
        return (out,), ("values",)

    @target("aggregate", ("torch",), dict(call=call_aggregate, floats=("values", "advantages"), grads=("values",),
                                          masks=("mask",)))
    def build_aggregate(draw, st, g):
        B, T = draw(st.integers(0, 4)), draw(st.integers(1, 6))
        dtype = draw(st.sampled_from(F))
        d = dict(mask_kind=draw(st.sampled_from(["bool", "int", "float"])), empty_row=draw(st.booleans()))
        return dict(values=randn(g, B, T, dtype=dtype), mask=mask_of(g, d, B, T),
                    mode=draw(st.sampled_from(fusedrl.policy.AGGREGATIONS)), advantages=randn(g, B, dtype=dtype),
                    group_ids=torch.randint(-2, 2, (B,), generator=g), exclude=draw(st.booleans())), dict(finite=True)

    def call_kl(kw, backend):
        return (fusedrl.kl_penalty(kw["logp"], kw["ref_logp"], kw["kind"], backend=backend),), ("logp", "ref_logp")

    @target("kl_penalty", ("torch",), dict(call=call_kl, floats=("logp", "ref_logp"), grads=("logp", "ref_logp")))
    def build_kl(draw, st, g):
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(F))
        kind = draw(st.sampled_from(fusedrl.policy.KL_KINDS))
        return dict(logp=randn(g, *shape, dtype=dtype), ref_logp=randn(g, *shape, dtype=dtype), kind=kind), dict(
            finite=not kind.startswith("k3"))  # TRL's unclamped k3 may overflow by design

    # --- advantages --------------------------------------------------------------------------
    def call_group(kw, backend):
        out = fusedrl.group_advantages(kw["rewards"], kw["group_ids"], group_size=kw["group_size"], mask=kw["mask"],
                                       baseline=kw["baseline"], backend=backend, **kw["options"])
        return (out,), ()

    @target("group_advantages", ("cpu", "triton", "torch"),
            dict(call=call_group, floats=("rewards", "baseline"), grads=(), masks=("mask",), index={"group_ids": None}))
    def build_group(draw, st, g):
        est = draw(st.sampled_from(fusedrl.advantages.ESTIMATORS))
        size = draw(st.integers(1, 3)) if est != "grpo_passk" else draw(st.integers(2, 3))
        groups = draw(st.integers(0 if est not in ("remax", "reinforce++") else 0, 3))
        N = size * groups
        dtype = draw(st.sampled_from(F))
        K = draw(st.sampled_from([None, None, 2])) if est in ("grpo", "rloo", "gpg") else None
        rewards = randn(g, N, dtype=dtype) if K is None else randn(g, N, K, dtype=dtype)
        if N > 1 and draw(st.booleans()):
            rewards[1] = rewards[0]
        opts = dict(estimator=est, singleton=draw(st.sampled_from(fusedrl.advantages.SINGLETONS)))
        if est in ("grpo", "grpo_passk"):
            opts["scale"] = draw(st.sampled_from(fusedrl.advantages.SCALES))
        if K is not None:
            combine = draw(st.sampled_from(fusedrl.advantages.COMBINES if est == "grpo" else
                                           [c for c in fusedrl.advantages.COMBINES if c != "normalize_then_sum"]))
            opts["combine"] = combine
            if combine == "chebyshev":
                opts["ideal"] = [1.0, 1.0]
        if est == "reinforce++":
            opts["gamma"] = draw(st.sampled_from([1.0, 0.9]))
        use_ids = draw(st.booleans())
        ids = None
        if use_ids:
            ids = (torch.arange(N) // size) * 5 - 3
            ids = ids[torch.randperm(N, generator=g)]
        T = draw(st.integers(1, 5))
        mask = None
        if est == "opo" or draw(st.booleans()):
            mask = torch.rand(N, T, generator=g) < 0.8
        return dict(rewards=rewards, group_ids=ids, group_size=None if use_ids else size, mask=mask,
                    baseline=randn(g, N, dtype=dtype) if est == "remax" else None, options=opts), dict(finite=True)

    def call_phase(kw, backend):
        return (fusedrl.phase_advantages(kw["rewards"], kw["phase_ids"], kw["group_ids"], group_size=kw["group_size"],
                                         mask=kw["mask"], backend=backend, **kw["options"]),), ()

    @target("phase_advantages", ("cpu", "triton", "torch"),
            dict(call=call_phase, floats=("rewards",), grads=(), masks=("mask",), index={"phase_ids": "P"}))
    def build_phase(draw, st, g):
        size, groups, P, T = draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
        N = size * groups
        dtype = draw(st.sampled_from(F[:2]))
        est = draw(st.sampled_from(fusedrl.advantages.SEQUENCE_ESTIMATORS))
        opts = dict(estimator=est, scale=draw(st.sampled_from(["group", "none"] + (["batch"] if est == "grpo" else []))),
                    singleton=draw(st.sampled_from(fusedrl.advantages.SINGLETONS)))
        return dict(rewards=randn(g, N, P, dtype=dtype), phase_ids=torch.randint(0, P, (N, T), generator=g), group_ids=None,
                    group_size=size, mask=(torch.rand(N, T, generator=g) < 0.8) if draw(st.booleans()) else None,
                    options=opts), dict(P=P, finite=True)

    def call_segment(kw, backend):
        return (fusedrl.segment_advantages(kw["trajectory_rewards"], kw["segment_rewards"], kw["segment_ids"],
                                           kw["group_ids"], group_size=kw["group_size"], mask=kw["mask"],
                                           backend=backend, **kw["options"]),), ()

    @target("segment_advantages", ("cpu", "triton", "torch"),
            dict(call=call_segment, floats=("trajectory_rewards", "segment_rewards"), grads=(), masks=("mask",),
                 index={"segment_ids": "S"}))
    def build_segment(draw, st, g):
        size, groups, S, T = draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
        N = size * groups
        dtype = draw(st.sampled_from(F[:2]))
        est = draw(st.sampled_from(fusedrl.advantages.SEQUENCE_ESTIMATORS))
        ids = torch.arange(N) // size
        return dict(trajectory_rewards=randn(g, N, dtype=dtype), segment_rewards=randn(g, N, S, dtype=dtype),
                    segment_ids=torch.randint(-1, S, (N, T), generator=g), group_ids=ids, group_size=None,
                    mask=(torch.rand(N, T, generator=g) < 0.8) if draw(st.booleans()) else None,
                    options=dict(estimator=est, lam=draw(st.sampled_from([1.0, 0.5])))), dict(S=S, finite=True)

    def call_gae(kw, backend):
        return fusedrl.gae(kw["rewards"], kw["values"], kw["mask"], bootstrap=kw["bootstrap"], backend=backend,
                           **kw["options"]), ()

    @target("gae", ("cpu", "triton", "torch"),
            dict(call=call_gae, floats=("rewards", "values", "bootstrap"), grads=(), masks=("mask",)))
    def build_gae(draw, st, g):
        B, T = draw(st.integers(0, 4)), draw(st.integers(1, 7))
        dtype = draw(st.sampled_from(F))
        return dict(rewards=randn(g, B, T, dtype=dtype), values=randn(g, B, T, dtype=dtype),
                    mask=torch.rand(B, T, generator=g) < 0.7,
                    bootstrap=randn(g, B, dtype=dtype) if draw(st.booleans()) else None,
                    options=dict(gamma=draw(st.sampled_from([1.0, 0.9, 0.0])), lam=draw(st.sampled_from([1.0, 0.95])),
                                 whiten=draw(st.booleans()))), dict(finite=True)

    def call_disc(kw, backend):
        return (fusedrl.discounted_returns(kw["rewards"], kw["mask"], gamma=kw["gamma"], backend=backend),), ()

    @target("discounted_returns", ("cpu", "triton", "torch"),
            dict(call=call_disc, floats=("rewards",), grads=(), masks=("mask",)))
    def build_disc(draw, st, g):
        B, T = draw(st.integers(0, 4)), draw(st.integers(1, 7))
        return dict(rewards=randn(g, B, T, dtype=draw(st.sampled_from(F))), mask=torch.rand(B, T, generator=g) < 0.7,
                    gamma=draw(st.sampled_from([1.0, 0.9]))), dict(finite=True)

    # --- preference losses (reference backend only) -------------------------------------------
    def call_pref(kw, backend):
        loss, metrics = fusedrl.preference_loss(kw["policy_chosen_logps"], kw["policy_rejected_logps"],
                                                kw["ref_chosen_logps"], kw["ref_rejected_logps"],
                                                chosen_lengths=kw["chosen_lengths"], rejected_lengths=kw["rejected_lengths"],
                                                backend=backend, **kw["options"])
        return (loss,), ("policy_chosen_logps", "policy_rejected_logps")

    @target("preference_loss", ("torch",),
            dict(call=call_pref, floats=("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                         "ref_rejected_logps"), grads=("policy_chosen_logps", "policy_rejected_logps")))
    def build_pref(draw, st, g):
        B = draw(st.integers(1, 5))
        dtype = draw(st.sampled_from(F))
        lt = draw(st.sampled_from(["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "aot",
                                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo",
                                   "exo_pair"]))
        opts = dict(loss_type=lt, beta=draw(st.sampled_from([0.1, 1.0])))
        if lt == "exo_pair":
            opts["label_smoothing"] = 0.1
        lengths = torch.randint(1, 20, (B,), generator=g)
        return dict(policy_chosen_logps=randn(g, B, dtype=dtype, scale=5) - 10,
                    policy_rejected_logps=randn(g, B, dtype=dtype, scale=5) - 10,
                    ref_chosen_logps=randn(g, B, dtype=dtype, scale=5) - 10,
                    ref_rejected_logps=randn(g, B, dtype=dtype, scale=5) - 10,
                    chosen_lengths=lengths, rejected_lengths=lengths.flip(0), options=opts), dict(finite=True)

    def call_seq(kw, backend):
        return (fusedrl.sequence_logps(kw["logp"], kw["mask"], weights=kw["weights"], average=kw["average"],
                                       backend=backend),), ("logp",)

    @target("sequence_logps", ("torch",), dict(call=call_seq, floats=("logp", "weights"), grads=("logp",),
                                               masks=("mask",)))
    def build_seq(draw, st, g):
        B, T = draw(st.integers(0, 4)), draw(st.integers(1, 6))
        dtype = draw(st.sampled_from(F))
        return dict(logp=randn(g, B, T, dtype=dtype), mask=torch.rand(B, T, generator=g) < 0.7,
                    weights=torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) if draw(st.booleans()) else None,
                    average=draw(st.booleans())), dict(finite=True)

    def call_kto(kw, backend):
        loss, _ = fusedrl.kto_loss(kw["policy_logps"], kw["labels"], kw["ref_logps"], backend=backend)
        return (loss,), ("policy_logps",)

    @target("kto_loss", ("torch",), dict(call=call_kto, floats=("policy_logps", "ref_logps"), grads=("policy_logps",)))
    def build_kto(draw, st, g):
        B = draw(st.integers(1, 5))
        dtype = draw(st.sampled_from(F))
        return dict(policy_logps=randn(g, B, dtype=dtype) - 5, labels=torch.rand(B, generator=g) < 0.5,
                    ref_logps=randn(g, B, dtype=dtype) - 5), dict(finite=True)

    def call_orpo(kw, backend):
        loss, _ = fusedrl.orpo_loss(kw["policy_chosen_logps"], kw["policy_rejected_logps"],
                                    chosen_lengths=kw["chosen_lengths"], rejected_lengths=kw["rejected_lengths"],
                                    backend=backend)
        return (loss,), ("policy_chosen_logps", "policy_rejected_logps")

    @target("orpo_loss", ("torch",), dict(call=call_orpo, floats=("policy_chosen_logps", "policy_rejected_logps"),
                                          grads=("policy_chosen_logps", "policy_rejected_logps")))
    def build_orpo(draw, st, g):
        B = draw(st.integers(1, 5))
        dtype = draw(st.sampled_from(F))
        lengths = torch.randint(1, 20, (B,), generator=g)
        return dict(policy_chosen_logps=-torch.rand(B, generator=g, dtype=torch.float64).mul(30).add(0.01).to(dtype),
                    policy_rejected_logps=-torch.rand(B, generator=g, dtype=torch.float64).mul(30).add(0.01).to(dtype),
                    chosen_lengths=lengths, rejected_lengths=lengths + 1), dict(finite=True)

    def call_cpl(kw, backend):
        loss, _ = fusedrl.cpl_loss(kw["chosen_logp"], kw["chosen_mask"], kw["rejected_logp"], kw["rejected_mask"],
                                   backend=backend)
        return (loss,), ("chosen_logp", "rejected_logp")

    @target("cpl_loss", ("torch",), dict(call=call_cpl, floats=("chosen_logp", "rejected_logp"),
                                         grads=("chosen_logp", "rejected_logp"), masks=("chosen_mask", "rejected_mask")))
    def build_cpl(draw, st, g):
        B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
        dtype = draw(st.sampled_from(F))
        return dict(chosen_logp=randn(g, B, T, dtype=dtype) - 1, chosen_mask=torch.rand(B, T, generator=g) < 0.7,
                    rejected_logp=randn(g, B, T, dtype=dtype) - 1, rejected_mask=torch.rand(B, T, generator=g) < 0.7), dict(
            finite=True)

    def call_list(kw, backend):
        loss, _ = fusedrl.listwise_preference_loss(kw["policy_logps"], kw["labels"], kw["ref_logps"], backend=backend)
        return (loss,), ("policy_logps",)

    @target("listwise_preference_loss", ("torch",),  # labels: real relevance data, integer or float
            dict(call=call_list, floats=("policy_logps", "ref_logps"), grads=("policy_logps",)))
    def build_list(draw, st, g):
        P, K = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        dtype = draw(st.sampled_from(F))
        return dict(policy_logps=randn(g, P, K, dtype=dtype) - 3,
                    labels=torch.randint(0, 3, (P, K), generator=g).to(dtype),
                    ref_logps=randn(g, P, K, dtype=dtype) - 3), dict(finite=True)

    return targets


# ---------------------------------------------------------------------------------------------
# the checks


TOL = {"torch.float32": 1e-5, "torch.float64": 1e-10, "torch.bfloat16": 2e-2, "torch.float16": 2e-2}
ARG_NAMES = re.compile(r"[A-Za-z_]+")


class Failure(Exception):
    def detail(self):
        if len(self.args) < 3:
            return ""
        a, b = self.args[1], self.args[2]
        return f"\n    got  {a.tolist()}\n    want {b.tolist()}"

    def __str__(self):
        return str(self.args[0])


def _signature(check, exc):
    msg = str(exc).splitlines()[0] if str(exc) else ""
    msg = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", msg)[:160]
    return f"{check}: {type(exc).__name__}: {msg}"


def _tensors(kw):
    import torch

    return {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}


def _with(kw, **changes):
    out = dict(kw)
    out.update(changes)
    return out


def _leafify(kw, grads, dtype=None):
    """A copy of ``kw`` with the gradient arguments as fresh leaves (optionally cast)."""
    import torch

    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().clone()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if k in grads and t.is_floating_point():
                t.requires_grad_(True)
            out[k] = t
        else:
            out[k] = v
    return out


def _run(spec, kw, backend, grads, seed, reference=False):
    """Outputs and gradients (w.r.t. the grads arguments, for a seeded random upstream)."""
    import torch

    call = spec.get("reference", spec["call"]) if reference else spec["call"]
    leaves = _leafify(kw, grads)
    outs, _ = call(leaves, backend)
    outs = [o for o in outs if isinstance(o, torch.Tensor)]
    g = torch.Generator().manual_seed(seed)
    total = None
    for o in outs:
        if o.requires_grad:
            w = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
            term = (o * w).sum()
            total = term if total is None else total + term
    grad_out = []
    wrt = [leaves[k] for k in grads if isinstance(leaves.get(k), torch.Tensor) and leaves[k].requires_grad]
    if total is not None and wrt:
        grad_out = [x if x is not None else torch.zeros_like(w) for x, w in
                    zip(torch.autograd.grad(total, wrt, allow_unused=True), wrt)]
    return [o.detach() for o in outs] + [x.detach() for x in grad_out]


def _max_error(a, b):
    from fusedrl.testing import max_error

    return max_error(a, b)


def _compare(what, got, gold, dtype, finite, same=None):
    """``got`` vs the float64 ``gold``; for bfloat16 / float16 also allowed: twice the error of
    ``same``, the torch reference run in that dtype (the project's rule, python/fusedrl/testing/tolerances.py).

    A NaN loss (output 0, a scalar: NaN injected at a valid token) must be NaN in both; the metrics
    and gradients of such a call are not specified (fusedrl.policy_loss's docstring: a NaN can
    spread through a row's statistics in a kernel and not in torch's backward, or a clip's
    gradient select can take the other branch), so they are not compared."""
    from fusedrl.testing import scale_of
    import torch

    if len(got) != len(gold):
        raise Failure(f"{what}: {len(got)} outputs vs {len(gold)} in the reference")
    nan_loss = bool(gold and gold[0].dim() == 0 and torch.isnan(gold[0].double()))
    if nan_loss:
        if not bool(torch.isnan(got[0].double())):
            raise Failure(f"{what}: the reference loss is NaN, got {float(got[0])}")
        return
    for k, (a, b) in enumerate(zip(got, gold)):
        if a.shape != b.shape:
            raise Failure(f"{what}: output {k} shape {tuple(a.shape)} vs reference {tuple(b.shape)}")
        if finite and a.numel() and not bool(a.double().isfinite().all()) and bool(b.double().isfinite().all()):
            raise Failure(f"{what}: output {k} not finite where the float64 reference is")
        err = _max_error(a, b)
        bound = TOL[str(dtype)] * scale_of(b, 1.0)
        if same is not None and k < len(same) and same[k].shape == b.shape:
            bound = max(bound, 2.0 * _max_error(same[k], b))
        if not err <= bound:
            raise Failure(f"{what}: output {k} max error {err:.3g} > {bound:.3g}", a, b)


def _names_an_argument(exc, names):
    msg = str(exc)
    return any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names)


def _example(spec, draw, st):
    import torch

    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kw, meta = spec["build"](draw, st, g)
    return kw, meta, seed


def _dtype_of(kw, spec):
    import torch

    for k in spec["floats"]:
        v = kw.get(k)
        if isinstance(v, torch.Tensor):
            return v.dtype
    return torch.float64


def _valid(spec, backend, kw, meta, seed, variant, draw, st):
    """One valid call (possibly a non-contiguous or NaN-injected variant) against the reference."""
    import torch

    grads = spec.get("grads", ())
    dtype = _dtype_of(kw, spec)
    finite = meta.get("finite", True)
    floats = [k for k in spec["floats"] if isinstance(kw.get(k), torch.Tensor) and kw[k].numel()]
    if variant == "noncontiguous":
        names = [k for k, v in _tensors(kw).items() if v.numel() > 1]
        if names:
            k = draw(st.sampled_from(names))
            v = kw[k]
            wide = torch.empty(v.shape + (2,), dtype=v.dtype)  # the same values, every stride doubled
            wide[..., 0] = v
            kw = _with(kw, **{k: wide[..., 0]})
    if variant == "nan" and floats:
        k = draw(st.sampled_from(floats))
        v = kw[k].clone()
        v.view(-1)[draw(st.integers(0, v.numel() - 1))] = float("nan")
        kw = _with(kw, **{k: v})
        finite = False
    if variant == "nan":
        try:
            got = _run(spec, kw, backend, grads, seed)
        except ValueError as exc:
            if _names_an_argument(exc, list(kw)):
                return
            raise
    else:
        got = _run(spec, kw, backend, grads, seed)
    gold = _run(spec, _leafify(kw, (), torch.float64), "torch", grads, seed, reference=True)
    if backend == "torch" and dtype == torch.float64 and "reference" not in spec:
        if finite:
            for k, o in enumerate(got):
                if o.numel() and not bool(o.double().isfinite().all()):
                    raise Failure(f"valid {variant}: output {k} not finite")
        return
    same = None
    if dtype in (torch.bfloat16, torch.float16):
        same = _run(spec, kw, "torch", grads, seed, reference=True)
    _compare(f"valid {variant}", got, gold, dtype, finite, same)


def _invalid(spec, backend, kw, meta, draw, st):
    """One broken argument: TypeError / ValueError naming an argument (any one of the call's)."""
    import torch

    tensors = _tensors(kw)
    names = list(kw) + list(kw.get("options", {}) or {}) + ["logits", "labels", "values", "mask", "weight", "hidden",
                                                             "bias", "rewards", "advantages", "logp"]
    choices = ["dtype", "shape", "meta_one", "meta_all"]
    index = {k: r for k, r in (spec.get("index") or {}).items() if isinstance(kw.get(k), torch.Tensor)}
    if any(r is not None and kw[k].numel() for k, r in index.items()):
        choices.append("range")
    how = draw(st.sampled_from(choices))
    if not tensors:
        return "skipped"
    if how == "range":
        k = draw(st.sampled_from([k for k, r in index.items() if r is not None and kw[k].numel()]))
        bound = meta[index[k]]
        v = kw[k].clone()
        v.view(-1)[draw(st.integers(0, v.numel() - 1))] = draw(st.sampled_from([bound, bound + 7, -2, -101]))
        if "mask" in kw and isinstance(kw["mask"], torch.Tensor):
            kw = _with(kw, mask=torch.ones_like(kw["mask"]))  # the broken id must sit on a valid token
        broken = _with(kw, **{k: v})
        expect = (ValueError,)
        how = f"range of {k}"
    elif how == "dtype":
        k = draw(st.sampled_from(sorted(tensors)))
        v = tensors[k]
        if k in spec["floats"]:
            bad = v.to(torch.int32)  # a float tensor as integers
        elif k in (spec.get("index") or {}):
            bad = v.to(torch.float32)  # an index tensor as floats
        else:
            bad = v.to(torch.complex64)  # masks and data (lengths, labels) take bool / int / float
        broken = _with(kw, **{k: bad})
        expect = (TypeError, ValueError)
        how = f"dtype {bad.dtype} of {k}"
    elif how == "shape":
        k = draw(st.sampled_from(sorted(tensors)))
        broken = _with(kw, **{k: tensors[k].unsqueeze(-1).expand(*tensors[k].shape, 2)})
        expect = (ValueError, TypeError)
        how = f"shape of {k}"
    elif how == "meta_one":
        if len(tensors) < 2:
            return "skipped"
        k = draw(st.sampled_from(sorted(tensors)))
        broken = _with(kw, **{k: tensors[k].to("meta")})
        expect = (ValueError,)
        how = f"meta {k}"
    else:  # meta_all: shapes only; may work
        broken = _with(kw, **{k: v.to("meta") for k, v in tensors.items()})
        try:
            spec["call"](_leafify(broken, spec.get("grads", ())), backend)
        except (TypeError, ValueError, NotImplementedError):
            pass
        return how
    try:
        spec["call"](_leafify(broken, spec.get("grads", ())), backend)
    except expect as exc:
        if not _names_an_argument(exc, names):
            raise Failure(f"invalid {how}: {type(exc).__name__} names no argument: {str(exc)[:120]}") from exc
        return how.split(" of ")[0].split(" ")[0]
    except Exception as exc:  # noqa: BLE001
        raise Failure(f"invalid {how}: {type(exc).__name__} instead of {expect[0].__name__}: {str(exc)[:160]}") from exc
    if how.startswith("shape"):
        return "shape-accepted"  # a trailing dimension that the layout allows ([..., V] inputs): not a failure
    raise Failure(f"invalid {how}: accepted")


def run_target(name, backend, examples, out, last):
    """The child: ``examples`` hypothesis examples of one target; writes the JSON record."""
    import warnings

    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    spec = _targets()[name]
    record = dict(target=name, backend=backend, examples=0, valid=0, invalid=0, kinds={}, failures={})

    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data):
        draw = data.draw
        kw, meta, seed = _example(spec, draw, st)
        mode = draw(st.sampled_from(["valid", "valid", "noncontiguous", "nan", "invalid", "invalid", "invalid", "invalid"]))
        Path(last).write_text(f"{mode} seed={seed} " + repr(kw))
        record["examples"] += 1
        try:
            if mode == "invalid":
                record["invalid"] += 1
                kind = _invalid(spec, backend, kw, meta, draw, st)
            else:
                record["valid"] += 1
                kind = mode
                _valid(spec, backend, kw, meta, seed, "plain" if mode == "valid" else mode, draw, st)
            record["kinds"][kind] = record["kinds"].get(kind, 0) + 1
        except Failure as f:
            _note(record, f"{f} [{getattr(f, 'arg', '')}]", Path(last).read_text() + f.detail())
        except Exception as exc:  # noqa: BLE001  (a valid call that raised)
            _note(record, _signature(f"{mode} raised", exc),
                  Path(last).read_text() + "\n" + "".join(traceback.format_exception(exc))[-1500:])

    fuzz()
    Path(out).write_text(json.dumps(record))


def _note(record, signature, example):
    sig = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", signature)[:200]
    entry = record["failures"].setdefault(sig, dict(count=0, example=example[-2500:]))
    entry["count"] += 1


# ---------------------------------------------------------------------------------------------
# N >= 2^31 probes (stride-0 expanded inputs: no memory for the data)


BIG_PROBES = {
    "token_logprobs": "fusedrl.token_logprobs(torch.zeros(1, 3).expand(2**31 + 1, 3), torch.zeros(1, dtype=torch.int64).expand(2**31 + 1))",
    "linear_logprobs": "fusedrl.linear_logprobs(torch.zeros(1, 2).expand(2**31 + 1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.int64).expand(2**31 + 1))",
    "policy_loss": "fusedrl.policy_loss(torch.zeros(1, 1).expand(2**31 + 1, 1), None, torch.zeros(1).expand(2**31 + 1), torch.ones(1, 1, dtype=torch.bool).expand(2**31 + 1, 1))",
    "group_advantages": "fusedrl.group_advantages(torch.zeros(1).expand(2**31 + 2), group_size=2)",
    "gae": "fusedrl.gae(torch.zeros(1, 1).expand(2**31 + 1, 1), torch.zeros(1, 1).expand(2**31 + 1, 1), torch.ones(1, 1, dtype=torch.bool).expand(2**31 + 1, 1))",
    "discounted_returns": "fusedrl.discounted_returns(torch.zeros(1, 1).expand(1, 2**31 + 1), torch.ones(1, 1, dtype=torch.bool).expand(1, 2**31 + 1))",
}


def run_big(name, timeout):
    code = ("import resource, torch, fusedrl\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))\n"
            "try:\n"
            f"    {BIG_PROBES[name]}\n"
            "    print('RESULT accepted (ran to completion)')\n"
            "except (ValueError, TypeError) as e:\n"
            "    print('RESULT', type(e).__name__, str(e)[:200])\n"
            "except Exception as e:\n"
            "    print('RESULT', type(e).__name__, str(e)[:200])\n")
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout} s (accepted and computing)"
    if run.returncode < 0:
        return f"crash: signal {-run.returncode}"
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")]
    return lines[-1][7:] if lines else f"exit {run.returncode}: {run.stderr[-300:]}"


# ---------------------------------------------------------------------------------------------
# the parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10_000, help="examples per target on the CPU backends")
    ap.add_argument("--reference-examples", type=int, default=None,
                    help="examples per target on the torch reference backend (default: --examples)")
    ap.add_argument("--triton", action="store_true", help="also the Triton kernels under TRITON_INTERPRET=1")
    ap.add_argument("--triton-examples", type=int, default=200, help="examples per Triton target (interpreter: slow)")
    ap.add_argument("--only", nargs="*", default=None, help="target names (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--big", action="store_true", help="probe N >= 2^31 with expanded inputs")
    ap.add_argument("--report", default=str(ROOT / "fuzz-report.json"))
    ap.add_argument("--worker", nargs=4, metavar=("TARGET", "BACKEND", "EXAMPLES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, backend, n, out = args.worker
        run_target(name, backend, int(n), out, out + ".last")
        return

    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors run in Triton only in the interpreter
    os.environ["FUSEDRL_POISON"] = "1"  # fresh kernel outputs NaN-filled: an unwritten element shows
    names = _target_names()
    jobs = []
    for name, backends in sorted(names.items(), key=lambda kv: "cpu" not in kv[1]):  # kernel targets first
        if args.only and name not in args.only:
            continue
        for backend in backends:
            if backend == "triton" and not args.triton:
                continue
            n = {"triton": args.triton_examples, "torch": args.reference_examples or args.examples}.get(backend, args.examples)
            jobs.append((name, backend, n))
    tmp = Path(args.report).with_suffix(".d")
    tmp.mkdir(parents=True, exist_ok=True)
    running, results = [], []
    t0 = time.time()
    while jobs or running:
        while jobs and len(running) < args.jobs:
            name, backend, n = jobs.pop(0)
            out = tmp / f"{name}.{backend}.json"
            out.unlink(missing_ok=True)
            p = subprocess.Popen([sys.executable, __file__, "--worker", name, backend, str(n), str(out)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            running.append((p, name, backend, out, time.time()))
        time.sleep(0.2)
        for item in list(running):
            p, name, backend, out, started = item
            if p.poll() is None:
                continue
            running.remove(item)
            log = p.stdout.read()
            if out.exists():
                rec = json.loads(out.read_text())
            else:
                last = Path(str(out) + ".last")
                rec = dict(target=name, backend=backend, examples=0, failures={
                    f"child died: exit {p.returncode}" + (f" (signal {signal.Signals(-p.returncode).name})"
                                                          if p.returncode < 0 else ""):
                    dict(count=1, example=(last.read_text() if last.exists() else "") + "\n" + log[-3000:])})
            rec["seconds"] = round(time.time() - started, 1)
            results.append(rec)
            print(f"{name:28s} {backend:7s} {rec.get('examples', 0):6d} examples  {len(rec['failures'])} failure kinds  "
                  f"{rec['seconds']:.0f} s", flush=True)
    big = {}
    if args.big:
        for name in BIG_PROBES:
            if args.only and name not in args.only:
                continue
            big[name] = run_big(name, timeout=60)
            print(f"N >= 2^31 {name}: {big[name]}", flush=True)
    Path(args.report).write_text(json.dumps(dict(results=results, big=big, seconds=round(time.time() - t0)), indent=1))
    print(f"\n| target | backend | examples | valid | invalid | failure kinds |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['target']} | {r['backend']} | {r.get('examples', 0)} | {r.get('valid', 0)} | {r.get('invalid', 0)} | "
              f"{len(r['failures'])} |")
    for r in results:
        for sig, f in r["failures"].items():
            print(f"\n[{r['target']} / {r['backend']}] x{f['count']}: {sig}\n    {f['example'][:600]}")


def _target_names():
    """{target: backends} without importing torch in the parent."""
    code = "import json, sys; sys.path.insert(0, %r); import fuzz; print(json.dumps({k: v['backends'] for k, v in fuzz._targets().items()}))"
    run = subprocess.run([sys.executable, "-c", code % str(Path(__file__).parent)], capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
