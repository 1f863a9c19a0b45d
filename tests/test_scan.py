"""The scan primitive (fusedrl.ops.scan: gae, discounted_returns, masked_prefix_sum): every kernel
backend against the float64 gold (the reference on float64 copies of the same inputs), over
layouts, masks of every dtype, bootstraps, whitening; NaN padding; non-contiguous inputs;
determinism (repeated calls, 1 vs 2 threads: bitwise); opcheck; dispatch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedrl
from fusedrl import dispatch
from fusedrl.ops import scan
from fusedrl.reference import advantages as ref
from fusedrl.testing import assert_close_to_reference

KERNEL_BACKENDS = ["cpu", "triton"]  # the CUDA kernel is compiled in CI, never run here
ALL_BACKENDS = KERNEL_BACKENDS + ["torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64, torch.bfloat16]
HYP = settings(max_examples=25, deadline=None)


def make_mask(B, T, kind, g):
    if kind == "right":  # right-padded, random lengths (some 0)
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        return torch.arange(T) < lengths[:, None]
    if kind == "holes":  # multi-turn: observation tokens inside the response
        return torch.rand(B, T, generator=g) < 0.6
    if kind == "none":
        return torch.zeros(B, T, dtype=torch.bool)
    return torch.ones(B, T, dtype=torch.bool)


def make_case(B, T, dtype, kind="holes", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    r = (torch.randn(B, T, generator=g, dtype=torch.float64) * scale).to(dtype)
    v = (torch.randn(B, T, generator=g, dtype=torch.float64) * scale).to(dtype)
    boot = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    return r, v, make_mask(B, T, kind, g), boot


def out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tol_dtype(dtype):
    # every input is exact in float64: the only error is the accumulation dtype's rounding
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_gae(backend, r, v, mask, boot, gamma, lam, whiten):
    adv, ret = fusedrl.gae(r, v, mask, gamma=gamma, lam=lam, bootstrap=boot, whiten=whiten, backend=backend)
    gb = None if boot is None else boot.double()
    valid = mask != 0
    g_adv, g_ret = ref.gae(r.double(), v.double(), valid, gamma=gamma, lam=lam, bootstrap=gb, whiten_advantages=whiten)
    assert adv.dtype == out_dtype(r.dtype) and ret.dtype == out_dtype(r.dtype)
    assert adv.shape == r.shape and ret.shape == r.shape
    floor = 1.0
    if whiten:  # whitening multiplies the advantages' rounding by 1 / std
        raw, _ = ref.gae(r.double(), v.double(), valid, gamma=gamma, lam=lam, bootstrap=gb)
        x = raw[valid]
        if x.numel() > 1:
            floor = max(1.0, float(x.abs().max()) / float(torch.sqrt(x.var() + 1e-8)))
    dt = tol_dtype(r.dtype)
    assert_close_to_reference(adv, g_adv, dtype=dt, name=f"{backend} advantages", floor=floor)
    assert_close_to_reference(ret, g_ret, dtype=dt, name=f"{backend} returns")
    assert torch.all(adv[~valid] == 0) and torch.all(ret[~valid] == 0)
    return adv, ret


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("whiten", [False, True])
def test_gae_against_gold(backend, dtype, whiten):
    r, v, mask, boot = make_case(6, 37, dtype)
    check_gae(backend, r, v, mask, boot, 0.99, 0.95, whiten)
    check_gae(backend, r, v, mask, None, 1.0, 1.0, whiten)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_returns_and_prefix_sum_against_gold(backend, dtype):
    r, _, mask, _ = make_case(5, 29, dtype, kind="right")
    got = fusedrl.discounted_returns(r, mask, gamma=0.9, backend=backend)
    assert got.dtype == out_dtype(dtype)
    assert_close_to_reference(got, ref.discounted_returns(r.double(), mask, gamma=0.9), dtype=tol_dtype(dtype))
    p = scan.masked_prefix_sum(r, mask, backend=backend)
    assert p.dtype == out_dtype(dtype)
    assert_close_to_reference(p, ref.prefix_sum(r.double(), mask), dtype=tol_dtype(dtype))


@st.composite
def scan_cases(draw):
    B = draw(st.integers(1, 6))
    T = draw(st.integers(1, 24))
    kind = draw(st.sampled_from(["right", "holes", "none", "all"]))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    mdt = draw(st.sampled_from(MASK_DTYPES))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    r, v, mask, boot = make_case(B, T, dtype, kind, seed, scale)
    return r, v, mask.to(mdt), draw(st.booleans()) and boot


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@HYP
@given(case=scan_cases(), gamma=st.sampled_from([0.0, 0.5, 0.97, 1.0]), lam=st.sampled_from([0.0, 0.9, 1.0]),
       whiten=st.booleans())
def test_hypothesis_gae_returns_prefix(backend, case, gamma, lam, whiten):
    r, v, mask, boot = case
    check_gae(backend, r, v, mask, boot if isinstance(boot, torch.Tensor) else None, gamma, lam, whiten)
    got = fusedrl.discounted_returns(r, mask, gamma=gamma, backend=backend)
    assert_close_to_reference(got, ref.discounted_returns(r.double(), mask, gamma=gamma), dtype=tol_dtype(r.dtype))
    assert_close_to_reference(scan.masked_prefix_sum(r, mask, backend=backend), ref.prefix_sum(r.double(), mask != 0),
                              dtype=tol_dtype(r.dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_edges(backend):
    # T = 1; a fully masked batch; one valid token (whitens to 0); an empty batch
    r, v, mask, boot = make_case(3, 1, torch.float32, kind="all")
    check_gae(backend, r, v, mask, boot, 0.9, 0.9, True)
    r, v, mask, boot = make_case(4, 9, torch.float32, kind="none")
    adv, ret = check_gae(backend, r, v, mask, boot, 0.9, 0.9, True)
    assert torch.all(adv == 0) and torch.all(ret == 0)
    one = torch.zeros(4, 9, dtype=torch.bool)
    one[2, 5] = True
    adv, _ = check_gae(backend, r, v, one, boot, 0.9, 0.9, True)
    assert torch.all(adv == 0)
    empty = torch.zeros(0, 5)
    adv, ret = fusedrl.gae(empty, empty, empty.bool(), whiten=True, backend=backend)
    assert adv.shape == (0, 5) and ret.shape == (0, 5)
    assert fusedrl.discounted_returns(torch.zeros(3, 0), torch.zeros(3, 0), backend=backend).shape == (3, 0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_hand_values_truncated_bootstrap(backend):
    # one row, tokens 0, 1, (masked), 3; gamma 0.5, lam 1; V_next past the end = bootstrap 2
    r = torch.tensor([[1.0, 0.0, 123.0, 1.0]])
    v = torch.tensor([[0.5, 0.25, 77.0, 1.0]])
    m = torch.tensor([[1, 1, 0, 1]])
    adv, ret = fusedrl.gae(r, v, m, gamma=0.5, lam=1.0, bootstrap=torch.tensor([2.0]), backend=backend)
    d3 = 1.0 + 0.5 * 2.0 - 1.0
    d1 = 0.0 + 0.5 * 1.0 - 0.25
    d0 = 1.0 + 0.5 * 0.25 - 0.5
    a3, a1 = d3, d1 + 0.5 * d3
    a0 = d0 + 0.5 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, 0.0, a3]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.25, 0.0, a3 + 1.0]]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_padding_never_leaks(backend):
    r, v, mask, boot = make_case(5, 20, torch.float32)
    clean = fusedrl.gae(r, v, mask, gamma=0.9, lam=0.9, bootstrap=boot, whiten=True, backend=backend)
    r2, v2 = r.clone(), v.clone()
    r2[~mask] = float("nan")
    v2[~mask] = float("inf")
    dirty = fusedrl.gae(r2, v2, mask, gamma=0.9, lam=0.9, bootstrap=boot, whiten=True, backend=backend)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    assert torch.equal(fusedrl.discounted_returns(r2, mask, backend=backend),
                       fusedrl.discounted_returns(r, mask, backend=backend))
    assert torch.equal(scan.masked_prefix_sum(r2, mask, backend=backend), scan.masked_prefix_sum(r, mask, backend=backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_and_mixed_dtypes(backend):
    r, v, mask, boot = make_case(6, 15, torch.float32)
    wide = torch.randn(6, 40)
    rs = wide[:, 3:18]  # row stride 40
    rt = r.t().contiguous().t()  # column-major: copied to unit stride along T
    m_exp = mask[:1].expand(6, 15)  # row stride 0
    check_gae(backend, rs, rt, m_exp, boot, 0.9, 0.8, True)
    check_gae(backend, r.bfloat16(), v, mask, boot.double(), 0.9, 0.8, False)  # values fp32, rewards bf16
    got = fusedrl.discounted_returns(rs, m_exp, gamma=0.7, backend=backend)
    assert_close_to_reference(got, ref.discounted_returns(rs.double(), m_exp, gamma=0.7), dtype=torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_repeats_and_thread_counts(backend):
    r, v, mask, boot = make_case(37, 24, torch.float32)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            outs.append((
                *fusedrl.gae(r, v, mask, gamma=0.99, lam=0.95, bootstrap=boot, whiten=True, backend=backend),
                fusedrl.discounted_returns(r, mask, gamma=0.99, backend=backend),
                scan.masked_prefix_sum(r, mask, backend=backend),
            ))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_whitening_matches_verl_masked_whiten_formula():
    # unbiased variance, + 1e-8 inside the sqrt, over the valid tokens of the whole batch
    r, v, mask, boot = make_case(7, 30, torch.float64)
    adv, _ = fusedrl.gae(r, v, mask, gamma=0.95, lam=0.9, bootstrap=boot, backend="cpu")
    white, _ = fusedrl.gae(r, v, mask, gamma=0.95, lam=0.9, bootstrap=boot, whiten=True, backend="cpu")
    x = adv[mask]
    want = (x - x.mean()) / torch.sqrt(x.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(white[mask], want, rtol=1e-12, atol=1e-12)


def test_default_dispatch_runs_the_cpu_kernel():
    assert dispatch.select("gae", fusedrl.advantages.SCAN_BACKENDS, torch.device("cpu"), torch.float32) == "cpu"
    r, v, mask, _ = make_case(3, 8, torch.float32)
    torch.testing.assert_close(fusedrl.gae(r, v, mask)[0], fusedrl.gae(r, v, mask, backend="cpu")[0], rtol=0, atol=0)


def test_opcheck():
    r, v, mask, boot = make_case(3, 8, torch.float32)
    torch.library.opcheck(scan.GAE.overload("cpu"), (r, v, mask, boot, 0.9, 0.95, True))
    torch.library.opcheck(scan.GAE.overload("cpu"), (r, v, mask.float(), None, 1.0, 1.0, False))
    torch.library.opcheck(scan.DISCOUNTED_RETURNS.overload("cpu"), (r, mask, 0.9))
    torch.library.opcheck(scan.MASKED_PREFIX_SUM.overload("cpu"), (r, mask.int()))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize("kind", ["holes", "right"])
def test_whitening_long_rows_every_mask_width(backend, mask_dtype, kind):
    # T spans several 64-token words of the CPU kernel's mask bits, the last one partial
    r, v, mask, boot = make_case(9, 150, torch.float32, kind=kind, seed=3)
    mask[0] = False
    mask[1, :100] = False
    check_gae(backend, r, v, mask.to(mask_dtype), boot, 0.99, 0.95, True)
