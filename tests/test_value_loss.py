"""fusedrl.value_loss (the clipped PPO value loss): the reference against the formula written out
here in float64, the C++ CPU kernel and the Triton kernel (interpreter, tests/conftest.py) against
the reference (values, metrics and d loss / d values; float64 to 1e-10, float32 to 1e-5 of the
float64 gold, bfloat16 within twice the reference's own bfloat16 error), every aggregation mode
with and without global counts, both clip tie conventions (exact ties included), odd lengths,
T = 1, all-masked rows and batches, NaN in the padding, the packed layout, mask dtypes, strided
operands, multi-block Triton rows, the micro-batch law, hypothesis, the custom op (opcheck,
torch.compile), the ValueLoss module, bad input, and OpenRLHF 0.11.2's ValueLoss formula
(reimplemented from openrlhf/models/loss.py: its loss module cannot be imported without
flash_attn, which openrlhf.models imports at package level). verl's compute_value_loss:
tests/peers/test_verl_value_loss.py."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it too; must precede triton

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl import _ext  # noqa: E402
from fusedrl.ops import value as op  # noqa: E402

HAS_CPU = _ext.load() is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNELS = [pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="the C++ extension is not built")),
           pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))]
MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
MASKS = ("bool", "float", "int32", "uint8", "int64")
CLIPS = (None, 0.0, 0.2, 1.5)


def make_inputs(B, T, dtype=torch.float64, *, seed=0, mask="bool", nan=True, empty_row=True, spread=0.5):
    """values / old_values / returns [B, T] and a right-padded mask with random lengths (row 1
    fully masked when ``empty_row``), NaN in the padding of every float operand when ``nan``."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    old = v + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ret = v + torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if empty_row and B > 1:
        lengths[1] = 0
    valid = torch.arange(T)[None, :] < lengths[:, None]
    if mask == "float":
        m = torch.where(valid, torch.rand(B, T, generator=g, dtype=torch.float64) + 0.25, 0.0)
    else:
        m = valid.to({"bool": torch.bool, "int32": torch.int32, "uint8": torch.uint8, "int64": torch.int64}[mask])
    d = dict(values=v, old_values=old, returns=ret)
    if nan:
        d = {k: t.masked_fill(~valid, float("nan")) for k, t in d.items()}
    d = {k: t.to(dtype) for k, t in d.items()}
    d["mask"] = m
    return d


def run(backend, d, **opts):
    """(loss, metrics, d loss / d values) of fusedrl.value_loss on ``backend``."""
    v = d["values"].detach().clone().requires_grad_(True)
    loss, metrics = fusedrl.value_loss(v, d["old_values"], d["returns"], d["mask"], backend=backend, **opts)
    (grad,) = torch.autograd.grad(loss, v, allow_unused=True)
    grad = torch.zeros_like(v) if grad is None else grad
    return loss.detach(), {k: m.detach() for k, m in metrics.items()}, grad


def gold(d):
    return {k: (t.to(torch.float64) if k != "mask" else t) for k, t in d.items()}


def assert_same(got, want, rtol, atol, what=""):
    torch.testing.assert_close(got[0], want[0].to(got[0].dtype), rtol=rtol, atol=atol, msg=f"loss {what}")
    assert got[1].keys() == want[1].keys(), what
    for k in got[1]:
        torch.testing.assert_close(got[1][k], want[1][k].to(got[1][k].dtype), rtol=rtol, atol=atol, msg=f"{k} {what}")
    torch.testing.assert_close(got[2], want[2].to(got[2].dtype), rtol=rtol, atol=atol, msg=f"grad {what}")
    assert torch.isfinite(got[0]) and torch.isfinite(got[2]).all(), what


def error(got, want):
    """Max error of (loss, metrics, grad) against the gold, each relative to the gold's scale."""
    out = []
    for a, b in zip([got[0], *got[1].values(), got[2]], [want[0], *want[1].values(), want[2]]):
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        out.append(float((a.to(torch.float64) - b).abs().max()) / scale if b.numel() else 0.0)
    return max(out)


# ---------------------------------------------------------------------------------------------
# the formula, written out (float64): the oracle of the reference


def formula(d, *, clip=None, aggregation="token-mean", num_tokens=None, num_sequences=None, max_length=None,
            exclude_empty_rows=False):
    """The loss from docs/OBJECTIVES.md "Value loss", row by row in Python loops over the valid
    tokens (no shared code with fusedrl.reference)."""
    v, old, ret, m = (d[k].to(torch.float64) for k in ("values", "old_values", "returns", "mask"))
    B, T = v.shape
    row_sum, row_n = [], []
    clipped_n, v_sum, n_all = 0.0, 0.0, 0.0
    for i in range(B):
        s = v.new_zeros(())
        n = 0.0
        for t in range(T):
            w = float(m[i, t])
            if w == 0:
                continue
            l1 = (v[i, t] - ret[i, t]) ** 2
            if clip is None:
                lt = 0.5 * l1
            else:
                vc = min(max(float(v[i, t].detach()), float(old[i, t]) - clip), float(old[i, t]) + clip)
                vc = v[i, t] if float(old[i, t]) - clip < float(v[i, t].detach()) < float(old[i, t]) + clip else vc
                l2 = (vc - ret[i, t]) ** 2
                lt = 0.5 * torch.maximum(l1, torch.as_tensor(l2, dtype=torch.float64))
                clipped_n += w * float(l2 > l1)
            s = s + w * lt
            n += w
            v_sum += w * float(v[i, t].detach())
        row_sum.append(s)
        row_n.append(n)
        n_all += n
    nonempty = sum(1 for n in row_n if n > 0)
    S = num_sequences if num_sequences is not None else (nonempty if exclude_empty_rows else B)
    S = S if S > 0 else 1
    if aggregation == "token-mean":
        N = num_tokens if num_tokens is not None else n_all
        loss = sum(row_sum) / (N if N > 0 else 1)
    elif aggregation == "token-sum":
        loss = sum(row_sum)
    elif aggregation == "seq-mean-token-mean":
        loss = sum(s / (n if n > 0 else 1) for s, n in zip(row_sum, row_n)) / S
    elif aggregation == "seq-mean-token-sum":
        loss = sum(row_sum) / S
    else:
        loss = sum(row_sum) / (S * (max_length if max_length is not None else T))
    metrics = {}
    if clip is not None:
        metrics["clipfrac"] = clipped_n / (n_all if n_all > 0 else 1)
    metrics["values_mean"] = v_sum / (n_all if n_all > 0 else 1)
    return loss, metrics


@pytest.mark.parametrize("aggregation", MODES)
@pytest.mark.parametrize("clip", CLIPS)
def test_reference_matches_formula(aggregation, clip):
    """The torch reference (loss, metrics, gradient) against the formula and its autograd, float64,
    every mask dtype, with local and global counts."""
    for k, mask in enumerate(MASKS):
        d = make_inputs(4, 6, seed=10 * k + len(aggregation), mask=mask)
        for counts in ({}, dict(num_tokens=13, num_sequences=7, max_length=9), dict(exclude_empty_rows=True)):
            got = run("torch", d, clip=clip, aggregation=aggregation, **counts)
            v = d["values"].clone().requires_grad_(True)
            want, metrics = formula(dict(d, values=v), clip=clip, aggregation=aggregation, **counts)
            (g,) = torch.autograd.grad(want, v, allow_unused=True)
            torch.testing.assert_close(got[0], want.detach(), rtol=1e-12, atol=1e-14)
            for name, value in metrics.items():
                torch.testing.assert_close(got[1][name], torch.tensor(value, dtype=torch.float64), rtol=1e-12,
                                           atol=1e-14)
            assert got[1].keys() == metrics.keys()
            valid = d["mask"] != 0
            torch.testing.assert_close(got[2][valid], g[valid], rtol=1e-12, atol=1e-14)
            assert torch.equal(got[2][~valid], torch.zeros_like(got[2][~valid]))


def test_clip_changes_the_loss():
    """Guard: the clip is active on these inputs (else the clipped tests would test nothing)."""
    d = make_inputs(4, 6, seed=3)
    a, b = run("torch", d, clip=0.2), run("torch", d)
    assert float(a[1]["clipfrac"]) > 0.1 and float(a[0]) > float(b[0])


# ---------------------------------------------------------------------------------------------
# kernels against the reference


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("aggregation", MODES)
@pytest.mark.parametrize("clip", CLIPS)
def test_kernels_float64(backend, aggregation, clip):
    for k, mask in enumerate(MASKS):
        d = make_inputs(5, 7, seed=k + 100, mask=mask)
        for ties in ("clamp", "verl"):
            for counts in ({}, dict(num_tokens=11.5, num_sequences=3, max_length=5), dict(exclude_empty_rows=True)):
                opts = dict(clip=clip, clip_ties=ties, aggregation=aggregation, **counts)
                assert_same(run(backend, d, **opts), run("torch", d, **opts), 1e-10, 1e-12, f"{mask} {opts}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("aggregation", MODES)
def test_kernels_float32_against_gold(backend, aggregation):
    d = make_inputs(6, 37, torch.float32, seed=7, mask="float")
    for clip in (None, 0.2):
        got = run(backend, d, clip=clip, aggregation=aggregation)
        want = run("torch", gold(d), clip=clip, aggregation=aggregation)
        assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
        assert error(got, want) < 1e-5, error(got, want)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_low_precision_within_twice_torch(backend, dtype):
    """bfloat16 / float16 values: the kernel's error against the float64 gold is at most twice the
    reference's own error in that dtype (plus an ulp of slack for outputs the reference gets
    exactly); the gradient comes back in the input dtype."""
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        d = make_inputs(4, 33, dtype, seed=9, mask="float")
        want = run("torch", gold(d), clip=0.2, aggregation=aggregation)
        got = run(backend, d, clip=0.2, aggregation=aggregation)
        torch_err = error(run("torch", d, clip=0.2, aggregation=aggregation), want)
        assert got[2].dtype == dtype
        assert error(got, want) <= 2 * torch_err + ulp, (error(got, want), torch_err)


@pytest.mark.parametrize("backend", KERNELS)
def test_mixed_operand_dtypes(backend):
    """old_values and returns in other float dtypes than values (each read by its own dtype code)."""
    d = make_inputs(3, 9, torch.float32, seed=4)
    d["old_values"] = d["old_values"].to(torch.bfloat16)
    d["returns"] = d["returns"].to(torch.float64)
    assert_same(run(backend, d, clip=0.3), run("torch", d, clip=0.3), 1e-5, 1e-6)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("T", [1, 2, 7, 31, 257, 300])
def test_odd_lengths_t1_and_empty_rows(backend, T):
    """Odd lengths (tiles of 256 on the CPU: 257 and 300 have a partial second tile), T = 1, an
    all-masked row, NaN in the padding (exact zero gradients there)."""
    for mask in ("bool", "float"):
        d = make_inputs(4, T, seed=T, mask=mask)
        for aggregation in ("token-mean", "seq-mean-token-mean"):
            got = run(backend, d, clip=0.2, aggregation=aggregation)
            assert_same(got, run("torch", d, clip=0.2, aggregation=aggregation), 1e-10, 1e-12, f"T={T}")
            padded = d["mask"] == 0
            assert torch.equal(got[2][padded], torch.zeros_like(got[2][padded]))


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_fully_masked_batch(backend):
    d = make_inputs(3, 4, seed=1)
    d["mask"] = torch.zeros_like(d["mask"])
    for aggregation in MODES:
        loss, metrics, grad = run(backend, d, clip=0.2, aggregation=aggregation)
        assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
        assert all(float(m) == 0.0 for m in metrics.values())


@pytest.mark.parametrize("backend", KERNELS)
def test_strided_operands(backend):
    d = make_inputs(3, 24, seed=13)
    s = {k: t[:, ::3] for k, t in d.items()}
    assert not s["values"].is_contiguous()
    assert_same(run(backend, s, clip=0.2), run("torch", s, clip=0.2), 1e-10, 1e-12)


@pytest.mark.parametrize("backend", KERNELS)
def test_ties_at_the_clip_bounds(backend):
    """v exactly at v_old +- c, v = v_old with c = 0, and returns halfway (an exact tie of the two
    branches): each tie convention against the reference, and the two conventions against the peer
    formulas' autograd (verl's clip_by_value, OpenRLHF's clamp of v - v_old)."""
    old = torch.tensor([[0.5, 0.5, 0.25, -1.0, 2.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.75, 0.25, 0.25, -0.5, 2.0, 1.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, -1.0, 1.0, -1.0, 3.0, 0.625]], dtype=torch.float64)
    mask = torch.ones_like(v, dtype=torch.bool)
    for clip in (0.25, 0.0):
        d = dict(values=v, old_values=old, returns=ret, mask=mask)
        for ties in ("clamp", "verl"):
            got = run(backend, d, clip=clip, clip_ties=ties, aggregation="token-sum")
            assert_same(got, run("torch", d, clip=clip, clip_ties=ties, aggregation="token-sum"), 1e-14, 1e-15, ties)
            x = v.clone().requires_grad_(True)
            if ties == "verl":
                vc = torch.max(torch.min(x, old + clip), old - clip)
            else:
                vc = old + (x - old).clamp(-clip, clip)
            peer = 0.5 * torch.max((x - ret) ** 2, (vc - ret) ** 2).sum()
            (g,) = torch.autograd.grad(peer, x)
            torch.testing.assert_close(got[2], g, rtol=1e-14, atol=1e-15)
            torch.testing.assert_close(got[0], peer.detach(), rtol=1e-14, atol=1e-15)
        # the conventions differ at the bounds only
        a = run(backend, d, clip=clip, clip_ties="clamp", aggregation="token-sum")[2]
        b = run(backend, d, clip=clip, clip_ties="verl", aggregation="token-sum")[2]
        assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# layouts


def pack(d):
    """The padded batch as verl's remove-padding layout: [1, N] of each row's first len_i tokens
    (len_i = one past the last valid token, so rows keep inner padding) and cu_seqlens."""
    valid = d["mask"] != 0
    lengths = torch.where(valid.any(-1), valid.shape[1] - valid.flip(-1).to(torch.int64).argmax(-1), 0)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    out = {k: torch.cat([t[i, : int(lengths[i])] for i in range(t.shape[0])])[None] for k, t in d.items()}
    return out, cu


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("aggregation", MODES)
def test_packed_layout(backend, aggregation):
    """cu_seqlens with values [1, N] and [N] (int64 and int32 offsets), an empty segment and tokens
    after the last segment (no loss, zero gradient), against the padded call."""
    d = make_inputs(5, 9, seed=21, mask="float", nan=False)
    p, cu = pack(d)
    opts = dict(clip=0.2, aggregation=aggregation, max_length=9)
    want = run("torch", d, **opts)
    for cu_ in (cu, cu.to(torch.int32)):
        got = run(backend, p, cu_seqlens=cu_, **opts)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
        for k in want[1]:
            torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-10, atol=1e-12)
        valid = d["mask"] != 0
        torch.testing.assert_close(got[2][0][p["mask"][0] != 0], want[2][valid], rtol=1e-10, atol=1e-12)
    # [N] operands, two tokens after the last segment with a nonzero mask
    flat = {k: torch.cat([t[0], torch.ones(2, dtype=t.dtype)]) for k, t in p.items()}
    got = run(backend, flat, cu_seqlens=cu, **opts)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert torch.equal(got[2][-2:], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("backend", KERNELS)
def test_packed_float32_against_gold(backend):
    d = make_inputs(6, 300, torch.float32, seed=22, mask="int32", nan=False)
    p, cu = pack(d)
    got = run(backend, p, cu_seqlens=cu, clip=0.2, aggregation="seq-mean-token-mean")
    want = run("torch", gold(p), cu_seqlens=cu, clip=0.2, aggregation="seq-mean-token-mean")
    assert error(got, want) < 1e-5


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_multi_block_rows(monkeypatch):
    """Rows of 37 tokens in blocks of 16 (three blocks; packed rows that start mid-block)."""
    from fusedrl.kernels import value as tk  # noqa: PLC0415

    monkeypatch.setattr(tk, "BLOCK_T", 16)
    d = make_inputs(3, 37, seed=23, mask="float")
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        assert_same(run("triton", d, clip=0.2, aggregation=aggregation),
                    run("torch", d, clip=0.2, aggregation=aggregation), 1e-10, 1e-12)
    p, cu = pack(make_inputs(3, 37, seed=24, nan=False))
    assert_same(run("triton", p, cu_seqlens=cu, clip=0.2), run("torch", p, cu_seqlens=cu, clip=0.2), 1e-10, 1e-12)


# ---------------------------------------------------------------------------------------------
# the micro-batch law, hypothesis


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("aggregation", MODES)
def test_microbatch_invariance(backend, aggregation):
    from fusedrl.testing import check_microbatch_invariance  # noqa: PLC0415

    d = make_inputs(8, 7, seed=41, nan=False)

    def loss_fn(b, **counts):
        return fusedrl.value_loss(b["values"], b["old_values"], b["returns"], b["mask"], clip=0.2,
                                  aggregation=aggregation, backend=backend, **counts)

    check_microbatch_invariance(loss_fn, d, splits=[2, 4, 2], wrt=("values",), rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 20), seed=st.integers(0, 10**6), mask=st.sampled_from(MASKS),
       clip=st.sampled_from(CLIPS), aggregation=st.sampled_from(MODES), ties=st.sampled_from(("clamp", "verl")),
       packed=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_hypothesis(B, T, seed, mask, clip, aggregation, ties, packed, scale):
    d = make_inputs(B, T, seed=seed, mask=mask, nan=not packed, spread=0.5 * scale)
    d = {k: (t * scale if k != "mask" else t) for k, t in d.items()}
    opts = dict(clip=None if clip is None else clip * scale, clip_ties=ties, aggregation=aggregation, max_length=T)
    if packed:
        d, cu = pack(d)
        opts["cu_seqlens"] = cu
    want = run("torch", d, **opts)
    for backend in ("cpu", "triton"):
        if (backend == "cpu" and HAS_CPU) or (backend == "triton" and HAS_TRITON):
            got = run(backend, d, **opts)
            assert_same(got, want, 1e-10, 1e-12 * scale * scale, f"{backend} {opts}")


# ---------------------------------------------------------------------------------------------
# autograd, the op, compile


@pytest.mark.parametrize("backend", KERNELS)
def test_upstream_gradient_and_one_backward(backend):
    d = make_inputs(3, 6, seed=2)
    grads = {}
    for be in (backend, "torch"):
        v = d["values"].clone().requires_grad_(True)
        loss, _ = fusedrl.value_loss(v, d["old_values"], d["returns"], d["mask"], clip=0.2, backend=be)
        (loss * 0.25).backward(retain_graph=True)
        grads[be] = v.grad.clone()
        if be == backend:
            with pytest.raises(RuntimeError, match="one backward"):
                loss.backward()
    torch.testing.assert_close(grads[backend], grads["torch"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", KERNELS)
def test_gradient_flows_to_values_only(backend):
    d = make_inputs(3, 6, seed=5)
    old = d["old_values"].clone().requires_grad_(True)
    ret = d["returns"].clone().requires_grad_(True)
    v = d["values"].clone().requires_grad_(True)
    loss, metrics = fusedrl.value_loss(v, old, ret, d["mask"], clip=0.2, backend=backend)
    loss.backward()
    assert old.grad is None and ret.grad is None and v.grad is not None
    assert not any(m.requires_grad for m in metrics.values())
    with torch.no_grad():  # no gradient wanted: the kernel writes none
        loss2, _ = fusedrl.value_loss(v, old, ret, d["mask"], clip=0.2, backend=backend)
    assert not loss2.requires_grad
    torch.testing.assert_close(loss2, loss.detach())


@pytest.mark.skipif(not HAS_CPU, reason="the C++ extension is not built")
def test_opcheck():
    d = make_inputs(3, 5, seed=1, nan=False)
    flags, opts = op.option_lists(op.kernel_options(0.2, "verl"))
    coef = torch.rand(3, dtype=torch.float64)
    v = d["values"].clone().requires_grad_(True)
    args = (v, d["old_values"], d["returns"], d["mask"], None, coef, flags, opts, True)
    torch.library.opcheck(op.VALUE_OBJECTIVE.overload("cpu"), args, test_utils=("test_schema", "test_faketensor",
                                                                    "test_aot_dispatch_static"))
    p, cu = pack(d)
    args = (p["values"].clone().requires_grad_(True), p["old_values"], p["returns"], p["mask"], cu, coef, flags, opts,
            True)
    torch.library.opcheck(op.VALUE_OBJECTIVE.overload("cpu"), args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not HAS_CPU, reason="the C++ extension is not built")
def test_torch_compile_fullgraph():
    d = make_inputs(3, 6, torch.float32, seed=3, nan=False)

    def f(x):
        loss, metrics = fusedrl.value_loss(x, d["old_values"], d["returns"], d["mask"], clip=0.2,
                                           aggregation="seq-mean-token-mean", backend="cpu")
        return loss, metrics["clipfrac"]

    x = d["values"].clone().requires_grad_()
    loss, clipfrac = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    y = d["values"].clone().requires_grad_()
    ref, ref_clipfrac = f(y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(clipfrac, ref_clipfrac)
    torch.testing.assert_close(x.grad, y.grad)


# ---------------------------------------------------------------------------------------------
# the module, OpenRLHF


def test_value_loss_module():
    d = make_inputs(4, 6, seed=8)
    module = fusedrl.ValueLoss(clip=0.2, aggregation="seq-mean-token-mean", num_tokens=5)
    assert "ValueLoss" in fusedrl.__all__ and repr(module) == "ValueLoss(clip=0.2, aggregation='seq-mean-token-mean', num_tokens=5)"
    got = module(d["values"], d["old_values"], d["returns"], d["mask"], num_sequences=3)
    want = fusedrl.value_loss(d["values"], d["old_values"], d["returns"], d["mask"], clip=0.2,
                              aggregation="seq-mean-token-mean", num_tokens=5, num_sequences=3)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="ValueLoss: clip"):
        fusedrl.ValueLoss(clip=-1.0)
    with pytest.raises(TypeError, match="ValueLoss: unknown option 'clip_eps'"):
        fusedrl.ValueLoss(clip_eps=0.2)
    with pytest.raises(TypeError, match="option of the module"):
        module(d["values"], d["old_values"], d["returns"], d["mask"], clip=0.3)
    with pytest.raises(TypeError, match="per-call tensor"):
        fusedrl.ValueLoss(returns=d["returns"])


def openrlhf_value_loss(values, old_values, returns, action_mask, clip_eps=None, token_level_loss=True, dp_size=1,
                        batch_num_tokens=None, global_batch_size=None):
    """openrlhf 0.11.2 openrlhf/models/loss.py ValueLoss.forward with aggregate_loss and
    openrlhf/models/utils.py masked_mean, copied as written (the module needs flash_attn to import)."""
    if clip_eps is not None:
        values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        surr1 = (values_clipped - returns) ** 2
        surr2 = (values - returns) ** 2
        loss = torch.max(surr1, surr2)
    else:
        loss = (values - returns) ** 2
    if token_level_loss:
        if batch_num_tokens is None:
            loss = (loss * action_mask).sum() / action_mask.sum()
        else:
            loss = (loss * action_mask).sum() / batch_num_tokens * dp_size
    else:
        token_counts = action_mask.sum(dim=-1)
        seq_loss = (loss * action_mask).sum(dim=-1) / (token_counts + 1e-8)
        seq_mask = (token_counts > 0).float()
        if global_batch_size is None:
            loss = (seq_loss * seq_mask).sum() / seq_mask.sum()
        else:
            loss = (seq_loss * seq_mask).sum() / global_batch_size * dp_size
    return 0.5 * loss


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("clip", [None, 0.2])
def test_openrlhf_value_loss(backend, token_level_loss, clip):
    """OpenRLHF's ValueLoss(clip_eps, token_level_loss) is value_loss(clip=clip_eps) with
    token-mean, or seq-mean-token-mean over the non-empty rows; with the global counts, fusedrl =
    OpenRLHF / dp_size. (OpenRLHF's v_old + clamp(v - v_old) rounds v on unclipped tokens: 1e-15.)"""
    d = make_inputs(5, 8, seed=31, mask="float", nan=False)
    agg = dict(aggregation="token-mean") if token_level_loss else dict(aggregation="seq-mean-token-mean",
                                                                       exclude_empty_rows=True)
    for glob in ({}, dict(dp_size=4, batch_num_tokens=23.0, global_batch_size=9)):
        counts = dict(num_tokens=glob.get("batch_num_tokens"), num_sequences=glob.get("global_batch_size"))
        got = run(backend, d, clip=clip, **agg, **counts)
        v = d["values"].clone().requires_grad_(True)
        want = openrlhf_value_loss(v, d["old_values"], d["returns"], d["mask"], clip, token_level_loss, **glob)
        (g,) = torch.autograd.grad(want, v)
        dp = glob.get("dp_size", 1)
        torch.testing.assert_close(got[0] * dp, want.detach(), rtol=1e-7, atol=1e-12)  # OpenRLHF's + 1e-8
        torch.testing.assert_close(got[2] * dp, g, rtol=1e-7, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input():
    d = make_inputs(3, 5, seed=1, nan=False)
    v, o, r, m = d["values"], d["old_values"], d["returns"], d["mask"]
    cases = [
        (TypeError, "values", lambda: fusedrl.value_loss(v.tolist(), o, r, m)),
        (TypeError, "values", lambda: fusedrl.value_loss(v.to(torch.int64), o, r, m)),
        (ValueError, "values must have shape", lambda: fusedrl.value_loss(v[0], o[0], r[0], m[0])),
        (ValueError, "returns", lambda: fusedrl.value_loss(v, o, r[:, :4], m)),
        (TypeError, "returns", lambda: fusedrl.value_loss(v, o, r.to(torch.int32), m)),
        (ValueError, "old_values", lambda: fusedrl.value_loss(v, o[:2], r, m, clip=0.2)),
        (TypeError, "old_values", lambda: fusedrl.value_loss(v, o.numpy(), r, m, clip=0.2)),
        (ValueError, "mask", lambda: fusedrl.value_loss(v, o, r, m[:, :3])),
        (TypeError, "mask", lambda: fusedrl.value_loss(v, o, r, m.to(torch.complex64))),
        (ValueError, "clip must be >= 0", lambda: fusedrl.value_loss(v, o, r, m, clip=-0.1)),
        (ValueError, "clip must be finite", lambda: fusedrl.value_loss(v, o, r, m, clip=float("nan"))),
        (TypeError, "clip", lambda: fusedrl.value_loss(v, o, r, m, clip="0.2")),
        (TypeError, "clip", lambda: fusedrl.value_loss(v, o, r, m, clip=True)),
        (ValueError, "needs old_values", lambda: fusedrl.value_loss(v, None, r, m, clip=0.2)),
        (ValueError, "clip_ties", lambda: fusedrl.value_loss(v, o, r, m, clip=0.2, clip_ties="half")),
        (ValueError, "aggregation", lambda: fusedrl.value_loss(v, o, r, m, aggregation="balanced")),
        (ValueError, "aggregation", lambda: fusedrl.value_loss(v, o, r, m, aggregation="mean")),
        (ValueError, "num_tokens", lambda: fusedrl.value_loss(v, o, r, m, num_tokens=-1)),
        (ValueError, "num_sequences", lambda: fusedrl.value_loss(v, o, r, m, num_sequences=torch.ones(2))),
        (ValueError, "max_length", lambda: fusedrl.value_loss(v, o, r, m, max_length=0)),
        (TypeError, "exclude_empty_rows", lambda: fusedrl.value_loss(v, o, r, m, exclude_empty_rows=1)),
        (ValueError, "backend", lambda: fusedrl.value_loss(v, o, r, m, backend="gpu")),
        (ValueError, "returns must be finite", lambda: fusedrl.value_loss(v, o, r.index_fill(1, torch.tensor([0]),
                                                                                          float("nan")), m)),
        (ValueError, "old_values must be finite", lambda: fusedrl.value_loss(
            v, o.index_fill(1, torch.tensor([0]), float("inf")), r, m, clip=0.2)),
        (ValueError, "same device", lambda: fusedrl.value_loss(v, o, r.to("meta"), m)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    p, cu = pack(d)
    args = (p["values"], p["old_values"], p["returns"], p["mask"])
    with pytest.raises(ValueError, match="cu_seqlens"):
        fusedrl.value_loss(*args, cu_seqlens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fusedrl.value_loss(*args, cu_seqlens=torch.tensor([0, 3, 2, 4]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        fusedrl.value_loss(*args, cu_seqlens=cu.to(torch.float32))
    with pytest.raises(ValueError, match="max_length"):
        fusedrl.value_loss(*args, cu_seqlens=cu, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="values must have shape"):
        fusedrl.value_loss(v, o, r, m, cu_seqlens=cu)
    # NaN / inf only in the padding or without a clip (old_values unused) are fine
    pad = d["mask"] == 0
    fusedrl.value_loss(v, o.masked_fill(pad, float("nan")), r.masked_fill(pad, float("inf")), m, clip=0.2)
    fusedrl.value_loss(v, torch.full_like(o, float("nan")), r, m)
