"""Triton fused policy objective (python/fusedrl/kernels/policy.py) in the interpreter against the plain-PyTorch
reference (backend="torch") and the C++ CPU kernel it mirrors: loss, every metric, d loss / d logp
and d loss / d entropy over an option grid (every surrogate, ratio level, dual clip, delta, KL kind
incl. the "+" kinds and bias correction, rollout mode, entropy bonus, aggregation incl. balanced
with group ids and global counts, kl / entropy aggregation), padded and packed layouts, mask
dtypes, strides, multi-block rows, all-masked rows, T = 1, B = 1, NaN in padded positions; the row
statistics and per-row outputs of the two ops against the CPU kernel; a small hypothesis sweep."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it too; must precede triton

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl import _ext  # noqa: E402
from fusedrl.policy import PolicyParams  # noqa: E402

pytest.importorskip("triton")
from fusedrl.kernels import policy as tk  # noqa: E402
from fusedrl.ops import policy as op  # noqa: E402
from policy_cases import (  # noqa: E402
    ENT, GRID, KL_ALL, PACKED, _case_id, _options, assert_same, make_inputs, pack, scenarios, without,
)

HAS_CPU = _ext.load() is not None
# (rtol, atol) against the reference: float64 inputs, float32 inputs (the reference in float32).
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}
CPU_TOL = {torch.float64: (1e-12, 1e-13), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6)}


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 tokens: rows of 37 span three blocks (prefix / suffix carries, second sweeps)."""
    monkeypatch.setattr(tk, "BLOCK_T", 16)


# ---------------------------------------------------------------------------------------------
# inputs


# ---------------------------------------------------------------------------------------------
# runs


LAUNCHES = {"loss": 0}


def _counted(fn):
    def launch(o):
        LAUNCHES["loss"] += 1
        return fn(o)

    return launch


tk.policy_loss = _counted(tk.policy_loss)  # the dispatcher must not fall through to another backend


def run(backend, d, *, entropy_grad=True, **opts):
    """(loss, metrics, d loss / d logp, d loss / d entropy) of fusedrl.policy_loss on ``backend``."""
    before = LAUNCHES["loss"]
    x = d["logp"].detach().clone().requires_grad_(True)
    h = d.get("entropy")
    if h is not None:
        h = h.detach().clone().requires_grad_(entropy_grad)
    kw = {k: v for k, v in d.items() if k not in ("logp", "old_logp", "advantages", "mask", "entropy")}
    loss, metrics = fusedrl.policy_loss(x, d["old_logp"], d["advantages"], d["mask"], entropy=h, backend=backend,
                                        **kw, **opts)
    inputs = [x] + ([h] if h is not None and h.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
    gh = None
    if h is not None and h.requires_grad:
        gh = grads[1] if grads[1] is not None else torch.zeros_like(h)
    assert (LAUNCHES["loss"] == before + 1) == (backend == "triton"), backend
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, gx, gh


def compare(d, *, cpu=True, **opts):
    """Triton against the reference (on the same dtype) and against the C++ CPU kernel."""
    dtype = d["logp"].dtype
    got = run("triton", d, **opts)
    want = run("torch", d, **opts)
    rtol, atol = TOL[dtype]
    assert_same(got, want, rtol, atol, f"vs torch {opts}")
    if cpu and HAS_CPU:
        rtol, atol = CPU_TOL[dtype]
        assert_same(got, run("cpu", d, **opts), rtol, atol, f"vs cpu {opts}")
    return got


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_grid_float64(case):
    i = GRID.index(case)
    mask = ("bool", "float", "int32", "uint8", "int64")[i % 5]
    d = make_inputs(4, 6, torch.float64, seed=i, per_token_adv=i % 3 == 1, mask=mask)
    compare(d, **_options(case, 4))


FLOAT32 = GRID[:1] + [
    c for c in GRID
    if c.get("surrogate") in ("geo_mean", "sapo") or c.get("ratio") in ("cumulative", "hybrid") or "clip_ratio_c" in c
    or "kl_aggregation" in c
][::2]


@pytest.mark.parametrize("case", FLOAT32, ids=[_case_id(c) for c in FLOAT32])
def test_grid_float32(case):
    i = FLOAT32.index(case)
    d = make_inputs(3, 5, torch.float32, seed=100 + i, per_token_adv=i % 2 == 0, mask=("bool", "float")[i % 2])
    compare(d, **_options(case, 3))


# ---------------------------------------------------------------------------------------------
# layouts and edges

@pytest.mark.parametrize("case", PACKED, ids=[_case_id(c) for c in PACKED])
def test_packed(case):
    """cu_seqlens with logp [1, N]: against the reference (which pads) and the CPU kernel."""
    i = PACKED.index(case)
    d, cu = pack(make_inputs(4, 5, torch.float64, seed=200 + i, per_token_adv=i % 2 == 1, nan=True))
    got = compare(d, cu_seqlens=cu, **_options(case, 4))
    assert got[2].shape == d["logp"].shape


def test_packed_gap_and_empty_segments():
    """Tokens after the last segment get a zero gradient; empty segments (cu[i] == cu[i+1]) and a
    1-D [N] layout."""
    d = make_inputs(4, 5, torch.float64, seed=7, nan=False, per_token_adv=True)
    p, _ = pack(d)
    N = p["logp"].shape[-1]
    cu = torch.tensor([0, 3, 3, N - 2, N - 2])  # an empty segment, two trailing tokens outside
    for k in ("logp", "old_logp", "advantages", "mask", "ref_logp", "rollout_logp", "entropy"):
        p[k] = p[k].reshape(-1)
    p["mask"] = torch.ones_like(p["mask"])
    for opts in (dict(ratio="cumulative", **KL_ALL, **ENT), dict(ratio="sequence", aggregation="seq-mean-token-mean")):
        got = compare(p, cu_seqlens=cu, **opts)
        assert torch.equal(got[2][-2:], torch.zeros(2, dtype=torch.float64))
    # int32 cu_seqlens (accepted by policy_loss); not against the CPU kernel, which reads int64
    compare(p, cu_seqlens=cu.to(torch.int32), cpu=False, ratio="cumulative", **KL_ALL)


@pytest.mark.parametrize("case", [
    dict(ratio="cumulative", **KL_ALL, **ENT),
    dict(ratio="sequence", **KL_ALL),
    dict(ratio="hybrid", hybrid_mixing="entropy", **ENT),
    dict(surrogate="geo_mean", rollout_correction="token_mask", rollout_cap=1.3),
    dict(ratio="token", aggregation="balanced", rollout_correction="sequence_truncate", rollout_cap=1.2),
], ids=["cumulative", "sequence", "hybrid-entropy", "geo_mean", "token-balanced"])
def test_multi_block_rows(small_blocks, case):
    """Rows of 37 tokens in blocks of 16 (carried prefix / suffix sums, row max, second sweeps);
    packed rows that start mid-block."""
    d = make_inputs(3, 37, torch.float64, seed=11, per_token_adv=True, mask="float")
    compare(d, **case)
    p, cu = pack(d)
    compare(p, cu_seqlens=cu, **case)


def test_multi_block_float32(small_blocks):
    d = make_inputs(2, 37, torch.float32, seed=12, empty_row=False)
    compare(d, ratio="cumulative", **KL_ALL, **ENT)


@pytest.mark.parametrize("ratio", ["token", "sequence", "cumulative", "hybrid"])
def test_edges_b1_t1(ratio):
    """B = 1, T = 1 (one valid token, then one padded token), and a fully masked batch (loss 0,
    zero gradients)."""
    for B, T in ((1, 1), (1, 3), (2, 1)):
        d = make_inputs(B, T, torch.float64, seed=B * 10 + T, empty_row=False)
        compare(d, ratio=ratio, **KL_ALL, **ENT)
    d = make_inputs(2, 3, torch.float64, seed=3)
    d["mask"] = torch.zeros_like(d["mask"])
    loss, metrics, gx, gh = compare(d, ratio=ratio, aggregation="seq-mean-token-mean", **KL_ALL, **ENT)
    assert float(loss) == 0.0 and torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gh, torch.zeros_like(gh))


@pytest.mark.parametrize("ratio", ["token", "sequence", "sequence-token", "cumulative", "hybrid"])
def test_extreme_log_ratios(ratio):
    """Log-ratios of +-1e4: finite loss and gradients (the clamp), as the reference."""
    d = make_inputs(3, 4, torch.float64, seed=5, nan=True)
    d["old_logp"] = d["logp"] + torch.tensor([1e4, -1e4, 0.5, -0.5], dtype=torch.float64)
    compare(d, ratio=ratio, rollout_correction="sequence_truncate", rollout_cap=2.0, beta=0.1, kl="low_var_kl")


def test_no_old_logp_no_entropy_grad():
    """old_logp absent (rho = 0); entropy present without requires_grad; ref absent."""
    d = without(make_inputs(3, 5, torch.float64, seed=9), "old_logp", "ref_logp")
    compare(d, ratio="hybrid", hybrid_mixing="entropy", entropy_coef=0.1, entropy_grad=False)
    compare(d, ratio="cumulative", entropy_coef=0.1)


def test_strided_operands():
    """Non-contiguous operands (a column slice and an expanded per-token advantage)."""
    d = make_inputs(3, 12, torch.float64, seed=13, per_token_adv=True)
    s = {k: (v[:, ::2] if v is not None and v.dim() == 2 else v) for k, v in d.items()}
    assert not s["logp"].is_contiguous()
    compare(s, ratio="cumulative", **KL_ALL, **ENT)
    s["advantages"] = torch.randn(3, 1, dtype=torch.float64).expand(3, 6)
    compare(s, ratio="sequence", **KL_ALL)


@pytest.mark.skipif(not HAS_CPU, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_cpu(dtype):
    """bfloat16 / float16 operands: float32 math, gradients stored in the input dtype (round to
    nearest even), as the CPU kernel."""
    d = make_inputs(3, 6, dtype, seed=21, mask="float")
    opts = dict(ratio="cumulative", **KL_ALL, **ENT)
    got = run("triton", d, **opts)
    cpu = run("cpu", d, **opts)
    assert got[2].dtype == dtype and got[3].dtype == dtype
    torch.testing.assert_close(got[0], cpu[0], rtol=1e-5, atol=1e-6)
    for k in got[1]:
        torch.testing.assert_close(got[1][k], cpu[1][k], rtol=1e-5, atol=1e-6)
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
    torch.testing.assert_close(got[2].float(), cpu[2].float(), rtol=ulp, atol=1e-6)
    torch.testing.assert_close(got[3].float(), cpu[3].float(), rtol=ulp, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the ops: row statistics and per-row outputs against the CPU kernel


@pytest.mark.skipif(not HAS_CPU, reason="needs the C++ extension")
@pytest.mark.parametrize("case", [
    dict(ratio="hybrid", hybrid_mixing="entropy", rollout_correction="sequence_mask", rollout_cap=1.5),
    dict(surrogate="geo_mean", rollout_correction="icepop", rollout_cap=1.4, rollout_cap_low=0.8),
    dict(ratio="sequence-token", aggregation="balanced"),
    dict(ratio="token"),
], ids=["hybrid", "geo_mean", "sequence-token", "token"])
def test_ops_match_cpu(case):
    """fusedrl::policy_stats (all 9 statistics, -inf row max of an empty row included) and
    fusedrl::policy_objective (all 9 per-row outputs, both gradients) of the two backends."""
    d = make_inputs(4, 6, torch.float64, seed=31, per_token_adv=True)
    p = PolicyParams(**dict(dict(beta=0.1, entropy_coef=0.01), **case))
    flags, values = op.option_lists(op.kernel_options(p))
    balanced = p.aggregation == "balanced"
    stats = {}
    for be in ("cpu", "triton"):
        stats[be] = op.POLICY_STATS.overload(be)(d["logp"], d["old_logp"], d["advantages"], d["mask"],
                                                 d["rollout_logp"], d["entropy"], None, flags, values, balanced)
    a, b = stats["triton"], stats["cpu"]
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a[torch.isinf(a)], b[torch.isinf(b)])
    torch.testing.assert_close(a[~torch.isinf(a)], b[~torch.isinf(b)], rtol=1e-13, atol=1e-14)
    coef = torch.rand(4, 3, dtype=torch.float64)
    out = {}
    for be in ("cpu", "triton"):
        out[be] = op.POLICY_OBJECTIVE.overload(be)(d["logp"], d["old_logp"], d["advantages"], d["mask"],
                                                   d["ref_logp"], d["rollout_logp"], d["entropy"], None, stats["cpu"],
                                                   coef, flags, values, True, True)
    for x, y in zip(out["triton"], out["cpu"]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# hypothesis


@settings(max_examples=15, deadline=None)
@given(scenarios())
def test_hypothesis(scenario):
    data, opts = scenario
    d = make_inputs(data["B"], data["T"], torch.float64, seed=data["seed"], per_token_adv=data["per_token_adv"],
                    mask=data["mask"])
    if data["packed"]:
        d, cu = pack(d)
        compare(d, cu_seqlens=cu, **opts)
    else:
        compare(d, **opts)


def test_only_code_paths_are_constexpr():
    """Hyperparameters, lengths, strides and the presence-of-a-value flags are runtime arguments:
    only BLOCK, the option codes that select a code path and operand presence are constexpr."""
    import inspect  # noqa: PLC0415

    for kernel in (tk._stats_kernel, tk._loss_kernel):
        fn = getattr(kernel, "fn", kernel)
        params = inspect.signature(fn).parameters
        constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        allowed = {"SURROGATE", "RATIO", "KL", "ROLLOUT", "HYBRID_ENTROPY", "STATS_ADV", "PACKED", "BLOCK"}
        assert constexpr <= allowed | {n for n in constexpr if n.startswith("HAS_")}, constexpr
        for name in ("lo", "hi", "clamp", "cap", "beta", "tau_pos", "has_clamp", "clip_below", "T", "vespo_k_pos",
                     "off_policy_threshold", "entropy_threshold"):
            if name in params:
                assert name not in constexpr, name
