"""policy_loss / aggregate / kl_penalty against independent loops written from docs/OBJECTIVES.md
(the paper objectives without a peer: CTPO, DHPO, balanced aggregation; bias-corrected k3; rollout
correction incl. IcePop), plus the edge cases and laws every objective must keep: extreme
log-ratios, fully masked batches, padding invariance, the micro-batch / rank invariance law for
every aggregation, dtypes, and argument errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedrl
from fusedrl import presets
from fusedrl.policy import AGGREGATIONS, KL_KINDS, RATIOS, SURROGATES
from fusedrl.reference import policy as ref_policy

TOL = dict(rtol=1e-9, atol=1e-12)
SETTINGS = settings(max_examples=25, deadline=None)


def batch(B, T, seed, density=0.7, spread=0.5, per_token_adv=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    mask = torch.rand(B, T, generator=g) < density
    if B > 1:
        mask[0] = True  # at least one full row
    return dict(
        x=x,
        o=x + spread * torch.randn(B, T, generator=g, dtype=dtype),
        r=x + 0.3 * torch.randn(B, T, generator=g, dtype=dtype),
        mu=x + 0.4 * torch.randn(B, T, generator=g, dtype=dtype),
        A=torch.randn(B, T, generator=g, dtype=dtype) if per_token_adv else torch.randn(B, generator=g, dtype=dtype),
        H=torch.rand(B, T, generator=g, dtype=dtype) * 2,
        mask=mask,
        groups=torch.randint(0, max(1, B // 2), (B,), generator=g),
    )


def adv_at(A, i, t):
    return A[i] if A.dim() == 1 else A[i, t]


def loss_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out
    if not loss.requires_grad:  # a loop that found no valid token returns a constant 0
        return loss.detach(), torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), (torch.zeros_like(x) if grad is None else grad)


def token_mean(terms):
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=torch.float64)


shapes = st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(0, 10_000))


# ---------------------------------------------------------------------------------------------
# CTPO: cumulative ratio with the position-adaptive clip


def ctpo_loop(x, d, lo, hi):
    terms = []
    B, T = x.shape
    for i in range(B):
        c, n = 0.0, 0
        for t in range(T):
            if not d["mask"][i, t]:
                continue
            c = c + (x[i, t] - d["o"][i, t])
            n += 1
            a = adv_at(d["A"], i, t)
            w = torch.exp(c)
            w_clip = torch.exp(torch.clamp(c, math.sqrt(n) * math.log(1 - lo), math.sqrt(n) * math.log(1 + hi)))
            terms.append(-torch.minimum(w * a, w_clip * a))
    return token_mean(terms)


@SETTINGS
@given(shapes, st.booleans())
def test_ctpo_cumulative_ratio_matches_loop(shape, per_token_adv):
    B, T, seed = shape
    d = batch(B, T, seed, per_token_adv=per_token_adv, spread=0.3)
    ref = loss_and_grad(lambda x: ctpo_loop(x, d, 0.2, 0.28), d["x"])
    got = loss_and_grad(
        lambda x: fusedrl.policy_loss(x, d["o"], d["A"], d["mask"], ratio="cumulative", clip_low=0.2, clip_high=0.28),
        d["x"],
    )
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)


def test_ctpo_clip_is_position_adaptive():
    """The same cumulative log-ratio is clipped at position 1 and not at position 9 (sqrt(n) bound)."""
    x = torch.zeros(1, 9, dtype=torch.float64)
    o = torch.zeros(1, 9, dtype=torch.float64)
    o[0, 0] = -0.3  # c = 0.3 from the first token on: above log(1.2) = 0.18, below 3 log(1.2) = 0.55
    A = torch.ones(1, dtype=torch.float64)
    mask = torch.ones(1, 9, dtype=torch.bool)
    _, metrics = fusedrl.policy_loss(x, o, A, mask, ratio="cumulative", clip_low=0.2)
    # positions n = 1 and 2 are clipped (sqrt(2) * 0.182 = 0.258 < 0.3), n >= 3 are not
    torch.testing.assert_close(metrics["clipfrac_high"], torch.tensor(2 / 9, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# DHPO: hybrid ratio, average and entropy mixing


def dhpo_loop(x, d, mixing, lo, hi, slo, shi, alpha=0.5):
    terms = []
    B, T = x.shape
    for i in range(B):
        valid = [t for t in range(T) if d["mask"][i, t]]
        if not valid:
            continue
        s = torch.exp(sum(x[i, t] - d["o"][i, t] for t in valid) / len(valid))
        h_max = max(float(d["H"][i, t]) for t in valid)
        for t in valid:
            a = alpha if mixing == "average" else (float(d["H"][i, t]) / h_max if h_max > 0 else 0.0)
            w_tok = torch.exp(x[i, t] - d["o"][i, t])
            w = a * w_tok + (1 - a) * s
            w_clip = a * torch.clamp(w_tok, 1 - lo, 1 + hi) + (1 - a) * torch.clamp(s, 1 - slo, 1 + shi)
            adv = adv_at(d["A"], i, t)
            terms.append(-torch.minimum(w * adv, w_clip * adv))
    return token_mean(terms)


@SETTINGS
@given(shapes, st.sampled_from(["average", "entropy"]), st.booleans())
def test_dhpo_hybrid_matches_loop(shape, mixing, per_token_adv):
    B, T, seed = shape
    d = batch(B, T, seed, per_token_adv=per_token_adv)
    kw = dict(clip_low=0.2, clip_high=0.28, seq_clip_low=0.05, seq_clip_high=0.1)
    ref = loss_and_grad(lambda x: dhpo_loop(x, d, mixing, 0.2, 0.28, 0.05, 0.1), d["x"])
    got = loss_and_grad(
        lambda x: fusedrl.policy_loss(x, d["o"], d["A"], d["mask"], ratio="hybrid", hybrid_mixing=mixing,
                                      entropy=d["H"] if mixing == "entropy" else None, **kw),
        d["x"],
    )
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)


def test_dhpo_alpha_endpoints_are_token_and_sequence_ratios():
    d = batch(4, 6, 3)
    args = (d["o"], d["A"], d["mask"])
    for alpha, ratio in [(1.0, "token"), (0.0, "sequence")]:
        hybrid, _ = fusedrl.policy_loss(d["x"], *args, ratio="hybrid", hybrid_alpha=alpha)
        plain, _ = fusedrl.policy_loss(d["x"], *args, ratio=ratio)
        torch.testing.assert_close(hybrid, plain, **TOL)


# ---------------------------------------------------------------------------------------------
# balanced aggregation


def balanced_loop(values, mask, A, groups):
    group_losses = []
    for g in sorted(set(groups.tolist())):
        rows = [i for i in range(values.shape[0]) if groups[i] == g and mask[i].any()]
        sign = {i: float(A[i] if A.dim() == 1 else (A[i] * mask[i]).sum()) for i in rows}
        pos = [i for i in rows if sign[i] > 0]
        neg = [i for i in rows if sign[i] < 0]
        n = len(pos) + len(neg)
        if n == 0:
            continue
        loss_g = 0.0
        for side in (pos, neg):
            toks = [values[i, t] for i in side for t in range(values.shape[1]) if mask[i, t]]
            if toks:
                loss_g = loss_g + len(side) / n * sum(toks) / len(toks)
        group_losses.append(loss_g)
    return sum(group_losses) / len(group_losses) if group_losses else torch.zeros((), dtype=torch.float64)


@SETTINGS
@given(shapes, st.booleans(), st.booleans())
def test_balanced_aggregation_matches_loop(shape, per_token_adv, use_groups):
    B, T, seed = shape
    d = batch(B, T, seed, per_token_adv=per_token_adv, density=0.5)
    values = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    groups = d["groups"] if use_groups else torch.zeros(B, dtype=torch.long)
    ref = loss_and_grad(lambda v: balanced_loop(v, d["mask"], d["A"], groups), values)
    got = loss_and_grad(
        lambda v: fusedrl.aggregate(v, d["mask"], "balanced", advantages=d["A"],
                                    group_ids=d["groups"] if use_groups else None),
        values,
    )
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)


def test_balanced_weights_sides_by_sequence_counts():
    """One group: 1 positive sequence of 1 token (value 4), 3 negative ones (values 1, 1, 1 and 2):
    L = 1/4 * 4 + 3/4 * mean(1, 1, 1, 2) = 1 + 0.9375."""
    values = torch.tensor([[4.0, 0.0], [1.0, 1.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0]])
    A = torch.tensor([1.0, -1.0, -2.0, -0.5], dtype=torch.float64)
    got = fusedrl.aggregate(values, mask, "balanced", advantages=A)
    torch.testing.assert_close(got, torch.tensor(1.9375, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# KL: bias-corrected k3, straight-through kinds


def test_bias_corrected_k3_matches_loop_and_liger_gradient():
    d = batch(3, 5, 7)
    beta = 0.3

    def loop(x):
        terms = []
        for i in range(3):
            for t in range(5):
                if d["mask"][i, t]:
                    w = torch.exp(x[i, t] - d["o"][i, t])
                    diff = d["r"][i, t] - x[i, t]
                    k3 = torch.exp(diff) - diff - 1
                    terms.append(-w * adv_at(d["A"], i, t) + beta * k3 * w)
        return token_mean(terms)

    fn = lambda x: fusedrl.policy_loss(x, d["o"], d["A"], d["mask"], surrogate="reinforce", ref_logp=d["r"],
                                       beta=beta, use_bias_correction_kl=True)
    ref, got = loss_and_grad(loop, d["x"]), loss_and_grad(fn, d["x"])
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)
    # KL part alone (A = 0): d/dx (k3 w) = w (x - r) (Liger's backward)
    zero = torch.zeros(3, dtype=torch.float64)
    _, g = loss_and_grad(lambda x: fusedrl.policy_loss(x, d["o"], zero, d["mask"], surrogate="reinforce",
                                                        ref_logp=d["r"], beta=1.0, use_bias_correction_kl=True), d["x"])
    n = d["mask"].sum()
    expected = torch.where(d["mask"], torch.exp(d["x"] - d["o"]) * (d["x"] - d["r"]) / n, 0.0)
    torch.testing.assert_close(g, expected, **TOL)


@pytest.mark.parametrize("kind", [k for k in KL_KINDS if k.endswith("+")])
def test_straight_through_kinds_have_k2_gradient(kind):
    x = torch.randn(20, dtype=torch.float64)
    r = x + torch.randn(20, dtype=torch.float64) * 2
    v, g = loss_and_grad(lambda a: fusedrl.kl_penalty(a, r, kind).sum(), x)
    torch.testing.assert_close(v, fusedrl.kl_penalty(x, r, kind[:-1]).sum(), **TOL)
    torch.testing.assert_close(g, x - r, **TOL)


def test_kl_values_from_formula():
    x = torch.tensor([0.0, -1.0, -3.0, 2.0], dtype=torch.float64)
    r = torch.tensor([-0.5, -1.0, 30.0, -40.0], dtype=torch.float64)
    d = r - x
    expected = {
        "k1": x - r, "abs": (x - r).abs(), "k2": 0.5 * (x - r) ** 2, "k3": torch.exp(d) - d - 1,
        "low_var_kl": (torch.exp(d.clamp(-20, 20)) - d.clamp(-20, 20) - 1).clamp(-10, 10),
    }
    for kind, value in expected.items():
        torch.testing.assert_close(fusedrl.kl_penalty(x, r, kind), value, **TOL)
    assert fusedrl.kl_penalty(x.float(), r.float(), "k3").dtype == torch.float32
    assert fusedrl.kl_penalty(x.bfloat16(), r.bfloat16(), "k2").dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# rollout correction


def rollout_loop(x, d, mode, cap, cap_low):
    terms = []
    B, T = x.shape
    for i in range(B):
        valid = [t for t in range(T) if d["mask"][i, t]]
        seq_q = math.exp(sum(float(d["o"][i, t] - d["mu"][i, t]) for t in valid))
        for t in valid:
            q = seq_q if mode.startswith("sequence") else math.exp(float(d["o"][i, t] - d["mu"][i, t]))
            lo = cap_low if cap_low is not None else -math.inf
            hi = cap if cap is not None else math.inf
            weight = min(max(q, lo), hi) if mode.endswith("truncate") else (q if lo <= q <= hi else 0.0)
            terms.append(-torch.exp(x[i, t] - d["o"][i, t]) * adv_at(d["A"], i, t) * weight)
    return token_mean(terms)


@pytest.mark.parametrize("mode,cap,cap_low", [
    ("token_truncate", 1.5, None), ("token_truncate", 1.5, 0.7), ("token_mask", 1.5, None),
    ("token_mask", None, 0.8), ("sequence_truncate", 2.0, None), ("sequence_mask", 2.0, 0.4),
    ("icepop", 1.4, 0.7),
])
def test_rollout_correction_matches_loop(mode, cap, cap_low):
    d = batch(5, 6, 11)
    ref = loss_and_grad(lambda x: rollout_loop(x, d, mode if mode != "icepop" else "token_mask", cap, cap_low), d["x"])
    got = loss_and_grad(
        lambda x: fusedrl.policy_loss(x, d["o"], d["A"], d["mask"], surrogate="reinforce", rollout_logp=d["mu"],
                                      rollout_correction=mode, rollout_cap=cap, rollout_cap_low=cap_low),
        d["x"],
    )
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)
    plain = loss_and_grad(lambda x: fusedrl.policy_loss(x, d["o"], d["A"], d["mask"], surrogate="reinforce"), d["x"])
    assert not torch.allclose(got[1], plain[1])


def test_rollout_weights_are_constants():
    """The weight carries no gradient: rollout_logp never receives one, and logp's gradient is the
    weighted on-policy one."""
    d = batch(3, 4, 2)
    mu = d["mu"].clone().requires_grad_(True)
    loss, metrics = fusedrl.policy_loss(d["x"].clone().requires_grad_(True), d["o"], d["A"], d["mask"],
                                        rollout_logp=mu, rollout_correction="token_truncate")
    loss.backward()
    assert mu.grad is None
    assert 0 < float(metrics["rollout_weight_mean"]) <= 3.0


# ---------------------------------------------------------------------------------------------
# extremes, masks, padding


# geo_mean and vespo define their own sequence weights: the token ratio only
COMBOS = [(s, r) for s in SURROGATES for r in RATIOS if s not in ("geo_mean", "vespo") or r == "token"]


@pytest.mark.parametrize("surrogate,ratio", COMBOS)
@pytest.mark.parametrize("magnitude", [50.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_log_ratios_are_finite(surrogate, ratio, magnitude, dtype):
    g = torch.Generator().manual_seed(0)
    B, T = 3, 6
    x = -torch.rand(B, T, generator=g, dtype=dtype)
    sign = torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    o = x - sign * magnitude
    A = torch.randn(B, generator=g, dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    H = torch.rand(B, T, generator=g, dtype=dtype)
    kw = dict(surrogate=surrogate, ratio=ratio, ref_logp=x + 0.5, beta=0.04, use_bias_correction_kl=True,
              rollout_logp=o + sign * magnitude, rollout_correction="token_truncate", entropy=H,
              entropy_coef=0.01, hybrid_mixing="entropy")
    if surrogate == "vespo":  # no rollout correction (test_vespo_refusals in tests/peers/test_trl_grpo.py)
        kw.update(rollout_correction=None, off_policy_mask_threshold=0.0, top_entropy_quantile=0.5)
    for aggregation in ["token-mean", "seq-mean-token-mean"]:
        xx = x.clone().requires_grad_(True)
        loss, metrics = fusedrl.policy_loss(xx, o, A, mask, aggregation=aggregation, **kw)
        loss.backward()
        assert torch.isfinite(loss), (surrogate, ratio, loss)
        assert torch.isfinite(xx.grad).all()
        assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("ratio", [r for r in RATIOS if r != "token"])
def test_geo_mean_needs_token_ratio(ratio):
    d = batch(2, 3, 0)
    with pytest.raises(ValueError, match="ratio"):
        fusedrl.policy_loss(d["x"], d["o"], d["A"], d["mask"], surrogate="geo_mean", ratio=ratio)


@pytest.mark.parametrize("surrogate,ratio", COMBOS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_fully_masked_batch_is_exactly_zero(surrogate, ratio, aggregation):
    B, T = 3, 4
    x = torch.full((B, T), float("nan"), dtype=torch.float64).requires_grad_(True)  # padding garbage
    o = torch.full((B, T), float("inf"), dtype=torch.float64)
    H = torch.full((B, T), float("nan"), dtype=torch.float64).requires_grad_(True)
    A = torch.tensor([1.0, -1.0, float("nan")], dtype=torch.float64)
    mask = torch.zeros(B, T)
    # vespo takes no rollout correction; its masks instead (a top-entropy quantile of no valid token)
    extra = (dict(off_policy_mask_threshold=0.0, top_entropy_quantile=0.5) if surrogate == "vespo" else
             dict(rollout_correction="sequence_mask"))
    loss, metrics = fusedrl.policy_loss(
        x, o, A, mask, surrogate=surrogate, ratio=ratio, aggregation=aggregation, ref_logp=o, beta=0.1,
        entropy=H, entropy_coef=0.1, hybrid_mixing="entropy", rollout_logp=o,
        group_ids=torch.tensor([0, 0, 1]), kl_aggregation="token-mean", **extra,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(H.grad, torch.zeros_like(H))
    assert all(v.item() == 0.0 for v in metrics.values())


@SETTINGS
@given(shapes, st.sampled_from(COMBOS), st.sampled_from(AGGREGATIONS))
def test_padding_values_never_matter(shape, combo, aggregation):
    B, T, seed = shape
    d = batch(B, T, seed, density=0.6)
    pad = ~d["mask"]
    garbage = dict(x=float("nan"), o=float("-inf"), r=float("inf"), mu=float("nan"), H=float("nan"))
    dirty = {k: v.masked_fill(pad, garbage[k]) if k in garbage else v for k, v in d.items()}

    def run(b):
        def fn(x):
            return fusedrl.policy_loss(
                x, b["o"], b["A"], b["mask"], surrogate=combo[0], ratio=combo[1], aggregation=aggregation,
                ref_logp=b["r"], beta=0.05, kl="low_var_kl", rollout_logp=b["mu"],
                entropy=b["H"].detach(), hybrid_mixing="entropy", group_ids=b["groups"], **extra,
            )
        return loss_and_grad(fn, b["x"])

    # vespo takes no rollout correction: its masks instead (the sampler's log-probs feed the off-policy one)
    extra = (dict(off_policy_mask_threshold=0.0, entropy_mask_threshold=1.0) if combo[0] == "vespo" else
             dict(rollout_correction="token_mask"))
    clean, noisy = run(d), run(dirty)
    torch.testing.assert_close(noisy[0], clean[0], **TOL)
    torch.testing.assert_close(noisy[1], clean[1], **TOL)
    assert torch.equal(noisy[1][pad], torch.zeros_like(noisy[1][pad]))


def test_float_mask_weights_tokens():
    values = torch.tensor([[1.0, 3.0], [5.0, 7.0]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.5], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(fusedrl.aggregate(values, weights, "token-mean"),
                               torch.tensor((1 + 1.5 + 14) / 3.5, dtype=torch.float64))
    torch.testing.assert_close(fusedrl.aggregate(values, weights, "seq-mean-token-mean"),
                               torch.tensor((2.5 / 1.5 + 14 / 2) / 2, dtype=torch.float64))
    int_mask = torch.tensor([[1, 1], [0, 1]])
    torch.testing.assert_close(fusedrl.aggregate(values, int_mask, "token-sum"),
                               fusedrl.aggregate(values, int_mask.bool(), "token-sum"))


def test_aggregation_modes_from_formula():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    expect = {
        "token-mean": 10 / 4, "token-sum": 10.0, "seq-mean-token-mean": (2 + 4) / 3, "seq-mean-token-sum": 10 / 3,
        "seq-mean-token-sum-norm": 10 / (3 * 3),
    }
    for mode, value in expect.items():
        torch.testing.assert_close(fusedrl.aggregate(values, mask, mode), torch.tensor(value, dtype=torch.float64))
    torch.testing.assert_close(fusedrl.aggregate(values, mask, "seq-mean-token-mean", exclude_empty_rows=True),
                               torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(fusedrl.aggregate(values, mask, "seq-mean-token-sum-norm", max_length=5, num_sequences=4),
                               torch.tensor(10 / 20, dtype=torch.float64))
    torch.testing.assert_close(fusedrl.aggregate(values, mask, "token-mean", num_tokens=torch.tensor(8)),
                               torch.tensor(10 / 8, dtype=torch.float64))


def test_t_equals_one_and_singleton_group():
    d = batch(3, 1, 4, density=1.0)
    for combo in COMBOS:
        loss, _ = fusedrl.policy_loss(d["x"], d["o"], d["A"], d["mask"], surrogate=combo[0], ratio=combo[1],
                                      aggregation="balanced", group_ids=torch.tensor([0, 1, 2]))
        assert torch.isfinite(loss)
    # with T = 1 every ratio level is the token ratio
    ref, _ = fusedrl.policy_loss(d["x"], d["o"], d["A"], d["mask"])
    for ratio in ["sequence", "sequence-token", "hybrid"]:
        got, _ = fusedrl.policy_loss(d["x"], d["o"], d["A"], d["mask"], ratio=ratio)
        torch.testing.assert_close(got, ref, **TOL)


# ---------------------------------------------------------------------------------------------
# the invariance law


def partition(B, cuts):
    edges = sorted(set([0, B] + [c for c in cuts if 0 < c < B]))
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


@SETTINGS
@given(
    st.integers(2, 7), st.integers(1, 6), st.integers(0, 10_000), st.lists(st.integers(1, 6), max_size=3),
    st.sampled_from(AGGREGATIONS), st.sampled_from(COMBOS), st.booleans(), st.sampled_from([None, "token-mean"]),
)
def test_invariance_law(B, T, seed, cuts, aggregation, combo, exclude_empty_rows, reg_aggregation):
    """Micro-batches (and simulated ranks: any partition of the rows) with global counts sum to the
    full-batch loss and gradient, for every aggregation."""
    d = batch(B, T, seed, density=0.6)
    if aggregation == "balanced":  # groups stay whole: contiguous groups, cuts on group boundaries
        d["groups"] = torch.arange(B) // 2
        cuts = [2 * (c // 2) for c in cuts]
    mask = d["mask"]
    counts = dict(num_tokens=mask.sum(), max_length=T + 2)
    rows = (mask.sum(-1) > 0).sum() if exclude_empty_rows else B
    counts["num_sequences"] = int(rows)
    if aggregation == "balanced":
        full_signs = torch.sign(d["A"]) * mask.any(-1)
        counts["num_groups"] = len({int(g) for g, s in zip(d["groups"], full_signs) if s != 0})
    kw = dict(surrogate=combo[0], ratio=combo[1], aggregation=aggregation, exclude_empty_rows=exclude_empty_rows,
              ref_logp=d["r"], beta=0.05, entropy_coef=0.02, hybrid_mixing="entropy",
              kl_aggregation=reg_aggregation, entropy_aggregation=reg_aggregation, **counts)

    def run(sl):
        x = d["x"][sl].clone().requires_grad_(True)
        h = d["H"][sl].clone().requires_grad_(True)
        loss, _ = fusedrl.policy_loss(x, d["o"][sl], d["A"][sl], mask[sl], entropy=h,
                                      ref_logp=d["r"][sl], group_ids=d["groups"][sl],
                                      **{k: v for k, v in kw.items() if k != "ref_logp"})
        gx, gh = torch.autograd.grad(loss, (x, h))
        return loss.detach(), gx, gh

    full = run(slice(0, B))
    parts = [run(sl) for sl in partition(B, cuts)]
    torch.testing.assert_close(sum(p[0] for p in parts), full[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), full[2], rtol=1e-6, atol=1e-6)


def test_local_counts_break_the_law():
    """Without global counts the micro-batch losses do not add up (so the law above can fail)."""
    d = batch(4, 5, 1, density=0.6)
    full, _ = fusedrl.policy_loss(d["x"], d["o"], d["A"], d["mask"])
    halves = sum(fusedrl.policy_loss(d["x"][s], d["o"][s], d["A"][s], d["mask"][s])[0] for s in (slice(0, 2), slice(2, 4)))
    assert not torch.allclose(halves, full)


# ---------------------------------------------------------------------------------------------
# dtypes, metrics, presets


def test_low_precision_inputs_accumulate_in_float32():
    d = batch(3, 5, 9)
    x16 = d["x"].bfloat16().requires_grad_(True)
    loss, metrics = fusedrl.policy_loss(x16, d["o"].bfloat16(), d["A"].bfloat16(), d["mask"])
    loss.backward()
    assert loss.dtype == torch.float32 and metrics["ratio_mean"].dtype == torch.float32
    assert x16.grad.dtype == torch.bfloat16 and torch.isfinite(x16.grad.float()).all()
    gold, _ = fusedrl.policy_loss(d["x"].bfloat16().double(), d["o"].bfloat16().double(), d["A"].bfloat16().double(),
                                  d["mask"])
    torch.testing.assert_close(loss.double(), gold, rtol=1e-5, atol=1e-6)


def test_metrics():
    d = batch(4, 6, 5, spread=0.6)
    _, m = fusedrl.policy_loss(d["x"], d["o"], d["A"], d["mask"], ref_logp=d["r"], entropy=d["H"])
    assert {"clipfrac_low", "clipfrac_high", "ratio_mean", "kl_mean", "entropy_mean"} <= set(m)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    valid = d["mask"]
    w = torch.exp(d["x"] - d["o"])[valid]
    A = d["A"][:, None].expand_as(d["x"])[valid]
    torch.testing.assert_close(m["clipfrac_low"], ((w < 0.8) & (A < 0)).double().mean())
    torch.testing.assert_close(m["clipfrac_high"], ((w > 1.2) & (A > 0)).double().mean())
    torch.testing.assert_close(m["entropy_mean"], d["H"][valid].mean())
    torch.testing.assert_close(m["kl_mean"], fusedrl.kl_penalty(d["x"], d["r"])[valid].mean())
    _, m2 = fusedrl.policy_loss(d["x"], d["o"], d["A"], d["mask"])
    assert "kl_mean" not in m2 and "entropy_mean" not in m2


def test_presets_shapes():
    assert presets.trl("grpo")["aggregation"] == "seq-mean-token-mean"
    assert presets.trl("dr_grpo")["aggregation"] == "seq-mean-token-sum-norm"
    cispo = presets.trl("cispo", epsilon_high=5.0)
    assert cispo["surrogate"] == "cispo" and cispo["cispo_bounds"] == "upper" and cispo["clip_high"] == 4.0
    assert presets.verl("cispo")["cispo_bounds"] == "both"
    assert presets.verl("sapo", "token-mean")["aggregation"] == "seq-mean-token-mean"
    assert presets.verl("vanilla")["clip_ratio_c"] == 3.0
    assert presets.verl("gspo", use_kl_loss=True)["kl"] == "low_var_kl"
    v = presets.verl("vanilla", rollout_is="token", rollout_is_threshold="0.5_2.0")
    assert (v["rollout_correction"], v["rollout_cap_low"], v["rollout_cap"]) == ("icepop", 0.5, 2.0)
    d = batch(2, 3, 0)
    for kw in [presets.trl(t) for t in presets.TRL_LOSS_TYPES] + [presets.verl(m) for m in presets.VERL_LOSS_MODES]:
        loss, _ = fusedrl.policy_loss(d["x"], d["o"], d["A"], d["mask"], **kw)
        assert torch.isfinite(loss)
    assert fusedrl.presets is presets


@pytest.mark.parametrize("call,match", [
    (lambda: presets.trl("grpo", num_items_in_batch=10), "num_tokens="),
    (lambda: presets.trl("dr_grpo", max_completion_length=10), "max_length="),
    (lambda: presets.verl("vanilla", dp_size=2), "dp_size"),
    (lambda: presets.verl("vanilla", global_batch_size=2), "num_sequences="),
    (lambda: presets.verl("vanilla", loss_scale_factor=2), "max_length="),
    (lambda: presets.trl("grpo", use_adaptive_entropy=True), "unsupported option 'use_adaptive_entropy'"),
])
def test_presets_reject_normalizers_and_unknown_options(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("call,match", [
    (lambda: presets.trl("ppo"), "loss_type"),
    (lambda: presets.trl("grpo", importance_sampling_level="segment"), "importance_sampling_level"),
    (lambda: presets.verl("dppo_tv"), "loss_mode"),
    (lambda: presets.verl("vanilla", "seq-sum"), "loss_agg_mode"),
    (lambda: presets.verl_kl("full"), "kl"),
    (lambda: presets.verl("vanilla", rollout_is="token", rollout_is_threshold="a_b"), "rollout_is_threshold"),
])
def test_presets_reject_bad_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# argument errors

_D = batch(2, 3, 0)


def _call(**over):
    args = dict(logp=_D["x"], old_logp=_D["o"], advantages=_D["A"], mask=_D["mask"])
    args.update(over)
    return fusedrl.policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)


BAD = [
    (dict(logp=[[0.0]]), TypeError, "logp"),
    (dict(logp=torch.zeros(2, 3, dtype=torch.long)), TypeError, "logp"),
    (dict(logp=torch.zeros(6)), ValueError, "logp"),
    (dict(old_logp=torch.zeros(2, 4)), ValueError, "old_logp"),
    (dict(advantages=torch.zeros(3)), ValueError, "advantages"),
    (dict(mask=torch.ones(2, 4)), ValueError, "mask"),
    (dict(mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "mask"),
    (dict(surrogate="ppo"), ValueError, "surrogate"),
    (dict(ratio="segment"), ValueError, "ratio"),
    (dict(aggregation="mean"), ValueError, "aggregation"),
    (dict(kl="k4"), ValueError, "kl"),
    (dict(rollout_correction="tis"), ValueError, "rollout_correction"),
    (dict(clip_low=-0.1), ValueError, "clip_low"),
    (dict(clip_low="0.2"), TypeError, "clip_low"),
    (dict(clip_high=float("nan")), ValueError, "clip_high"),
    (dict(clip_low=0.3, clip_high=-0.5), ValueError, "clip_high"),
    (dict(clip_ratio_c=1.0), ValueError, "clip_ratio_c"),
    (dict(clip_ratio_c=3.0, surrogate="sapo"), ValueError, "clip_ratio_c"),
    (dict(delta=1.5, surrogate="cispo"), ValueError, "delta"),
    (dict(beta=0.1), ValueError, "ref_logp"),
    (dict(entropy_coef=0.1), ValueError, "entropy"),
    (dict(ratio="hybrid", hybrid_mixing="entropy"), ValueError, "entropy"),
    (dict(ratio="hybrid", hybrid_alpha=1.5), ValueError, "hybrid_alpha"),
    (dict(ratio="cumulative", clip_low=1.0), ValueError, "clip_low"),
    (dict(rollout_correction="token_mask"), ValueError, "rollout_logp"),
    (dict(rollout_correction="icepop", rollout_logp=_D["mu"]), ValueError, "rollout_cap_low"),
    (dict(rollout_correction="token_truncate", rollout_logp=_D["mu"], rollout_cap=None), ValueError, "rollout_cap"),
    (dict(rollout_cap_low=4.0, rollout_cap=2.0, rollout_correction="token_mask", rollout_logp=_D["mu"]), ValueError,
     "rollout_cap_low"),
    (dict(tau_pos=0.0), ValueError, "tau_pos"),
    (dict(cispo_bounds="lower"), ValueError, "cispo_bounds"),
    (dict(num_tokens=-1), ValueError, "num_tokens"),
    (dict(num_sequences=torch.ones(2)), ValueError, "num_sequences"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(group_ids=torch.zeros(3, dtype=torch.long)), ValueError, "group_ids"),
    (dict(group_ids=torch.zeros(2)), TypeError, "group_ids"),
    (dict(exclude_empty_rows=1), TypeError, "exclude_empty_rows"),
    (dict(use_bias_correction_kl="yes"), TypeError, "use_bias_correction_kl"),
    (dict(log_ratio_clamp=0.0), ValueError, "log_ratio_clamp"),
    (dict(kl_aggregation="sum"), ValueError, "kl_aggregation"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(surrogate="vespo", ratio="sequence"), ValueError, "ratio"),
    (dict(surrogate="vespo", rollout_correction="token_mask", rollout_logp=_D["mu"]), ValueError, "rollout_correction"),
    (dict(vespo_k_pos="2"), TypeError, "vespo_k_pos"),
    (dict(vespo_lambda_neg=float("nan")), ValueError, "vespo_lambda_neg"),
    (dict(off_policy_mask_threshold=float("inf")), ValueError, "off_policy_mask_threshold"),
    (dict(off_policy_mask_threshold="0.1"), TypeError, "off_policy_mask_threshold"),
    (dict(top_entropy_quantile=0.0, entropy=_D["H"]), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=1.5, entropy=_D["H"]), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=0.5), ValueError, "entropy"),
    (dict(entropy_mask_threshold=1.0), ValueError, "entropy"),
    (dict(top_entropy_quantile=0.5, entropy_mask_threshold=1.0, entropy=_D["H"]), ValueError, "not both"),
    (dict(entropy_mask_threshold=torch.ones(2), entropy=_D["H"]), ValueError, "entropy_mask_threshold"),
    (dict(entropy_mask_threshold=float("nan"), entropy=_D["H"]), ValueError, "entropy_mask_threshold"),
    (dict(surrogate="geo_mean", off_policy_mask_threshold=0.1), ValueError, "geo_mean"),
    (dict(surrogate="geo_mean", entropy_mask_threshold=0.1, entropy=_D["H"]), ValueError, "geo_mean"),
]


@pytest.mark.parametrize("over,exc,name", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_policy_loss_bad_input(over, exc, name):
    with pytest.raises(exc, match=name):
        _call(**over)


def test_memoized_options_still_reject_equal_values_of_a_bad_type():
    """The validated options are memoized on their values and types: after a valid call, an equal
    value of a rejected type (True == 1, False == 0 == 0.0) still raises, and the valid call still
    runs."""
    _call(clip_low=1, beta=0.0, exclude_empty_rows=False)
    with pytest.raises(TypeError, match="clip_low"):
        _call(clip_low=True, beta=0.0, exclude_empty_rows=False)
    with pytest.raises(TypeError, match="exclude_empty_rows"):
        _call(clip_low=1, beta=0.0, exclude_empty_rows=0)
    with pytest.raises(TypeError, match="beta"):
        _call(clip_low=1, beta=False, exclude_empty_rows=False)
    _call(clip_low=1, beta=0.0, exclude_empty_rows=False)


@pytest.mark.parametrize("call,exc,name", [
    (lambda: fusedrl.aggregate(torch.zeros(2, 3), torch.ones(2, 3), "mean"), ValueError, "mode"),
    (lambda: fusedrl.aggregate(torch.zeros(2, 3), torch.ones(3, 2)), ValueError, "mask"),
    (lambda: fusedrl.aggregate(torch.zeros(2, 3), torch.ones(2, 3), "balanced"), TypeError, "advantages"),
    (lambda: fusedrl.aggregate(torch.zeros(2, 3), torch.ones(2, 3), num_groups=float("inf")), ValueError, "num_groups"),
    (lambda: fusedrl.kl_penalty(torch.zeros(3), torch.zeros(4)), ValueError, "ref_logp"),
    (lambda: fusedrl.kl_penalty(torch.zeros(3), torch.zeros(3), "k5"), ValueError, "kind"),
    (lambda: fusedrl.kl_penalty(torch.zeros(3, dtype=torch.int32), torch.zeros(3)), TypeError, "logp"),
])
def test_aggregate_and_kl_bad_input(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_masks_multiply_the_surrogate_only():
    """The off-policy and entropy masks drop tokens from the surrogate, not from the normalizers,
    the KL or the entropy term (TRL's order); a mask that keeps everything changes nothing."""
    d = batch(4, 6, 3)
    kw = dict(ref_logp=d["r"], beta=0.1, entropy=d["H"], entropy_coef=0.01)

    def call(**over):
        return fusedrl.policy_loss(d["x"], d["o"], d["A"], d["mask"], **kw, **over)[0]

    base = call()
    keep_all = call(off_policy_mask_threshold=1e9, entropy_mask_threshold=-1.0)
    torch.testing.assert_close(keep_all, base, rtol=0, atol=0)
    drop_all = call(entropy_mask_threshold=1e9)
    _, pieces = ref_policy.per_token_policy_loss(d["x"], d["o"], d["A"], d["mask"], **kw)
    valid = d["mask"].bool()
    expected = ((0.1 * pieces["kl"] - 0.01 * pieces["entropy"]) * valid).sum() / valid.sum()
    torch.testing.assert_close(drop_all, expected)
    some = call(top_entropy_quantile=0.5, off_policy_mask_threshold=0.0)
    assert not torch.allclose(some, base) and not torch.allclose(some, drop_all)


def test_vespo_weight_from_formula():
    """phi(W) = exp(lambda + k log W - lambda W) of W = exp(sum_t m clamp(rho)): 1 at W = 1, the
    (k, lambda) pair by the sign of A, a loss of -phi A x."""
    d = batch(3, 5, 4)
    x, o, A, mask = d["x"], d["o"], d["A"], d["mask"]
    k_pos, lam_pos, k_neg, lam_neg = 2.0, 3.0, 3.0, 2.0
    xx = x.clone().requires_grad_(True)
    loss, _ = fusedrl.policy_loss(xx, o, A, mask, surrogate="vespo", aggregation="token-sum")
    loss.backward()
    m = mask.double()
    log_w = ((x - o) * m).sum(-1).clamp(math.log(1e-8), 20.0)
    k = torch.where(A >= 0, k_pos, k_neg)
    lam = torch.where(A >= 0, lam_pos, lam_neg)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    torch.testing.assert_close(loss, (-(phi * A)[:, None] * x * m).sum())
    torch.testing.assert_close(xx.grad, -(phi * A)[:, None] * m)
    on_policy, _ = fusedrl.policy_loss(x, x, A, mask, surrogate="vespo", aggregation="token-sum")
    torch.testing.assert_close(on_policy, (-A[:, None] * x * m).sum())  # phi(1) = 1
