"""The Triton fused policy objective's own paths (python/fusedrl/kernels/policy.py, in the
interpreter) against the plain-PyTorch reference and the C++ CPU kernel it mirrors: rows across
blocks (carried prefix / suffix sums, row max, second sweeps; packed rows starting mid-block),
bfloat16 / float16 operands against the CPU kernel, the row statistics and
per-row outputs of the two ops against the CPU kernel, and which arguments are constexpr. What
every backend must do is in tests/test_policy_backends.py."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it too; must precede triton

import pytest  # noqa: E402
import torch  # noqa: E402

from fusedrl import _ext  # noqa: E402
from fusedrl.policy import PolicyParams  # noqa: E402

pytest.importorskip("triton")
from fusedrl.kernels import policy as tk  # noqa: E402
from fusedrl.ops import policy as op  # noqa: E402
from policy_cases import ENT, KL_ALL, assert_same, make_inputs, pack, run  # noqa: E402

HAS_CPU = _ext.load() is not None
# (rtol, atol) against the reference: float64 inputs, float32 inputs (the reference in float32).
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}
CPU_TOL = {torch.float64: (1e-12, 1e-13), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6)}


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 tokens: rows of 37 span three blocks (prefix / suffix carries, second sweeps)."""
    monkeypatch.setattr(tk, "BLOCK_T", 16)


# ---------------------------------------------------------------------------------------------
# blocks and low precision


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
