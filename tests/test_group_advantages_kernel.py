"""The one-call CPU kernel of group_advantages (fusedrl::group_advantages: densify, statistics,
estimator, combine and batch finish fused) against the float64 gold (the reference composition on
float64 rewards), over hypothesis layouts (shuffled raw ids in a small range and in a wide one, so
both the byte map and the hash densify run; int32 and strided ids; singletons, one giant group,
fixed-size groups, zero-variance groups), every estimator it serves, every scale, both singleton
rules, every combine, and the dtypes; determinism (repeats, 1 vs 2 threads); which configurations
it declines; the custom op."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedrl
from fusedrl import advantages as adv_mod
from fusedrl.ops import segments as seg

HYP = settings(max_examples=40, deadline=None)
GROUP_ESTIMATORS = list(seg.ESTIMATOR_CODES)  # grpo, rloo, reinforce++-baseline, grpo_passk, gpg, opo
COMBINES = ["sum_then_normalize", "normalize_then_sum", "chebyshev", "min", "mean_minus_var"]


def close(got, gold, dtype, rewards):
    """fp32 / bf16 inputs: 1e-5 relative to the fp64 gold on the same rounded inputs (absolute
    floor scaled by the advantages' size); fp64: 1e-10."""
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    scale = max(1.0, float(gold.abs().max())) if gold.numel() else 1.0
    torch.testing.assert_close(got.double(), gold, rtol=tol, atol=tol * scale)


@st.composite
def layouts(draw, max_rows=48):
    """(ids or None, group_size or None, N): raw ids in any order, possibly far apart."""
    kind = draw(st.sampled_from(["random", "wide", "giant", "singletons", "fixed", "pairs"]))
    n = draw(st.integers(1, max_rows))
    if kind == "fixed":
        size = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
        return None, size, n
    if kind == "giant":
        ids = [draw(st.integers(-(2**40), 2**40))] * n
    elif kind == "singletons":
        ids = draw(st.permutations(list(range(n))))
    elif kind == "pairs":  # every group of >= 2 rows (grpo_passk)
        n = max(2, n - n % 2)
        ids = draw(st.permutations([r // 2 for r in range(n)]))
    else:
        G = draw(st.integers(1, n))
        labels = draw(st.lists(st.integers(0, G - 1), min_size=n, max_size=n))
        if kind == "wide":  # ids spread over int64: the hash densify
            spread = draw(st.lists(st.integers(-(2**62), 2**62), min_size=G, max_size=G, unique=True))
            labels = [spread[i] for i in labels]
        else:
            labels = [7 * i - 3 for i in labels]
        ids = labels
    return torch.tensor(ids, dtype=torch.int64), None, n


@st.composite
def rewards(draw, n, K):
    kind = draw(st.sampled_from(["floats", "binary", "constant"]))
    if kind == "binary":
        vals = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n * K, max_size=n * K))
    elif kind == "constant":  # zero-variance groups everywhere
        vals = [draw(st.floats(-100, 100, allow_nan=False, width=32))] * (n * K)
    else:
        vals = draw(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=n * K, max_size=n * K))
    return torch.tensor(vals, dtype=torch.float64).reshape(n, K)


def _run(R, ids, size, dtype, ids_form, **kw):
    layout = dict(group_size=size) if ids is None else dict(group_ids=ids)
    if ids is not None and ids_form == "int32" and bool((ids.abs() < 2**31).all()):
        layout = dict(group_ids=ids.to(torch.int32))
    elif ids is not None and ids_form == "strided":
        layout = dict(group_ids=torch.stack([ids, ids], 1)[:, 1])
    x = R.to(dtype)
    gold_kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    got = fusedrl.group_advantages(x, **layout, backend="cpu", **kw)
    gold = fusedrl.group_advantages(x.double(), **layout, backend="torch", **gold_kw)
    return got, gold, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@HYP
@given(data=st.data(), estimator=st.sampled_from(GROUP_ESTIMATORS), scale=st.sampled_from(["group", "batch", "none"]),
       singleton=st.sampled_from(["verl", "zero"]), ids_form=st.sampled_from(["int64", "int32", "strided"]),
       masked=st.booleans())
def test_one_objective_matches_gold(dtype, data, estimator, scale, singleton, ids_form, masked):
    ids, size, n = data.draw(layouts())
    if estimator == "grpo_passk":  # every group needs >= 2 rows: shuffled groups of 2 to 4
        sizes = data.draw(st.lists(st.integers(2, 4), min_size=1, max_size=12))
        labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        ids, size, n = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(len(sizes)))] * 3, None, len(labels)
    if estimator not in ("grpo", "grpo_passk"):
        scale = data.draw(st.sampled_from(["group", "none"]))
    R = data.draw(rewards(n, 1))[:, 0]
    kw = dict(estimator=estimator, scale=scale, singleton=singleton)
    if masked or estimator == "opo":
        g = torch.Generator().manual_seed(n)
        kw["mask"] = torch.rand(n, 3, generator=g) > 0.4
        if estimator == "reinforce++-baseline":
            del kw["mask"]  # with a mask it whitens over tokens: the composition (tested below)
    got, gold, x = _run(R, ids, size, dtype, ids_form, **kw)
    close(got, gold, dtype, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@HYP
@given(data=st.data(), combine=st.sampled_from(COMBINES), K=st.integers(1, 6), scale=st.sampled_from(["group", "batch", "none"]),
       singleton=st.sampled_from(["verl", "zero"]), estimator=st.sampled_from(["grpo", "rloo", "gpg"]))
def test_combines_match_gold(dtype, data, combine, K, scale, singleton, estimator):
    ids, size, n = data.draw(layouts())
    if combine == "normalize_then_sum":
        estimator = "grpo"
    if estimator != "grpo":
        scale = "group"
    R = data.draw(rewards(n, K))
    weights = data.draw(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=K, max_size=K))
    kw = dict(estimator=estimator, scale=scale, singleton=singleton, combine=combine, weights=weights)
    if combine == "chebyshev":
        kw["ideal"] = data.draw(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=K, max_size=K))
    got, gold, x = _run(R, ids, size, dtype, "int64", **kw)
    close(got, gold, dtype, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K", [4, 5, 9])
@pytest.mark.parametrize("size", [4, 8, 16, 6])
def test_block_paths_match_gold(dtype, K, size):
    """The kernel's 4-wide paths and their edges: runs of a multiple of 4 rows taken 4 runs at a
    time (contiguous loads, one transpose of the sums; 9 runs: 2 blocks and a last run alone; runs
    of 6: the gathering path), zero-variance and single-valued runs among them; rows of K
    contiguous objectives read 4 rows x 4 columns at a time and transposed (K = 5, 9: the columns
    after the last 4 one by one), in a wider tensor (row stride K + 3), 9 * size rows (not always
    a multiple of 4: the last rows one by one), shuffled ids too; against the float64 gold."""
    g = torch.Generator().manual_seed(K * 100 + size)
    N = 9 * size
    wide = torch.randn(N, K + 3, generator=g, dtype=torch.float64) * 3
    wide[:size] = 1.5  # a zero-variance run
    wide[size : 2 * size, 0] = torch.arange(size, dtype=torch.float64)
    R = wide[:, :K]
    weights = torch.linspace(-1.0, 2.0, K).tolist()
    ids = torch.arange(N) // size
    ids = ids[torch.randperm(N, generator=g)] * 5 + 2
    for layout in (dict(group_size=size), dict(group_ids=ids)):
        for kw in (
            dict(),  # one column (R[:, 0], strided)
            dict(combine="sum_then_normalize", weights=weights),
            dict(combine="normalize_then_sum", weights=weights),
            dict(combine="min", weights=weights),
            dict(combine="sum_then_normalize", scale="batch"),
        ):
            x = (R if kw else R[:, 0]).to(dtype)
            got = fusedrl.group_advantages(x, **layout, backend="cpu", **kw)
            gold = fusedrl.group_advantages(x.double(), **layout, backend="torch", **kw)
            close(got, gold, dtype, x)
            if layout.get("group_size") and not kw:
                assert torch.equal(got[:size], torch.zeros(size, dtype=got.dtype))  # exact zeros


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
@pytest.mark.parametrize("layout", ["runs", "direct", "hashed", "int32"])
def test_many_rows_match_gold(estimator, layout):
    """70,000 rows: the keyed layout runs over several slices of rows (groups straddling them are
    combined), the runs layout over groups of 13 (not a multiple of the 4 lanes); float32 rewards
    offset by 1000 (the keyed sums are shifted by a group value: no cancellation to speak of),
    float64 gold to 1e-5, every estimator, 2 threads."""
    g = torch.Generator().manual_seed(7)
    N, size = 70_005, 13
    R = 1000 + (torch.rand(N, generator=g) > 0.6).float() + 0.01 * torch.randn(N, generator=g)
    R[torch.arange(0, N, 97)] = 1000.0  # some exact ties with the group max (grpo_passk)
    kw = dict(estimator=estimator)
    if estimator == "opo":
        kw["mask"] = torch.rand(N, 5, generator=g) > 0.3
    sizes = torch.randint(2, 65, (N // 2,), generator=g)
    sizes = sizes[: int((sizes.cumsum(0) < N).sum())]
    labels = torch.repeat_interleave(torch.arange(len(sizes) + 1), torch.cat([sizes, (N - sizes.sum()).view(1)]))
    labels = labels[torch.randperm(N, generator=g)]
    layout = {
        "runs": dict(group_size=size),
        "direct": dict(group_ids=labels * 3 - 5),
        "hashed": dict(group_ids=labels * 1_000_003 + 2**40),
        "int32": dict(group_ids=(labels * 3).to(torch.int32)),
    }[layout]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = fusedrl.group_advantages(R, **layout, backend="cpu", **kw)
    finally:
        torch.set_num_threads(before)
    gold = fusedrl.group_advantages(R.double(), **layout, backend="torch", **kw)
    close(got, gold, torch.float32, R)


def test_many_rows_threads_agree_bitwise():
    """70,005 rows (9 chunks of the batch finish's moments, 3 slices of the keyed sums): the batch
    whitening / normalization and normalize_then_sum give the same bits on 1 and 2 threads."""
    g = torch.Generator().manual_seed(11)
    N = 70_005
    R = torch.rand(N, 4, generator=g) * 3
    ids = torch.randint(0, 3000, (N,), generator=g) * 7
    calls = [
        lambda: fusedrl.group_advantages(R[:, 0], ids, estimator="reinforce++-baseline", backend="cpu"),
        lambda: fusedrl.group_advantages(R, ids, combine="normalize_then_sum", backend="cpu"),
        lambda: fusedrl.group_advantages(R, group_size=5, combine="normalize_then_sum", backend="cpu"),
    ]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [f() for f in calls]
        torch.set_num_threads(2)
        two = [f() for f in calls]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
        assert bool(torch.isfinite(a).all())


def test_keyed_sums_keep_precision_in_float64():
    """float64 rewards 1e8 apart in scale within a group, shuffled ids: the keyed path (one pass of
    sums shifted by a group value) against the reference's two-pass moments to 1e-10."""
    g = torch.Generator().manual_seed(3)
    N = 40_000
    R = torch.randn(N, generator=g, dtype=torch.float64) * torch.tensor([1e-4, 1.0, 1e4], dtype=torch.float64)[
        torch.randint(0, 3, (N,), generator=g)] + 1e4
    ids = torch.randint(0, 500, (N,), generator=g)
    for estimator in ("grpo", "rloo"):
        got = fusedrl.group_advantages(R, ids, estimator=estimator, backend="cpu")
        gold = fusedrl.group_advantages(R, ids, estimator=estimator, backend="torch")
        close(got, gold, torch.float64, R)


@pytest.mark.parametrize(
    "id_dtype,lo",
    [(torch.int64, lo) for lo in (-(2**63), -(2**31) - 3, -5, 0, 2**32 - 20, 2**63 - 71)]
    + [(torch.int32, lo) for lo in (-(2**31), -5, 0, 2**31 - 71)],
)
def test_byte_map_numbering_every_span(id_dtype, lo):
    """Ids spanning 1 to 70 values (the byte map numbers them 8 at a time: every span modulo 8 and
    across word boundaries), holes in the span, both ends present, at the ends of int64 and int32
    too, and across a multiple of 2^32 (int64 ids are keyed by their low 32 bits, offsets taken
    modulo 2^32): each group's rows are found (against the float64 gold on the ids shifted to
    start at 0), and the numbering does not depend on where the span starts."""
    g = torch.Generator().manual_seed(11)
    for span in range(1, 71):
        present = torch.rand(span, generator=g) < 0.6
        present[0] = present[-1] = True
        values = torch.nonzero(present).flatten()
        n = 3 * len(values) + 5
        pick = torch.cat([values, values[torch.randint(0, len(values), (n - len(values),), generator=g)]])
        pick = pick[torch.randperm(n, generator=g)]
        R = torch.randn(n, generator=g)
        ids = (pick + lo).to(id_dtype)  # int64 wraps only at the top end
        got = fusedrl.group_advantages(R, ids, backend="cpu")
        gold = fusedrl.group_advantages(R.double(), pick, backend="torch")
        close(got, gold, torch.float32, R)


def test_zero_variance_groups_and_hand_values():
    R = torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 1.0, 5.0])
    ids = torch.tensor([10**15, 10**15, 10**15, -4, -4, -4, 2**62])  # wide: hashed
    out = fusedrl.group_advantages(R, ids, backend="cpu")
    assert torch.equal(out[:3], torch.zeros(3))  # exact zeros, not a residue divided by eps
    # group {1, 0, 1}: mean 2/3, std sqrt(1/3); singleton (verl): 5 / (1 + 1e-6)
    s = (1 / 3) ** 0.5
    expect = torch.tensor([0, 0, 0, (1 / 3) / (s + 1e-6), (-2 / 3) / (s + 1e-6), (1 / 3) / (s + 1e-6), 5 / (1 + 1e-6)])
    torch.testing.assert_close(out, expect.float(), rtol=1e-6, atol=1e-6)
    rloo = fusedrl.group_advantages(R, ids, estimator="rloo", backend="cpu")
    torch.testing.assert_close(rloo[3:6], torch.tensor([0.5, -1.0, 0.5]))


def test_deterministic_repeats_and_threads():
    g = torch.Generator().manual_seed(0)
    N = 70000  # big enough for the kernel to use 2 threads
    R = torch.randn(N, 4, generator=g)
    hashed = torch.randperm(N, generator=g) % 1999 * 1_000_003  # a wide range: hashed
    direct = torch.randperm(N, generator=g) % 1999 * 3  # a small range: the byte map
    mask = torch.rand(N, 2, generator=g) > 0.3
    # runs of 16: 4,375 runs, so the 2-thread split falls inside a block of 4 runs (float64 below,
    # where a last-bit difference between the 4-lane and the single-run paths would show)
    layouts = (dict(group_ids=hashed), dict(group_ids=direct), dict(group_size=16))
    configs = (dict(), dict(combine="normalize_then_sum"), dict(combine="sum_then_normalize", estimator="rloo"),
               dict(estimator="grpo_passk"), dict(estimator="opo", mask=mask), dict(scale="batch"))
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            for layout in layouts:
                for kw in configs:
                    x = R if "combine" in kw else R[:, 0]
                    for dtype in (torch.float32, torch.float64):
                        runs.append((threads, fusedrl.group_advantages(x.to(dtype), **layout, backend="cpu", **kw)))
    finally:
        torch.set_num_threads(before)
    first = [r for t, r in runs if t == 1]
    for t in (2, 2):
        others = [r for tt, r in runs if tt == t]
        for a, b in zip(first, others):
            assert torch.equal(a, b)


def test_declines_and_errors():
    P = adv_mod.GroupAdvantageParams
    mask = torch.ones(4, 2, dtype=torch.bool)
    assert adv_mod._fused_declines(P(estimator="grpo"), mask) is None
    assert adv_mod._fused_declines(P(estimator="reinforce++-baseline"), None) is None
    assert "whitening" in adv_mod._fused_declines(P(estimator="reinforce++-baseline"), mask)
    assert "whitening" in adv_mod._fused_declines(P(combine="normalize_then_sum"), mask)
    assert "no groups" in adv_mod._fused_declines(P(estimator="remax"), None)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fusedrl.group_advantages(torch.rand(5), torch.tensor([1, 1, 2, 2, 3]), estimator="grpo_passk", backend="cpu")
    with pytest.raises(ValueError, match="at least 2 rows"):
        fusedrl.group_advantages(torch.rand(5), group_size=1, estimator="grpo_passk", backend="cpu")
    with pytest.raises(TypeError, match="group_ids"):
        fusedrl.group_advantages(torch.rand(4), torch.rand(4), backend="cpu")
    with pytest.raises(ValueError, match="group_ids must have shape"):
        fusedrl.group_advantages(torch.rand(4), torch.zeros(3, dtype=torch.int64), backend="cpu")
    with pytest.raises(ValueError, match="either group_ids or group_size"):
        fusedrl.group_advantages(torch.rand(4), torch.zeros(4, dtype=torch.int64), group_size=2, backend="cpu")
    with pytest.raises(ValueError, match="must divide"):
        fusedrl.group_advantages(torch.rand(5), group_size=2, backend="cpu")
    empty = fusedrl.group_advantages(torch.rand(0), torch.zeros(0, dtype=torch.int64), backend="cpu")
    assert empty.shape == (0,)


def test_custom_op():
    R = torch.randn(12, 3)
    ids = torch.tensor([5, 1, 2, 5, 1, 2, 5, 1, 2, 9, 9, 9])
    for args in (
        (R[:, 0].contiguous(), ids, 0, None, "grpo", "group", 1e-6, "verl", None, None, [], [], 1.0),
        (R, None, 3, None, "grpo", "batch", 1e-4, "zero", "normalize_then_sum", "batch_normalize", [1.0, 2.0, 0.5], [], 1.0),
        (R[:, 0].contiguous(), ids, 0, torch.rand(12), "opo", "group", 1e-6, "verl", None, None, [], [], 1.0),
    ):
        torch.library.opcheck(seg.GROUP_ADVANTAGES.overload("cpu"), args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_uses_the_op():
    """Eager calls go straight to the registered kernel; under torch.compile the op is traced
    without a graph break and gives the same result."""
    R = torch.randn(12)
    ids = torch.tensor([5, 1, 2, 5, 1, 2, 5, 1, 2, 9, 9, 9])
    f = torch.compile(lambda r, i: fusedrl.group_advantages(r, i, estimator="rloo"), fullgraph=True, backend="aot_eager")
    assert torch.equal(f(R, ids), fusedrl.group_advantages(R, ids, estimator="rloo"))
    g = torch.compile(lambda r: fusedrl.group_advantages(r, group_size=4), fullgraph=True, backend="aot_eager")
    assert torch.equal(g(R), fusedrl.group_advantages(R, group_size=4))
