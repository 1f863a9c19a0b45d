"""Segment statistics (fusedrl::segment_stats) and the advantages built on it: every kernel
backend against the float64 gold (the reference on float64 values), over hypothesis layouts
(shuffled ids, singletons, one giant group, empty groups, zero-variance groups), dtypes, strides,
weights and both singleton rules; the public group / phase / segment advantages through each
backend; determinism (repeats, 1 vs 2 threads); the fixed-size layout; the custom op."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedrl
from fusedrl.ops import segments as seg
from fusedrl.reference import advantages as ref

KERNEL_BACKENDS = ["cpu", "triton"]  # the CUDA kernel is compiled in CI, never run here
HYP = settings(max_examples=25, deadline=None)
INTERPRETED = {"triton"}  # runs in TRITON_INTERPRET=1: fewer and smaller cases


def cases(*axes, keep):
    """The product of the parameter axes (backend first); the interpreted backends keep only the
    combinations ``keep(*combo)`` accepts (time): the CPU kernel runs them all."""
    import itertools  # noqa: PLC0415

    return [c for c in itertools.product(*axes) if c[0] not in INTERPRETED or keep(*c)]
FIELDS = ref.GroupStats._fields


def tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


def assert_stats_close(got, gold, dtype, values):
    """Each field within tol relative to the scale of the values (second max: -inf kept)."""
    scale = max(1.0, float(values.double().abs().max())) if values.numel() else 1.0
    out = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, b in zip(FIELDS, got, gold):
        if name == "argmax":
            assert a.dtype == torch.int64
            assert torch.equal(a, b), name
            continue
        assert a.dtype == out, name
        assert a.shape == b.shape, name
        a, b = a.double(), b.double()
        inf = torch.isinf(b)
        assert torch.equal(torch.isinf(a), inf), name
        assert torch.equal(a[inf], b[inf]), name
        f = ~inf
        s = scale * scale if name == "var" else scale
        torch.testing.assert_close(a[f], b[f], rtol=tol(dtype), atol=tol(dtype) * s, msg=name)


@st.composite
def layouts(draw, max_rows=40):
    kind = draw(st.sampled_from(["random", "giant", "singletons", "fixed", "empty_groups"]))
    n = draw(st.integers(1, max_rows))
    if kind == "giant":
        G, ids = 1, [0] * n
    elif kind == "singletons":
        G, ids = n, draw(st.permutations(list(range(n))))
    elif kind == "fixed":
        size = draw(st.integers(1, n))
        G = n // size
        ids = [r // size for r in range(G * size)]
    else:
        G = draw(st.integers(1, n))
        ids = draw(st.lists(st.integers(0, G - 1), min_size=n, max_size=n))
        if kind == "random":  # dense: every group present
            present = sorted(set(ids))
            G, ids = len(present), [present.index(i) for i in ids]
    n = len(ids)
    C = draw(st.integers(1, 3))
    value_kind = draw(st.sampled_from(["floats", "binary", "constant"]))
    if value_kind == "binary":
        vals = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n * C, max_size=n * C))
    elif value_kind == "constant":
        vals = [draw(st.floats(-100, 100, allow_nan=False, width=32))] * (n * C)
    else:
        vals = draw(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=n * C, max_size=n * C))
    return torch.tensor(vals, dtype=torch.float64).reshape(n, C), torch.tensor(ids, dtype=torch.int64), G


def _group_stats_match_gold(backend, dtype, layout, singleton, weighted, transposed):
    values, index, G = layout
    values = values.to(dtype)
    if transposed:  # non-contiguous values: a column-major [n, C] view
        values = values.t().contiguous().t()
    weight = torch.arange(values.shape[0], dtype=torch.float64) % 3 if weighted else None
    got = seg.group_stats(values, index, G, weight=weight, singleton=singleton, backend=backend)
    gold = ref.group_stats(values.double(), index, G, weight=weight, singleton=singleton)
    assert_stats_close(got, gold, dtype, values)


GOLD_ARGS = dict(singleton=st.sampled_from(["verl", "zero"]), weighted=st.booleans(), transposed=st.booleans())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@HYP
@given(layout=layouts(), **GOLD_ARGS)
def test_group_stats_match_gold_cpu(dtype, layout, singleton, weighted, transposed):
    _group_stats_match_gold("cpu", dtype, layout, singleton, weighted, transposed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@settings(max_examples=4, deadline=None)
@given(layout=layouts(max_rows=8), **GOLD_ARGS)
def test_group_stats_match_gold_triton(dtype, layout, singleton, weighted, transposed):
    _group_stats_match_gold("triton", dtype, layout, singleton, weighted, transposed)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fixed_size_layout_equals_index(backend, dtype):
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(48, 2, generator=g, dtype=torch.float64) * 3).to(dtype)
    values[8:16] = 0.5  # a zero-variance group
    index = torch.arange(48) // 8
    fixed = seg.group_stats(values, None, 6, group_size=8, backend=backend)
    dense = seg.group_stats(values, index, 6, backend=backend)
    for a, b in zip(fixed, dense):
        assert torch.equal(a, b)
    assert_stats_close(fixed, ref.group_stats(values.double(), index, 6), dtype, values)
    centered = values[8:16].float() - fixed.mean[1]
    assert torch.all(centered == 0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_across_threads(backend):
    g = torch.Generator().manual_seed(0)
    M, G = (40000, 997) if backend == "cpu" else (60, 7)  # big enough for the CPU kernel to use 2 threads
    values = torch.randn(M, 2, generator=g) * 100
    index = torch.randperm(M, generator=g) % G
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            runs.append(seg.group_stats(values, index, G, backend=backend))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_custom_op(backend):
    values = torch.randn(12, 2)
    index = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 3])
    args = (values, index, 0, 4, torch.rand(12), "verl", True)
    op = seg.SEGMENT_STATS.overload(backend)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(op, (values, None, 3, 4, None, "zero", False),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# the public functions through each backend
# ----------------------------------------------------------------------------------------------


def public_case(seed, N=24, K=3, T=5):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(N, K, generator=g, dtype=torch.float64).round(decimals=1)
    ids = torch.randint(-5, 5, (N,), generator=g) * 7
    mask = torch.rand(N, T, generator=g) > 0.3
    mask[:, 0] = True
    return R, ids, mask


ESTIMATORS = ["grpo", "rloo", "reinforce++", "reinforce++-baseline", "grpo_passk", "opo", "remax", "gpg"]


@pytest.mark.parametrize(
    "backend,estimator,dtype",
    cases(KERNEL_BACKENDS, ESTIMATORS, [torch.float32, torch.bfloat16], keep=lambda b, e, d: d == torch.float32),
)
def test_group_advantages_every_estimator(backend, estimator, dtype):
    R, ids, mask = public_case(1)
    R = R[:, 0]
    kw = {}
    if estimator == "grpo_passk":
        ids = torch.arange(R.shape[0]) // 4  # >= 2 rows per group
    if estimator in ("opo", "reinforce++", "reinforce++-baseline"):
        kw["mask"] = mask
    if estimator == "remax":
        kw["baseline"] = R.flip(0)
    scales = ["group", "batch", "none"] if estimator in ("grpo", "grpo_passk") else ["group"]
    x = R.to(dtype)
    kw_x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}
    kw_gold = {k: v.double() if v.is_floating_point() else v for k, v in kw_x.items()}  # the same rounded inputs
    for scale in scales:
        for singleton in ("verl", "zero"):
            opts = dict(estimator=estimator, scale=scale, singleton=singleton)
            got = fusedrl.group_advantages(x, ids, **opts, backend=backend, **kw_x)
            gold = fusedrl.group_advantages(x.double(), ids, **opts, backend="torch", **kw_gold)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), gold, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "backend,combine,layout",
    cases(KERNEL_BACKENDS, ["sum_then_normalize", "normalize_then_sum", "chebyshev", "min", "mean_minus_var"],
          ["ids", "size"], keep=lambda b, c, lay: lay == "ids"),
)
def test_group_advantages_every_combine(backend, combine, layout):
    R, ids, mask = public_case(2)
    group = dict(group_ids=ids) if layout == "ids" else dict(group_size=4)
    kw = dict(weights=[1.0, 0.5, 2.0], combine=combine)
    if combine == "chebyshev":
        kw["ideal"] = [1.0, 1.0, 1.0]
    for m in (None, mask):
        got = fusedrl.group_advantages(R.float(), **group, mask=m, backend=backend, **kw)
        gold = fusedrl.group_advantages(R, **group, mask=m, backend="torch", **kw)
        torch.testing.assert_close(got.double(), gold, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_phase_and_segment_advantages(backend, estimator):
    R, ids, mask = public_case(3)
    g = torch.Generator().manual_seed(4)
    phase_ids = torch.randint(0, 3, mask.shape, generator=g)
    got = fusedrl.phase_advantages(R.float(), phase_ids, ids, mask=mask, estimator=estimator, backend=backend)
    gold = fusedrl.phase_advantages(R, phase_ids, ids, mask=mask, estimator=estimator, backend="torch")
    torch.testing.assert_close(got.double(), gold, rtol=1e-5, atol=1e-5)
    seg_ids = torch.randint(-1, 3, mask.shape, generator=g)
    for group in (dict(group_ids=ids), dict(group_size=6)):
        got = fusedrl.segment_advantages(R[:, 0].float(), R.float(), seg_ids, **group, mask=mask, lam=0.5,
                                         estimator=estimator, backend=backend)
        gold = fusedrl.segment_advantages(R[:, 0], R, seg_ids, **group, mask=mask, lam=0.5, estimator=estimator,
                                          backend="torch")
        torch.testing.assert_close(got.double(), gold, rtol=1e-5, atol=1e-5)


def test_public_default_is_the_kernel_and_deterministic():
    R, ids, _ = public_case(5, N=64, K=1)
    a = fusedrl.group_advantages(R[:, 0].float(), ids)
    b = fusedrl.group_advantages(R[:, 0].float(), ids, backend="cpu")
    assert torch.equal(a, b)
    zero_var = fusedrl.group_advantages(torch.full((8,), 0.3), group_size=4)
    assert torch.all(zero_var == 0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_need_loo_false_skips_only_loo(backend):
    values = torch.randn(12, 2)
    index = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 3])
    full = seg.group_stats(values, index, 4, backend=backend)
    part = seg.group_stats(values, index, 4, need_loo=False, backend=backend)
    assert part.loo_mean.shape == (0, 2)
    for name, a, b in zip(FIELDS, full, part):
        if name != "loo_mean":
            assert torch.equal(a, b), name
