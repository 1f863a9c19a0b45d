"""Advantages and scans against loops written from the formulas of docs/OBJECTIVES.md.

Every expected value here is computed by plain Python loops over rows, groups and tokens (floats,
dicts, ``statistics``), independently of the vectorized reference. Covered: the group estimators
(grpo with each scale, rloo, reinforce++(-baseline), grpo_passk, opo, remax, gpg) with both singleton
rules; the multi-objective combines (sum_then_normalize, normalize_then_sum = GDPO as TRL and, with
a mask, as verl, chebyshev, min, mean_minus_var); F-GRPO phase advantages; MatchTIR segment +
trajectory advantages; nested subgroup ids; GAE with the truncated-response bootstrap (T-PPO) and
whitening; discounted returns. Hypothesis varies group layouts (shuffled ids, singletons, one giant
group, zero-variance groups) and checks permutation and relabelling invariance. Bad input raises
TypeError / ValueError naming the argument.
"""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedrl
from fusedrl.reference import advantages as ref

TOL = dict(rtol=1e-9, atol=1e-9)
HYP = settings(max_examples=30, deadline=None)


# ----------------------------------------------------------------------------------------------
# loops from the formulas
# ----------------------------------------------------------------------------------------------


def groups_of(ids):
    out = {}
    for i, g in enumerate(ids):
        out.setdefault(g, []).append(i)
    return out


def loop_whiten(xs):
    """(x - mean) / sqrt(var + 1e-8), unbiased var; one value -> 0, none -> nothing."""
    if len(xs) < 2:
        return [0.0 for _ in xs]
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return [(x - m) / math.sqrt(var + 1e-8) for x in xs]


def loop_batch_normalize(xs, eps):
    if len(xs) < 2:
        return [0.0 for _ in xs]
    m = sum(xs) / len(xs)
    return [(x - m) / (statistics.stdev(xs) + eps) for x in xs]


def loop_group(R, ids, estimator="grpo", scale="group", eps=1e-6, singleton="verl", lengths=None):
    """Per-row advantages [N] of the group estimators (before any batch whitening)."""
    N = len(R)
    out = [0.0] * N
    if N > 1:
        batch_std = statistics.stdev(R)
    else:
        batch_std = 1.0 if singleton == "verl" else 0.0
    nonzero = sum(1 for r in R if r != 0)
    for rows in groups_of(ids).values():
        vals = [R[i] for i in rows]
        n = len(rows)
        if n == 1:
            mean, std = (0.0, 1.0) if singleton == "verl" else (vals[0], 0.0)
        else:
            mean, std = sum(vals) / n, statistics.stdev(vals)
        d = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        for i in rows:
            if estimator in ("grpo",):
                out[i] = (R[i] - mean) / d
            elif estimator == "reinforce++-baseline":
                out[i] = R[i] - mean
            elif estimator == "gpg":
                out[i] = N / max(nonzero, 1) * (R[i] - mean)
            elif estimator == "rloo":
                if n == 1:
                    out[i] = R[i] if singleton == "verl" else 0.0
                else:
                    out[i] = R[i] - (sum(vals) - R[i]) / (n - 1)
            elif estimator == "opo":
                lens = [lengths[j] for j in rows]
                if n == 1:
                    base = 0.0 if singleton == "verl" else R[i]
                else:
                    base = sum(l * r for l, r in zip(lens, vals)) / sum(lens) if sum(lens) else 0.0
                out[i] = R[i] - base
        if estimator == "grpo_passk":
            best = max(rows, key=lambda j: (R[j], -j))  # first maximum
            second = max(R[j] for j in rows if j != best)
            out[best] = (R[best] - second) / d
    return out


def to_tokens(per_row, mask):
    return [[per_row[i] if mask[i][t] else 0.0 for t in range(len(mask[i]))] for i in range(len(mask))]


def whiten_tokens(values, mask):
    """loop_whiten over the valid entries of a [N][T] list, 0 elsewhere."""
    flat = [values[i][t] for i in range(len(mask)) for t in range(len(mask[i])) if mask[i][t]]
    w = iter(loop_whiten(flat))
    return [[next(w) if mask[i][t] else 0.0 for t in range(len(mask[i]))] for i in range(len(mask))]


def loop_discounted(rewards, mask, gamma):
    out = []
    for r_row, m_row in zip(rewards, mask):
        row, G = [0.0] * len(r_row), 0.0
        for t in reversed(range(len(r_row))):
            if m_row[t]:
                G = r_row[t] + gamma * G
                row[t] = G
        out.append(row)
    return out


def loop_gae(rewards, values, mask, gamma, lam, bootstrap=None):
    adv, ret = [], []
    for i, (r_row, v_row, m_row) in enumerate(zip(rewards, values, mask)):
        a_row, g_row = [0.0] * len(r_row), [0.0] * len(r_row)
        next_v = 0.0 if bootstrap is None else bootstrap[i]
        next_a = 0.0
        for t in reversed(range(len(r_row))):
            if not m_row[t]:
                continue
            delta = r_row[t] + gamma * next_v - v_row[t]
            a = delta + gamma * lam * next_a
            a_row[t], g_row[t] = a, a + v_row[t]
            next_v, next_a = v_row[t], a
        adv.append(a_row)
        ret.append(g_row)
    return adv, ret


def last_token_rewards(R, mask):
    out = []
    for r, m_row in zip(R, mask):
        row = [0.0] * len(m_row)
        valid = [t for t in range(len(m_row)) if m_row[t]]
        if valid:
            row[valid[-1]] = r
        out.append(row)
    return out


def T(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def check(ours, expected):
    torch.testing.assert_close(ours, torch.as_tensor(expected, dtype=ours.dtype), **TOL)


# ----------------------------------------------------------------------------------------------
# hypothesis strategies: group layouts
# ----------------------------------------------------------------------------------------------


@st.composite
def layouts(draw, min_rows=1, max_rows=12, min_group=1):
    """(rewards [N] floats, ids [N] ints in any order): singletons, one giant group, zero-variance
    groups (rewards drawn from {0, 1} or repeated), arbitrary (negative, sparse) id values."""
    kind = draw(st.sampled_from(["random", "giant", "singletons", "fixed"]))
    n = draw(st.integers(max(min_rows, 2 if min_group > 1 else 1), max_rows))
    if kind == "giant":
        sizes = [n]
    elif kind == "singletons" and min_group == 1:
        sizes = [1] * n
    elif kind == "fixed":
        size = draw(st.integers(max(min_group, 1), n))
        sizes = [size] * (n // size)
        n = sum(sizes)
    else:
        sizes, left = [], n
        while left:
            s = min(draw(st.integers(min_group, max(min_group, 5))), left)
            if 0 < left - s < min_group:
                s = left
            sizes.append(s)
            left -= s
    labels = draw(st.lists(st.integers(-10**6, 10**6), min_size=len(sizes), max_size=len(sizes), unique=True))
    ids = [labels[g] for g, s in enumerate(sizes) for _ in range(s)]
    ids = draw(st.permutations(ids))
    values = draw(st.sampled_from(["floats", "binary"]))
    if values == "binary":
        R = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    else:
        R = draw(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=n, max_size=n))
    return R, list(ids)


def masks(draw, n, t_max=5):
    T_ = draw(st.integers(1, t_max))
    return [[bool(draw(st.booleans())) for _ in range(T_)] for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# group estimators
# ----------------------------------------------------------------------------------------------


@HYP
@given(layout=layouts(), estimator=st.sampled_from(["grpo", "rloo", "gpg"]),
       scale=st.sampled_from(["group", "batch", "none"]), singleton=st.sampled_from(["verl", "zero"]),
       eps=st.sampled_from([1e-6, 1e-4]))
def test_group_estimators_match_loop(layout, estimator, scale, singleton, eps):
    R, ids = layout
    if estimator != "grpo" and scale == "batch":
        scale = "group"
    ours = fusedrl.group_advantages(
        T(R), T(ids, torch.int64), estimator=estimator, scale=scale, eps=eps, singleton=singleton
    )
    check(ours, loop_group(R, ids, estimator, scale, eps, singleton))
    assert torch.isfinite(ours).all()


@HYP
@given(layout=layouts(), data=st.data(), singleton=st.sampled_from(["verl", "zero"]))
def test_reinforce_pp_baseline_and_opo_match_loop(layout, data, singleton):
    R, ids = layout
    mask = masks(data.draw, len(R))
    m = T(mask, torch.bool)
    centered = loop_group(R, ids, "reinforce++-baseline", singleton=singleton)
    kw = dict(singleton=singleton)
    ours = fusedrl.group_advantages(T(R), T(ids, torch.int64), estimator="reinforce++-baseline", mask=m, **kw)
    check(ours, whiten_tokens(to_tokens(centered, mask), mask))
    ours = fusedrl.group_advantages(T(R), T(ids, torch.int64), estimator="reinforce_plus_plus_baseline", **kw)
    check(ours, loop_whiten(centered))
    lengths = [sum(row) for row in mask]
    ours = fusedrl.group_advantages(T(R), T(ids, torch.int64), estimator="opo", mask=m, singleton=singleton)
    check(ours, to_tokens(loop_group(R, ids, "opo", singleton=singleton, lengths=lengths), mask))


@HYP
@given(layout=layouts(min_group=2), scale=st.sampled_from(["group", "batch", "none"]))
def test_grpo_passk_matches_loop(layout, scale):
    R, ids = layout
    ours = fusedrl.group_advantages(T(R), T(ids, torch.int64), estimator="grpo_passk", scale=scale)
    check(ours, loop_group(R, ids, "grpo_passk", scale))
    assert int((ours != 0).sum()) <= len(set(ids))


@HYP
@given(layout=layouts(), data=st.data(), gamma=st.sampled_from([1.0, 0.9, 0.0]))
def test_reinforce_pp_and_remax_match_loop(layout, data, gamma):
    R, _ = layout
    mask = masks(data.draw, len(R))
    m = T(mask, torch.bool)
    ours = fusedrl.group_advantages(T(R), estimator="reinforce++", mask=m, gamma=gamma)
    check(ours, whiten_tokens(loop_discounted(last_token_rewards(R, mask), mask, gamma), mask))
    check(fusedrl.group_advantages(T(R), estimator="reinforce_plus_plus"), loop_whiten(R))
    b = [0.5 * r - 1 for r in R]
    check(fusedrl.group_advantages(T(R), estimator="remax", baseline=T(b), mask=m),
          to_tokens([r - x for r, x in zip(R, b)], mask))
    check(fusedrl.group_advantages(T(R), estimator="remax", baseline=T(b)), [r - x for r, x in zip(R, b)])


def test_grpo_hand_values():
    """A small case computed by hand: group {1, 0, 1} (mean 2/3, std 1/sqrt(3)), a singleton, and a
    zero-variance pair."""
    R = T([1.0, 0.0, 1.0, 5.0, 2.0, 2.0])
    ids = T([7, 7, 7, -1, 3, 3], torch.int64)
    s = 1 / math.sqrt(3)
    expected = [(1 / 3) / (s + 1e-6), (-2 / 3) / (s + 1e-6), (1 / 3) / (s + 1e-6), 5 / (1 + 1e-6), 0.0, 0.0]
    check(fusedrl.group_advantages(R, ids), expected)
    check(fusedrl.group_advantages(R, ids, singleton="zero"), expected[:3] + [0.0, 0.0, 0.0])
    check(fusedrl.group_advantages(R, ids, scale="none"), [1 / 3, -2 / 3, 1 / 3, 5.0, 0.0, 0.0])
    check(fusedrl.group_advantages(R, ids, estimator="rloo"), [0.5, -1.0, 0.5, 5.0, 0.0, 0.0])


# ----------------------------------------------------------------------------------------------
# layouts and invariances
# ----------------------------------------------------------------------------------------------

ESTIMATORS = ["grpo", "rloo", "reinforce++-baseline", "opo", "gpg"]


@HYP
@given(layout=layouts(), data=st.data(), estimator=st.sampled_from(ESTIMATORS))
def test_permutation_and_relabelling_invariance(layout, data, estimator):
    R, ids = layout
    mask = T(masks(data.draw, len(R)), torch.bool)
    kw = dict(estimator=estimator, mask=mask)
    base = fusedrl.group_advantages(T(R), T(ids, torch.int64), **kw)
    perm = torch.tensor(data.draw(st.permutations(list(range(len(R))))), dtype=torch.int64)
    permuted = fusedrl.group_advantages(T(R)[perm], T(ids, torch.int64)[perm], estimator=estimator, mask=mask[perm])
    torch.testing.assert_close(permuted, base[perm], rtol=1e-9, atol=1e-9)
    relabel = {g: data.draw(st.integers(-2**40, 2**40)) for g in set(ids)}
    if len(set(relabel.values())) == len(relabel):
        relabelled = fusedrl.group_advantages(T(R), T([relabel[g] for g in ids], torch.int64), **kw)
        torch.testing.assert_close(relabelled, base, rtol=0, atol=0)


@HYP
@given(size=st.integers(1, 5), groups=st.integers(1, 4), data=st.data(), estimator=st.sampled_from(ESTIMATORS))
def test_group_size_layout_equals_group_ids(size, groups, data, estimator):
    N = size * groups
    R = T(data.draw(st.lists(st.floats(-3, 3, width=32), min_size=N, max_size=N)))
    mask = torch.ones(N, 3, dtype=torch.bool)
    by_size = fusedrl.group_advantages(R, group_size=size, estimator=estimator, mask=mask)
    by_ids = fusedrl.group_advantages(R, torch.arange(N) // size, estimator=estimator, mask=mask)
    # the same numbers up to rounding: the CPU kernel sums a run of rows and a keyed group in
    # different orders (float64 here: 1e-12)
    torch.testing.assert_close(by_size, by_ids, rtol=1e-12, atol=1e-12)


@HYP
@given(layout=layouts(), value=st.floats(-100, 100, width=32),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       scale=st.sampled_from(["group", "batch", "none"]))
def test_zero_variance_groups_give_exact_zeros(layout, value, dtype, scale):
    """A group whose rewards are all equal has centred rewards of exactly 0 (any value, any dtype),
    so its grpo / rloo advantages are exactly 0 -- not a rounding residue divided by eps."""
    R, ids = layout
    target = ids[0]
    R = [value if g == target else r for r, g in zip(R, ids)]
    rows = torch.tensor([g == target for g in ids])
    for estimator in ("grpo", "rloo"):
        out = fusedrl.group_advantages(T(R, dtype), T(ids, torch.int64), estimator=estimator,
                                       scale=scale if estimator == "grpo" else "group", singleton="zero")
        assert torch.isfinite(out).all()
        assert bool((out[rows] == 0).all()), out[rows]


def test_zero_variance_float32_residue_free():
    """0.1 repeated 7 times in float32: torch.mean leaves a residue; fusedrl's shifted mean does not."""
    R = torch.full((7,), 0.1, dtype=torch.float32)
    assert bool((fusedrl.group_advantages(R, group_size=7) == 0).all())
    assert bool((fusedrl.group_advantages(R * 3.3, group_size=7, eps=1e-8) == 0).all())


@HYP
@given(data=st.data(), prompts=st.integers(1, 3), budgets=st.integers(1, 3), size=st.integers(1, 3))
def test_nested_subgroup_ids(data, prompts, budgets, size):
    """Nested groups (seed HBPO budget subgroups): passing subgroup ids = prompt * B + budget equals
    computing each subgroup on its own."""
    N = prompts * budgets * size
    R = data.draw(st.lists(st.floats(-3, 3, width=32), min_size=N, max_size=N))
    prompt = [i // (budgets * size) for i in range(N)]
    budget = [(i // size) % budgets for i in range(N)]
    sub = [p * budgets + b for p, b in zip(prompt, budget)]
    perm = data.draw(st.permutations(list(range(N))))
    Rp, subp = [R[i] for i in perm], [sub[i] for i in perm]
    ours = fusedrl.group_advantages(T(Rp), T(subp, torch.int64))
    for s in set(subp):
        rows = [i for i, g in enumerate(subp) if g == s]
        alone = fusedrl.group_advantages(T([Rp[i] for i in rows]), group_size=len(rows))
        torch.testing.assert_close(ours[rows], alone, **TOL)


def test_empty_batch_and_fully_masked_rows():
    out = fusedrl.group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0,)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    R = T([1.0, 2.0, 3.0, 4.0])
    ids = T([0, 0, 1, 1], torch.int64)
    for est in ("grpo", "rloo", "opo", "reinforce++-baseline", "reinforce++", "gpg"):
        out = fusedrl.group_advantages(R, ids, estimator=est, mask=mask)
        assert torch.isfinite(out).all() and bool((out[mask == 0] == 0).all())
    # opo: a group whose rows are all empty has baseline 0 (verl: 0/0)
    out = fusedrl.group_advantages(R, ids, estimator="opo", mask=torch.zeros(4, 3))
    assert bool((out == 0).all())
    one_row = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    out = fusedrl.group_advantages(R, ids, estimator="opo", mask=one_row)
    check(out[:, 0], [1 - 1.0, 0, 0, 0])


def test_dtypes_and_extremes():
    R = torch.tensor([1e4, -1e4, 3.0, 3.0, 5.0])
    ids = torch.tensor([0, 0, 1, 1, 2])
    for dtype, out_dtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.float16, torch.float32), (torch.float64, torch.float64)]:
        out = fusedrl.group_advantages(R.to(dtype), ids)
        assert out.dtype == out_dtype and torch.isfinite(out).all()
    r = torch.ones(3, requires_grad=True)
    assert not fusedrl.group_advantages(r, group_size=3).requires_grad


def test_backend_choice():
    R = T([1.0, 2.0, 4.0])
    default = fusedrl.group_advantages(R, group_size=3)
    torch.testing.assert_close(fusedrl.group_advantages(R, group_size=3, backend="torch"), default)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from fusedrl import dispatch  # noqa: PLC0415

        dispatch._reported.clear()
        out = fusedrl.group_advantages(R, group_size=3, backend="cpu")  # the segment-statistics kernel
    assert not any("declined" in str(w.message) for w in caught)
    torch.testing.assert_close(out, fusedrl.group_advantages(R, group_size=3))
    with pytest.raises(ValueError, match="backend"):
        fusedrl.group_advantages(R, group_size=3, backend="gpu")


# ----------------------------------------------------------------------------------------------
# multi-objective combines
# ----------------------------------------------------------------------------------------------


def loop_scalarize(Rk, combine, w, ideal=None, var_coef=1.0):
    out = []
    for row in Rk:
        if combine == "sum_then_normalize":
            out.append(sum(wk * r for wk, r in zip(w, row)))
        elif combine == "chebyshev":
            out.append(-max(wk * abs(z - r) for wk, z, r in zip(w, ideal, row)))
        elif combine == "min":
            out.append(min(wk * r for wk, r in zip(w, row)))
        elif combine == "mean_minus_var":
            m = [wk * r for wk, r in zip(w, row)]
            mean = sum(m) / len(m)
            out.append(mean - var_coef * sum((x - mean) ** 2 for x in m) / len(m))
    return out


@HYP
@given(layout=layouts(min_rows=1), K=st.integers(1, 4), data=st.data(),
       combine=st.sampled_from(["sum_then_normalize", "chebyshev", "min", "mean_minus_var"]),
       estimator=st.sampled_from(["grpo", "rloo"]))
def test_scalarizing_combines(layout, K, data, combine, estimator):
    _, ids = layout
    N = len(ids)
    Rk = [data.draw(st.lists(st.floats(-3, 3, width=32), min_size=K, max_size=K)) for _ in range(N)]
    w = data.draw(st.lists(st.floats(0.125, 2, width=32), min_size=K, max_size=K))
    ideal = data.draw(st.lists(st.floats(-3, 3, width=32), min_size=K, max_size=K)) if combine == "chebyshev" else None
    var_coef = data.draw(st.sampled_from([0.0, 0.5, 2.0]))
    R = loop_scalarize(Rk, combine, w, ideal, var_coef)
    ours = fusedrl.group_advantages(T(Rk).reshape(N, K), T(ids, torch.int64), estimator=estimator, combine=combine,
                                    weights=w, ideal=ideal, var_coef=var_coef)
    check(ours, loop_group(R, ids, estimator))


def test_combine_hand_values():
    Rk = T([[1.0, 4.0], [3.0, 0.0]])
    ids = T([0, 1], torch.int64)  # singletons: grpo gives R / (1 + eps), so the scalarized R shows
    f = 1 / (1 + 1e-6)
    check(fusedrl.group_advantages(Rk, ids, combine="min"), [1 * f, 0 * f])
    cheb = fusedrl.group_advantages(Rk, ids, combine="chebyshev", ideal=[4.0, 4.0], weights=[1.0, 0.5])
    check(cheb, [-3 * f, -2 * f])
    # mean_minus_var: members (1, 4): mean 2.5, population var 2.25
    check(fusedrl.group_advantages(Rk, ids, combine="mean_minus_var", var_coef=2.0), [(2.5 - 4.5) * f, (1.5 - 4.5) * f])
    summed = fusedrl.group_advantages(Rk, ids, combine="sum_then_normalize", weights=torch.tensor([2.0, 1.0]))
    check(summed, [6 * f, 6 * f])


@HYP
@given(layout=layouts(min_rows=1), K=st.integers(1, 3), data=st.data(), eps=st.sampled_from([1e-6, 1e-4]),
       singleton=st.sampled_from(["verl", "zero"]))
def test_normalize_then_sum(layout, K, data, eps, singleton):
    """GDPO: grpo per objective, weighted sum, batch normalization -- TRL's (S - mean)/(std + eps)
    over rows without a mask, verl's whitening over valid tokens with one."""
    _, ids = layout
    N = len(ids)
    Rk = [data.draw(st.lists(st.sampled_from([0.0, 1.0, 0.5, -2.0]), min_size=K, max_size=K)) for _ in range(N)]
    w = data.draw(st.lists(st.floats(0.125, 2, width=32), min_size=K, max_size=K))
    per = [loop_group([row[k] for row in Rk], ids, "grpo", eps=eps, singleton=singleton) for k in range(K)]
    S = [sum(w[k] * per[k][i] for k in range(K)) for i in range(N)]
    kw = dict(combine="normalize_then_sum", weights=w, eps=eps, singleton=singleton)
    check(fusedrl.group_advantages(T(Rk).reshape(N, K), T(ids, torch.int64), **kw), loop_batch_normalize(S, eps))
    mask = masks(data.draw, N)
    ours = fusedrl.group_advantages(T(Rk).reshape(N, K), T(ids, torch.int64), mask=T(mask, torch.bool), **kw)
    check(ours, whiten_tokens(to_tokens(S, mask), mask))


# ----------------------------------------------------------------------------------------------
# F-GRPO phases and MatchTIR segments
# ----------------------------------------------------------------------------------------------


@HYP
@given(layout=layouts(), P=st.integers(1, 3), data=st.data(), estimator=st.sampled_from(["grpo", "rloo"]),
       scale=st.sampled_from(["group", "none"]), singleton=st.sampled_from(["verl", "zero"]))
def test_phase_advantages(layout, P, data, estimator, scale, singleton):
    _, ids = layout
    N = len(ids)
    Rp = [data.draw(st.lists(st.floats(-3, 3, width=32), min_size=P, max_size=P)) for _ in range(N)]
    mask = masks(data.draw, N)
    Tn = len(mask[0])
    phase = [[data.draw(st.integers(0, P - 1)) if mask[i][t] else data.draw(st.integers(-5, 9)) for t in range(Tn)]
             for i in range(N)]
    per = [loop_group([row[p] for row in Rp], ids, estimator, scale, singleton=singleton) for p in range(P)]
    expected = [[per[phase[i][t]][i] if mask[i][t] else 0.0 for t in range(Tn)] for i in range(N)]
    ours = fusedrl.phase_advantages(T(Rp).reshape(N, P), T(phase, torch.int64), T(ids, torch.int64),
                                    mask=T(mask, torch.bool), estimator=estimator, scale=scale, singleton=singleton)
    check(ours, expected)


def test_phase_hand_values():
    """Two completions of one prompt, two phases (e.g. reasoning, answer): each phase normalized
    separately, tokens take their phase's advantage."""
    Rp = T([[1.0, 0.0], [0.0, 0.0]])
    phase = T([[0, 0, 1], [0, 1, 1]], torch.int64)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # (1 - mean) / (std + eps), std of {1, 0} = sqrt(1/2)
    out = fusedrl.phase_advantages(Rp, phase, group_size=2)
    check(out, [[a, a, 0.0], [-a, 0.0, 0.0]])


@HYP
@given(layout=layouts(), S=st.integers(1, 3), data=st.data(), lam=st.sampled_from([0.0, 0.5, 1.0]),
       estimator=st.sampled_from(["grpo", "rloo"]), singleton=st.sampled_from(["verl", "zero"]))
def test_segment_advantages(layout, S, data, lam, estimator, singleton):
    R, ids = layout
    N = len(ids)
    seg_r = [data.draw(st.lists(st.floats(-3, 3, width=32), min_size=S, max_size=S)) for _ in range(N)]
    mask = masks(data.draw, N)
    Tn = len(mask[0])
    seg = [[data.draw(st.integers(-1, S - 1)) if mask[i][t] else data.draw(st.integers(-9, 9)) for t in range(Tn)]
           for i in range(N)]
    traj = loop_group(R, ids, estimator, singleton=singleton)
    # existing segments, grouped by the group of their row
    exists = sorted({(i, seg[i][t]) for i in range(N) for t in range(Tn) if mask[i][t] and seg[i][t] >= 0})
    seg_adv = dict(zip(exists, loop_group([seg_r[i][s] for i, s in exists], [ids[i] for i, _ in exists], estimator,
                                          singleton=singleton)))
    def token(i, t):
        if not mask[i][t]:
            return 0.0
        return traj[i] + lam * seg_adv[(i, seg[i][t])] if seg[i][t] >= 0 else traj[i]

    expected = [[token(i, t) for t in range(Tn)] for i in range(N)]
    ours = fusedrl.segment_advantages(T(R), T(seg_r).reshape(N, S), T(seg, torch.int64), T(ids, torch.int64),
                                      mask=T(mask, torch.bool), lam=lam, estimator=estimator, singleton=singleton)
    check(ours, expected)


def test_segment_hand_values():
    """One group of two rollouts; row 0 has segments 0 and 1, row 1 has segment 0 only (its
    segment 1 reward is padding and is ignored). Segment sample of the group: {1, 0, 2}."""
    traj = T([1.0, 0.0])
    seg_r = T([[1.0, 0.0], [2.0, 99.0]])
    seg = T([[-1, 0, 0, 1], [-1, 0, 0, 0]], torch.int64)
    a_t = 0.5 / (math.sqrt(0.5) + 1e-6)
    m, s = 1.0, 1.0  # mean and unbiased std of {1, 0, 2}
    a = lambda r: (r - m) / (s + 1e-6)  # noqa: E731
    out = fusedrl.segment_advantages(traj, seg_r, seg, group_size=2, lam=0.5)
    check(out, [[a_t, a_t + 0.5 * a(1), a_t + 0.5 * a(1), a_t + 0.5 * a(0)],
                [-a_t, -a_t + 0.5 * a(2), -a_t + 0.5 * a(2), -a_t + 0.5 * a(2)]])


# ----------------------------------------------------------------------------------------------
# GAE and discounted returns
# ----------------------------------------------------------------------------------------------


@st.composite
def token_batches(draw):
    B = draw(st.integers(1, 4))
    Tn = draw(st.integers(1, 6))
    floats = st.floats(-3, 3, width=32)
    r = [[draw(floats) for _ in range(Tn)] for _ in range(B)]
    v = [[draw(floats) for _ in range(Tn)] for _ in range(B)]
    m = [[draw(st.booleans()) for _ in range(Tn)] for _ in range(B)]
    return r, v, m


@HYP
@given(batch=token_batches(), gamma=st.sampled_from([1.0, 0.99, 0.5, 0.0]), lam=st.sampled_from([1.0, 0.95, 0.0]),
       boot=st.booleans(), whiten=st.booleans(), data=st.data())
def test_gae_matches_loop(batch, gamma, lam, boot, whiten, data):
    r, v, m = batch
    b = [data.draw(st.floats(-3, 3, width=32)) for _ in r] if boot else None
    adv, ret = loop_gae(r, v, m, gamma, lam, b)
    if whiten:
        adv = whiten_tokens(adv, m)
    mask = T(m, torch.bool)
    boot = None if b is None else T(b)
    ours_adv, ours_ret = fusedrl.gae(T(r), T(v), mask, gamma=gamma, lam=lam, bootstrap=boot, whiten=whiten)
    check(ours_adv, adv)
    check(ours_ret, ret)


@HYP
@given(batch=token_batches(), gamma=st.sampled_from([1.0, 0.9, 0.0]))
def test_discounted_returns_match_loop(batch, gamma):
    r, _, m = batch
    check(fusedrl.discounted_returns(T(r), T(m, torch.bool), gamma=gamma), loop_discounted(r, m, gamma))
    # GAE with V = 0 and lambda = 1 is the discounted return
    check(fusedrl.gae(T(r), torch.zeros(len(r), len(r[0]), dtype=torch.float64), T(m, torch.float32), gamma=gamma)[0],
          loop_discounted(r, m, gamma))


def test_gae_hand_values_truncated_bootstrap():
    """Row of 3 valid tokens, then padding; gamma 0.5, lam 1: with bootstrap b the last delta is
    r + gamma b - V (T-PPO); without, r - V."""
    r = T([[0.0, 0.0, 1.0, 0.0]])
    v = T([[0.5, 0.5, 0.5, 7.0]])
    m = T([[1, 1, 1, 0]], torch.int64)
    adv, ret = fusedrl.gae(r, v, m, gamma=0.5, lam=1.0, bootstrap=T([2.0]))
    d2 = 1.0 + 0.5 * 2.0 - 0.5
    d1 = 0.0 + 0.5 * 0.5 - 0.5
    d0 = 0.0 + 0.5 * 0.5 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    check(adv, [[d0 + 0.5 * a1, a1, a2, 0.0]])
    check(ret, [[d0 + 0.5 * a1 + 0.5, a1 + 0.5, a2 + 0.5, 0.0]])
    adv0, _ = fusedrl.gae(r, v, m, gamma=0.5, lam=1.0)
    check(adv0[:, 2], [0.5])


def test_scans_ignore_padding_values():
    """NaN / huge values at masked positions change nothing (padding invariance), and a fully
    masked row is all zeros."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(3, 5, generator=g, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    clean = fusedrl.gae(r, v, m, gamma=0.9, lam=0.9, whiten=True)
    r2, v2 = r.clone(), v.clone()
    r2[~m] = float("nan")
    v2[~m] = 1e30
    dirty = fusedrl.gae(r2, v2, m, gamma=0.9, lam=0.9, whiten=True)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert bool((a[1] == 0).all())
    dirty_returns = fusedrl.discounted_returns(r2, m, gamma=0.9)
    torch.testing.assert_close(dirty_returns, fusedrl.discounted_returns(r, m, gamma=0.9), rtol=0, atol=0)
    assert fusedrl.gae(r.float(), v, m)[0].dtype == torch.float32
    # whitening with at most one valid token: 0 (verl raises)
    one = torch.zeros(3, 5, dtype=torch.bool)
    one[0, 2] = True
    assert bool((fusedrl.gae(r, v, one, whiten=True)[0] == 0).all())


# ----------------------------------------------------------------------------------------------
# the statistics helper
# ----------------------------------------------------------------------------------------------


@HYP
@given(layout=layouts())
def test_group_stats_helper(layout):
    R, ids = layout
    index, G = ref.group_index(len(R), group_ids=T(ids, torch.int64))
    stats = ref.group_stats(T(R).unsqueeze(-1), index, G, singleton="zero")
    for rows in groups_of(ids).values():
        g = int(index[rows[0]])
        vals = [R[i] for i in rows]
        assert int(stats.count[g]) == len(rows)
        assert stats.mean[g, 0].item() == pytest.approx(sum(vals) / len(vals), abs=1e-9)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        assert stats.std[g, 0].item() == pytest.approx(std, abs=1e-9)
        assert stats.max[g, 0].item() == max(vals)
        second = sorted(vals)[-2] if len(vals) > 1 else float("-inf")
        assert stats.second_max[g, 0].item() == second
        assert int(stats.argmax[g, 0]) == min(i for i in rows if R[i] == max(vals))
        for i in rows:
            loo = (sum(vals) - R[i]) / (len(vals) - 1) if len(vals) > 1 else R[i]
            assert stats.loo_mean[i, 0].item() == pytest.approx(loo, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

R4 = torch.tensor([1.0, 2.0, 3.0, 4.0])
IDS4 = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(rewards=[1.0, 2.0]), TypeError, "rewards"),
        (dict(rewards=torch.tensor([1, 2])), TypeError, "rewards"),
        (dict(rewards=torch.zeros(2, 2, 2)), ValueError, "rewards"),
        (dict(rewards=R4), ValueError, "group_ids"),
        (dict(rewards=R4, group_ids=IDS4, group_size=2), ValueError, "group_ids or group_size"),
        (dict(rewards=R4, group_ids=IDS4.float()), TypeError, "group_ids"),
        (dict(rewards=R4, group_ids=IDS4[:3]), ValueError, "group_ids"),
        (dict(rewards=R4, group_size=3), ValueError, "group_size"),
        (dict(rewards=R4, group_size=0), ValueError, "group_size"),
        (dict(rewards=R4, group_size=2.0), TypeError, "group_size"),
        (dict(rewards=R4, group_size=2, estimator="ppo"), ValueError, "estimator"),
        (dict(rewards=R4, group_size=2, scale="token"), ValueError, "scale"),
        (dict(rewards=R4, group_size=2, estimator="rloo", scale="batch"), ValueError, "scale"),
        (dict(rewards=R4, group_size=2, eps=0.0), ValueError, "eps"),
        (dict(rewards=R4, group_size=2, singleton="one"), ValueError, "singleton"),
        (dict(rewards=R4, group_size=2, gamma=1.5), ValueError, "gamma"),
        (dict(rewards=R4, group_size=2, combine="sum_then_normalize"), ValueError, "combine"),
        (dict(rewards=R4.view(4, 1), group_size=2), ValueError, "combine"),
        (dict(rewards=R4.view(2, 2), group_size=2, combine="max"), ValueError, "combine"),
        (dict(rewards=R4.view(2, 2), group_size=2, combine="min", weights=[1.0]), ValueError, "weights"),
        (dict(rewards=R4.view(2, 2), group_size=2, combine="min", weights="ab"), TypeError, "weights"),
        (dict(rewards=R4, group_size=2, weights=[1.0]), ValueError, "weights"),
        (dict(rewards=R4.view(2, 2), group_size=2, combine="chebyshev"), ValueError, "ideal"),
        (dict(rewards=R4.view(2, 2), group_size=2, combine="min", ideal=[1.0, 1.0]), ValueError, "ideal"),
        (dict(rewards=R4.view(2, 2), group_size=2, combine="normalize_then_sum", estimator="rloo"), ValueError,
         "normalize_then_sum"),
        (dict(rewards=R4, group_size=2, estimator="opo"), ValueError, "mask"),
        (dict(rewards=R4, group_size=2, mask=torch.ones(3, 2)), ValueError, "mask"),
        (dict(rewards=R4, group_size=2, mask=[[1]]), TypeError, "mask"),
        (dict(rewards=R4, estimator="remax"), ValueError, "baseline"),
        (dict(rewards=R4, estimator="remax", baseline=torch.zeros(3)), ValueError, "baseline"),
        (dict(rewards=R4, group_size=2, baseline=torch.zeros(4)), ValueError, "baseline"),
        (dict(rewards=R4, group_ids=torch.tensor([0, 0, 0, 1]), estimator="grpo_passk"), ValueError, "at least 2"),
        (dict(rewards=R4, group_size=2, var_coef=float("nan")), ValueError, "var_coef"),
    ],
)
def test_group_advantages_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fusedrl.group_advantages(**kwargs)


def test_other_functions_bad_input():
    Rp = torch.zeros(4, 2)
    ph = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="rewards"):
        fusedrl.phase_advantages(torch.zeros(4), ph, group_size=2)
    with pytest.raises(ValueError, match="phase_ids"):
        fusedrl.phase_advantages(Rp, ph + 2, group_size=2)
    with pytest.raises(TypeError, match="phase_ids"):
        fusedrl.phase_advantages(Rp, ph.float(), group_size=2)
    with pytest.raises(ValueError, match="mask"):
        fusedrl.phase_advantages(Rp, ph, group_size=2, mask=torch.ones(4, 2))
    with pytest.raises(ValueError, match="estimator"):
        fusedrl.phase_advantages(Rp, ph, group_size=2, estimator="opo")
    fusedrl.phase_advantages(Rp, ph + 2, group_size=2, mask=torch.zeros(4, 3))  # ids at masked tokens are free
    seg = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="segment_ids"):
        fusedrl.segment_advantages(torch.zeros(4), Rp, seg - 2, group_size=2)
    with pytest.raises(ValueError, match="segment_rewards"):
        fusedrl.segment_advantages(torch.zeros(4), torch.zeros(3, 2), seg, group_size=2)
    with pytest.raises(ValueError, match="trajectory_rewards"):
        fusedrl.segment_advantages(Rp, Rp, seg, group_size=2)
    with pytest.raises(ValueError, match="lam"):
        fusedrl.segment_advantages(torch.zeros(4), Rp, seg, group_size=2, lam=float("inf"))
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="values"):
        fusedrl.gae(r, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        fusedrl.gae(r, r, torch.ones(2, 4))
    with pytest.raises(ValueError, match="bootstrap"):
        fusedrl.gae(r, r, torch.ones(2, 3), bootstrap=torch.zeros(3))
    with pytest.raises(ValueError, match="lam"):
        fusedrl.gae(r, r, torch.ones(2, 3), lam=-0.1)
    with pytest.raises(TypeError, match="whiten"):
        fusedrl.gae(r, r, torch.ones(2, 3), whiten=1)
    with pytest.raises(ValueError, match="rewards"):
        fusedrl.discounted_returns(torch.zeros(3), torch.ones(3))
    with pytest.raises(TypeError, match="gamma"):
        fusedrl.discounted_returns(r, torch.ones(2, 3), gamma="1")
