"""Every kernel backend of the fused policy objective (the C++ CPU kernel, csrc/cpu/policy.cpp; the
Triton kernel in the interpreter, python/fusedrl/kernels/policy.py) against the plain-PyTorch
reference, each test parametrized by backend: loss, every metric, d loss / d logp and d loss /
d entropy over the option grid (float64 to 1e-10; float32 to 1e-5 of the float64 gold), the
packed layout, B = 1 / T = 1 / all-masked batches, extreme log-ratios, absent operands and strides,
the micro-batch invariance law for every aggregation, and a hypothesis sweep over options and
layouts. The interpreter is slow, so Triton takes a subset of the larger sweeps (named below).
Backend-only paths: tests/test_policy_cpu.py (tiles, the local path, ISA variants, threads, ops)
and tests/test_policy_triton.py (blocks, low precision, ops against the CPU kernel)."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it too; must precede triton

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl import _ext  # noqa: E402
from policy_cases import (  # noqa: E402
    ENT, GRID, KL_ALL, PACKED, _case_id, _options, assert_same, error, gold, make_inputs, pack, run, scenarios,
    without,
)

HAS = {"cpu": _ext.load() is not None, "triton": importlib.util.find_spec("triton") is not None}
WHY = {"cpu": "the C++ extension is not built", "triton": "triton is not installed (the test extra installs it)"}
BACKENDS = [pytest.param(be, marks=pytest.mark.skipif(not HAS[be], reason=WHY[be])) for be in ("cpu", "triton")]

# The Triton subset of the option grid in float32: one case of each family the float32 math treats
# differently (geo_mean, sapo, cumulative, hybrid, the dual clip, a separate KL aggregation).
GRID_TRITON_F32 = GRID[:1] + [
    c for c in GRID
    if c.get("surrogate") in ("geo_mean", "sapo") or c.get("ratio") in ("cumulative", "hybrid") or "clip_ratio_c" in c
    or "kl_aggregation" in c
][::2]


def by_backend(cases, triton=None):
    """(backend, case) parameters: every case on the CPU; ``triton`` (default: every case) on Triton."""
    out = []
    for be in ("cpu", "triton"):
        for c in cases if be == "cpu" or triton is None else triton:
            marks = pytest.mark.skipif(not HAS[be], reason=WHY[be])
            out.append(pytest.param(be, c, id=f"{be}-{_case_id(c)}", marks=marks))
    return out


def compare(backend, d, *, rtol=1e-10, atol=1e-10, **opts):
    got = run(backend, d, **opts)
    assert_same(got, run("torch", d, **opts), rtol, atol, f"{backend} vs torch {opts}")
    return got


# ---------------------------------------------------------------------------------------------
# the option grid


@pytest.mark.parametrize("backend,case", by_backend(GRID))
def test_option_grid_float64(backend, case):
    i = GRID.index(case)
    mask = ("bool", "float", "int32", "uint8", "int64")[i % 5]
    d = make_inputs(4, 9, torch.float64, seed=i, per_token_adv=i % 3 == 1, mask=mask)
    compare(backend, d, **_options(case, 4))


@pytest.mark.parametrize("backend,case", by_backend(GRID, GRID_TRITON_F32))
def test_option_grid_float32_within_1e5_of_the_gold(backend, case):
    """float32 operands: within 1e-5 of the float64 gold (relative to each output's scale), the
    outputs in float32."""
    i = GRID.index(case)
    d = make_inputs(4, 9, torch.float32, seed=50 + i, per_token_adv=i % 2 == 0, mask=("bool", "float")[i % 2])
    opts = _options(case, 4)
    got = run(backend, d, **opts)
    want = run("torch", gold(d), **opts)
    assert got[2].dtype == torch.float32 and got[0].dtype == torch.float32
    assert error(got, want) < 1e-5, error(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_hypothesis_options_and_layouts(backend, scenario):
    if backend == "triton" and scenario[0]["seed"] % 3:  # the interpreter: a third of the examples
        return
    data, opts = scenario
    d = make_inputs(data["B"], data["T"], torch.float64, seed=data["seed"], per_token_adv=data["per_token_adv"],
                    mask=data["mask"])
    if data["packed"]:
        d, cu = pack(d)
        compare(backend, d, cu_seqlens=cu, **opts)
    else:
        compare(backend, d, **opts)


# ---------------------------------------------------------------------------------------------
# layouts and edges


@pytest.mark.parametrize("backend,case", by_backend(PACKED))
def test_packed_layout(backend, case):
    """cu_seqlens with logp [1, N] (verl's remove-padding layout) against the reference on the
    padded equivalent; int64 and int32 offsets."""
    i = PACKED.index(case)
    d, cu = pack(make_inputs(4, 7, torch.float64, seed=300 + i, per_token_adv=i % 2 == 1))
    got = compare(backend, d, cu_seqlens=cu, **_options(case, 4))
    assert got[2].shape == d["logp"].shape
    compare(backend, d, cu_seqlens=cu.to(torch.int32), **_options(case, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_tokens_outside_segments_get_zero_gradient(backend):
    """An empty segment (cu[i] == cu[i + 1]), two trailing tokens after the last segment, a 1-D [N]
    layout."""
    d = make_inputs(4, 5, torch.float64, seed=7, nan=False, per_token_adv=True)
    p, _ = pack(d)
    N = p["logp"].shape[-1]
    p = {k: v.reshape(-1) if v is not None and v.dim() == 2 else v for k, v in p.items()}
    cu = torch.tensor([0, 3, 3, N - 2, N - 2])
    for opts in (dict(ratio="cumulative", **KL_ALL, **ENT), dict(ratio="sequence", aggregation="seq-mean-token-mean")):
        got = compare(backend, p, cu_seqlens=cu, **opts)
        assert torch.equal(got[2][-2:], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", ["token", "sequence", "cumulative", "hybrid"])
def test_b1_t1_and_fully_masked_batch(backend, ratio):
    """B = 1, T = 1 (one valid token, then one padded token), and a fully masked batch: loss 0,
    zero gradients."""
    for B, T in ((1, 1), (1, 3), (2, 1)):
        compare(backend, make_inputs(B, T, torch.float64, seed=B * 10 + T, empty_row=False), ratio=ratio, **KL_ALL,
                **ENT)
    d = make_inputs(2, 3, torch.float64, seed=3)
    d["mask"] = torch.zeros_like(d["mask"])
    loss, metrics, gx, gh = compare(backend, d, ratio=ratio, aggregation="seq-mean-token-mean", **KL_ALL, **ENT)
    assert float(loss) == 0.0 and torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gh, torch.zeros_like(gh))


EXTREME = [(r, s) for s in ("clip", "cispo", "sapo", "reinforce", "gpg")
           for r in ("token", "sequence", "sequence-token", "cumulative", "hybrid")] + [("token", "geo_mean")]
EXTREME_TRITON = [(r, "clip") for r in ("token", "sequence", "sequence-token", "cumulative", "hybrid")]


@pytest.mark.parametrize("magnitude", [50.0, 1e4])
@pytest.mark.parametrize("backend,ratio,surrogate", [
    pytest.param(be, r, s, id=f"{be}-{r}-{s}", marks=pytest.mark.skipif(not HAS[be], reason=WHY[be]))
    for be in ("cpu", "triton") for r, s in (EXTREME if be == "cpu" else EXTREME_TRITON)])
def test_extreme_log_ratios_are_finite(backend, ratio, surrogate, magnitude):
    """Log-ratios of +-50 and +-1e4: a finite loss and gradient (the clamp), equal to the
    reference's in float64 and float32 (in float32 against the float32 reference: x - o rounds at
    1e4 * eps in any float32 code, the kernel's and torch's alike)."""
    for dtype in (torch.float64, torch.float32):
        d = make_inputs(3, 4, dtype, seed=5)
        shift = torch.tensor([magnitude, -magnitude, 0.5, -0.5], dtype=dtype)
        d["old_logp"] = d["logp"] + shift
        d["rollout_logp"] = d["old_logp"] - shift
        opts = dict(surrogate=surrogate, ratio=ratio, rollout_correction="token_truncate", beta=0.1, kl="low_var_kl",
                    **ENT)
        got = run(backend, d, **opts)
        want = run("torch", d, **opts)
        assert error(got, want) < (1e-10 if dtype == torch.float64 else 1e-5)
        assert all(torch.isfinite(t).all() for t in (got[0], got[2], got[3], *got[1].values()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_old_logp_strided_operands_and_no_entropy_grad(backend):
    """old_logp absent (rho = 0), column-sliced operands, an expanded per-token advantage, entropy
    present without requires_grad."""
    d = without(make_inputs(3, 12, torch.float64, seed=9, per_token_adv=True), "old_logp")
    s = {k: (v[:, ::2] if v is not None and v.dim() == 2 else v) for k, v in d.items()}
    assert not s["logp"].is_contiguous()
    compare(backend, s, ratio="cumulative", **KL_ALL, **ENT)
    compare(backend, s, ratio="hybrid", hybrid_mixing="entropy", entropy_coef=0.1, entropy_grad=False)
    s["advantages"] = torch.randn(3, 1, dtype=torch.float64).expand(3, 6)
    compare(backend, s, ratio="sequence", **KL_ALL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales(backend):
    d = make_inputs(3, 6, torch.float64, seed=2)
    grads = {}
    for be in (backend, "torch"):
        x = d["logp"].clone().requires_grad_()
        loss, _ = fusedrl.policy_loss(x, d["old_logp"], d["advantages"], d["mask"], backend=be, beta=0.1,
                                      ref_logp=d["ref_logp"])
        (loss * 0.25).backward()
        grads[be] = x.grad
    torch.testing.assert_close(grads[backend], grads["torch"], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# the invariance law on the kernels


AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                "balanced")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_microbatch_invariance(aggregation, backend):
    """With global counts, micro-batch losses and gradients add up to the full batch's."""
    from fusedrl.testing import check_microbatch_invariance  # noqa: PLC0415

    d = make_inputs(8, 7, torch.float64, seed=41, nan=False, empty_row=True)
    batch = dict(logp=d["logp"], old_logp=d["old_logp"], advantages=d["advantages"], mask=d["mask"],
                 ref_logp=d["ref_logp"], group_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))

    def loss_fn(b, **counts):
        extra = dict(num_groups=4, group_ids=b["group_ids"]) if aggregation == "balanced" else {}
        return fusedrl.policy_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], ref_logp=b["ref_logp"],
                                   beta=0.1, kl_aggregation="token-mean", aggregation=aggregation, backend=backend,
                                   **extra, **counts)

    check_microbatch_invariance(loss_fn, batch, splits=[2, 4, 2], keep_groups=aggregation == "balanced",
                                rtol=1e-10, atol=1e-12)
