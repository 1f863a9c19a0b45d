"""token_logprobs: every backend against the float64 gold (the reference on float64 logits), values
and gradients through both outputs; edges; dispatch; custom-op registration; bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedrl
from fusedrl import dispatch, reference
from fusedrl.testing import assert_close_to_reference, max_error

KERNEL_BACKENDS = ["cpu", "triton"]  # the CUDA kernel is compiled in CI, never run here
ALL_BACKENDS = KERNEL_BACKENDS + ["torch"]


def make_case(N, V, dtype, *, scale=3.0, ignore_frac=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_frac:
        labels[torch.rand(N, generator=g) < ignore_frac] = -100
    g_lp = torch.randn(N, generator=g, dtype=torch.float64)
    g_h = torch.randn(N, generator=g, dtype=torch.float64)
    return logits, labels, g_lp, g_h


def run(backend, logits, labels, g_lp, g_h, *, temperature=1.0, entropy=True, **kw):
    """Forward and backward of  sum(g_lp * logp) + sum(g_h * H); returns logp, H, d/d logits."""
    z = logits.detach().clone().requires_grad_(True)
    out = fusedrl.token_logprobs(z, labels, temperature=temperature, return_entropy=entropy, backend=backend, **kw)
    logp, h = out if entropy else (out, None)
    loss = (logp * g_lp.to(logp.dtype)).sum()
    if entropy:
        loss = loss + (h * g_h.to(h.dtype)).sum()
    if loss.requires_grad:
        loss.backward()
    return logp.detach(), (h.detach() if entropy else None), z.grad


def gold(logits, labels, g_lp, g_h, *, temperature=1.0, entropy=True):
    return run("torch", logits.double(), labels, g_lp, g_h, temperature=temperature, entropy=entropy)


def torch_error(logits, labels, g_lp, g_h, temperature, golds):
    """The error of eager torch computing in the logits' own dtype (TRL's way for bf16 input)."""
    z = logits.detach().clone().requires_grad_(True)
    ls = torch.log_softmax(z / temperature, dim=-1)
    logp = ls.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(labels != -100, logp, 0)
    h = -(ls.exp() * ls).sum(-1)
    h = torch.where(labels != -100, h, 0)
    ((logp * g_lp.to(z.dtype)).sum() + (h * g_h.to(z.dtype)).sum()).backward()
    return [max_error(a, b) for a, b in zip((logp, h, z.grad), golds)]


def check(backend, logits, labels, *, temperature=1.0, entropy=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    g_h = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    got = run(backend, logits, labels, g_lp, g_h, temperature=temperature, entropy=entropy)
    ref = gold(logits, labels, g_lp, g_h, temperature=temperature, entropy=entropy)
    expected_out = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert got[0].dtype == expected_out and got[2].dtype == logits.dtype
    names = ("logp", "entropy", "grad")
    terr = None
    if logits.dtype in (torch.bfloat16, torch.float16):
        terr = torch_error(logits, labels, g_lp, g_h, temperature, ref)
    # Any float32 computation rounds x = z / T, an error of eps * |x| that moves every log-prob and
    # softmax weight by as much: the unit scale of the comparison is max(1, max|x|).
    finite = logits.double()[torch.isfinite(logits.double())]
    floor = max(1.0, float(finite.abs().max()) / temperature if finite.numel() else 1.0)
    for i, (a, b) in enumerate(zip(got, ref)):
        if a is None:
            continue
        # Values come out in float32, so their rounding is float32's whatever the input dtype;
        # the gradient is stored in the logits' dtype.
        dt = logits.dtype if (i == 2 or logits.dtype == torch.float64) else torch.float32
        assert_close_to_reference(a, b, dtype=dt, torch_error=terr[i] if terr and dt == logits.dtype else None,
                                  name=f"{backend} {names[i]}", floor=floor)
    return got, ref


def shape_for(backend, V):
    return 2 if (backend == "triton" and V > 4096) else 5


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 1000, 32003])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_against_gold(backend, dtype, V, temperature):
    logits, labels, _, _ = make_case(shape_for(backend, V), V, dtype, ignore_frac=0.2)
    check(backend, logits, labels, temperature=temperature)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(backend, dtype):
    logits, labels, _, _ = make_case(4, 301, dtype, scale=2.0)
    check(backend, logits, labels, temperature=1.3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logp_only_and_entropy_only_gradients(backend):
    logits, labels, _, _ = make_case(4, 257, torch.float32)
    check(backend, logits, labels, entropy=False)
    # gradient through the entropy alone (logp unused)
    z = logits.clone().requires_grad_(True)
    _, h = fusedrl.token_logprobs(z, labels, return_entropy=True, backend=backend)
    h.sum().backward()
    zg = logits.double().clone().requires_grad_(True)
    _, hg = reference.token_logprobs(zg, labels, return_entropy=True)
    hg.sum().backward()
    assert_close_to_reference(z.grad, zg.grad, dtype=torch.float32, name="entropy-only grad")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ignored_rows_are_zero_with_zero_gradient(backend):
    logits, labels, _, _ = make_case(6, 50, torch.float32)
    labels[[0, 3, 5]] = -100
    (logp, h, grad), _ = check(backend, logits, labels)
    assert torch.all(logp[[0, 3, 5]] == 0) and torch.all(h[[0, 3, 5]] == 0)
    assert torch.all(grad[[0, 3, 5]] == 0)
    labels[:] = 7
    check(backend, logits, labels)  # ignore_index=-100 does not hit a valid label
    labels[:] = 3
    logp = fusedrl.token_logprobs(logits, labels, ignore_index=3, backend=backend)
    assert torch.all(logp == 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_shapes_and_non_contiguous_logits(backend):
    wide = torch.randn(3, 4, 120)
    logits = wide[:, :, :101]  # row stride 120, unit stride along V
    labels = torch.randint(0, 101, (3, 4))
    (logp, h, grad), _ = check(backend, logits, labels)
    assert logp.shape == (3, 4) and h.shape == (3, 4) and grad.shape == (3, 4, 101)
    transposed = torch.randn(101, 6).t()  # stride along V is not 1
    check(backend, transposed, torch.randint(0, 101, (6,)))
    sliced = torch.randn(8, 101)[::2]  # every other row
    check(backend, sliced, torch.randint(0, 101, (4,)))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch(backend):
    logits = torch.randn(0, 11, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.int64)
    logp, h = fusedrl.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert logp.shape == (0,) and h.shape == (0,)
    (logp.sum() + h.sum()).backward()
    assert logits.grad.shape == (0, 11)
    logp = fusedrl.token_logprobs(torch.randn(2, 0, 5), torch.zeros(2, 0, dtype=torch.int32), backend=backend)
    assert logp.shape == (2, 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_int32_labels(backend):
    logits, labels, _, _ = make_case(4, 33, torch.float32)
    a = fusedrl.token_logprobs(logits, labels, backend=backend)
    b = fusedrl.token_logprobs(logits, labels.int(), backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_vocabulary_and_nan_rows(backend):
    """-inf logits are masked entries (probability 0, finite entropy, zero gradient); a NaN or
    +inf logit makes that row NaN and leaves the other rows alone."""
    logits, labels, _, _ = make_case(5, 3000, torch.float32)
    logits[0, :2500] = float("-inf")  # a long leading run of -inf (several whole blocks)
    labels[0] = 2700
    logits[1, ::3] = float("-inf")
    labels[1] = 1
    logits[2, 17] = float("nan")
    logits[3, 5] = float("inf")
    labels[3] = 6
    got = run(backend, logits, labels, torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    ref = gold(logits, labels, torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    for a, b in zip(got, ref):
        ok_rows = [0, 1, 4]
        assert torch.isfinite(a[ok_rows]).all()
        assert_close_to_reference(a[ok_rows], b[ok_rows], dtype=torch.float32)
    logp, h, grad = got
    assert torch.isnan(logp[2]) and torch.isnan(h[2]) and torch.isnan(logp[3]) and torch.isnan(h[3])
    assert torch.all(grad[0, :2500] == 0) and torch.all(grad[1, ::3] == 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_extreme_logits_stay_finite(backend):
    logits = torch.tensor([[1e4, -1e4, 0.0, 3e4], [-3e4, -3e4, -3e4, -3e4], [80.0, 80.0, -80.0, 0.0]])
    labels = torch.tensor([1, 2, 3])
    got, ref = check(backend, logits, labels)
    for t, g in zip(got, ref):
        assert torch.isfinite(t).all()
        # logits that are integers times a power of two are exact in x = z / T (T = 1), so here the
        # kernels are held to the unit scale: the (max, log-normalizer) pair keeps log s exact
        assert_close_to_reference(t, g, dtype=torch.float32, floor=1.0)


@pytest.mark.parametrize("backend", ["cpu"])
def test_gradcheck_float64(backend):
    logits = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 16, -100])

    def f(z):
        lp, h = fusedrl.token_logprobs(z, labels, temperature=0.8, return_entropy=True, backend=backend)
        return lp, h

    assert torch.autograd.gradcheck(f, (logits,))


def test_reference_gradcheck_float64():
    logits = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 8, -100])
    assert torch.autograd.gradcheck(
        lambda z: reference.token_logprobs(z, labels, temperature=1.7, return_entropy=True), (logits,)
    )


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(0, 6),
    V=st.integers(1, 300),
    temperature=st.floats(0.2, 3.0),
    scale=st.sampled_from([0.01, 1.0, 10.0, 100.0]),
    ignore_frac=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_cpu_hypothesis(N, V, temperature, scale, ignore_frac, seed):
    logits, labels, _, _ = make_case(N, V, torch.float32, scale=scale, ignore_frac=ignore_frac, seed=seed)
    check("cpu", logits, labels, temperature=temperature)


@settings(max_examples=10, deadline=None)
@given(N=st.integers(1, 4), V=st.integers(1, 2100), temperature=st.floats(0.5, 2.0), seed=st.integers(0, 2**16))
def test_triton_hypothesis(N, V, temperature, seed):
    logits, labels, _, _ = make_case(N, V, torch.float32, ignore_frac=0.3, seed=seed)
    check("triton", logits, labels, temperature=temperature)


# --------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("return_entropy", [False, True])
def test_opcheck(backend, return_entropy):
    from fusedrl.ops import logprobs as op

    logits = torch.randn(4, 37, requires_grad=True)
    labels = torch.tensor([0, 36, -100, 5])
    torch.library.opcheck(op.TOKEN_LOGPROBS.overload(backend), (logits, labels, 0.9, -100, return_entropy))
    lp, h, row_max, log_norm = op.TOKEN_LOGPROBS(backend, logits.detach(), labels, 0.9, -100, True)
    torch.library.opcheck(
        op.TOKEN_LOGPROBS_BACKWARD.overload(backend),
        (logits.detach(), labels, row_max, log_norm, h, torch.randn(4), torch.randn(4) if return_entropy else None,
         0.9, -100),
    )
    g_lp = torch.randn(4)
    outs = [torch.empty(4), torch.empty(4) if return_entropy else None, torch.empty(4), torch.empty(4)]
    torch.library.opcheck(op.FORWARD.overload(backend), (logits.detach(), labels, 0.9, -100, *outs),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(op.BACKWARD.overload(backend), (logits.detach(), labels, 0.9, -100, row_max, log_norm,
                                                          h if return_entropy else None, g_lp, None,
                                                          torch.empty(4, 37)),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    def f(z, y):
        lp, h = fusedrl.token_logprobs(z, y, temperature=0.9, return_entropy=True)
        return (lp + 0.1 * h).sum()

    z = torch.randn(8, 100, requires_grad=True)
    y = torch.randint(0, 100, (8,))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(z, y).backward()
    g = z.grad.clone()
    z.grad = None
    f(z, y).backward()
    assert torch.equal(g, z.grad)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def test_backends_report():
    report = fusedrl.backends()
    assert set(report) == {"cpu", "cuda", "triton", "torch"}
    assert report["torch"] is None
    assert report["cpu"] is None, f"the C++ extension must be built: {report['cpu']}"
    assert report["triton"] is None, "the test extra installs triton"
    if torch.cuda.is_available():  # a GPU machine: available unless the extension was built without nvcc
        assert report["cuda"] is None or "without CUDA kernels" in report["cuda"], report["cuda"]
    else:  # no GPU: says why
        assert isinstance(report["cuda"], str) and report["cuda"]


def test_default_dispatch_and_overrides(monkeypatch):
    ops = ("cpu", "cuda", "triton", "torch")
    cpu = torch.device("cpu")
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    assert dispatch.select("token_logprobs", ops, cpu, torch.float32) == "cpu"
    assert dispatch.select("token_logprobs", ops, cpu, torch.float32, "triton") == "triton"  # interpreter on
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    assert dispatch.select("token_logprobs", ops, cpu, torch.float32) == "torch"
    assert dispatch.select("token_logprobs", ops, cpu, torch.float32, "cpu") == "cpu"  # keyword wins
    monkeypatch.setenv("FUSEDRL_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FUSEDRL_BACKEND"):
        dispatch.select("token_logprobs", ops, cpu, torch.float32)
    monkeypatch.delenv("FUSEDRL_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        fusedrl.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="gpu")


def test_declining_backend_says_why_once_and_falls_through(monkeypatch):
    ops = ("cpu", "cuda", "triton", "torch")
    cpu = torch.device("cpu")
    dispatch._reported.clear()
    with pytest.warns(RuntimeWarning, match="'cuda' declined token_logprobs"):
        assert dispatch.select("token_logprobs", ops, cpu, torch.float32, "cuda") == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        assert dispatch.select("token_logprobs", ops, cpu, torch.float32, "cuda") == "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
        assert dispatch.select("token_logprobs", ops, cpu, torch.float32, "triton") == "cpu"
    # an op a backend has no kernel for falls through to the reference
    assert dispatch.select("some_op", ("torch",), cpu, torch.float32) == "torch"


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_bad_input():
    z = torch.randn(3, 5)
    y = torch.tensor([0, 1, 4])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\) or ignore_index=-100, got 5"):
        fusedrl.token_logprobs(z, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="labels must be in"):
        fusedrl.token_logprobs(z, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape logits.shape\[:-1\]"):
        fusedrl.token_logprobs(z, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="labels must be int64 or int32, got float32"):
        fusedrl.token_logprobs(z, y.float())
    with pytest.raises(TypeError, match="logits must be"):
        fusedrl.token_logprobs(z.long(), y)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fusedrl.token_logprobs([[0.0]], y)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fusedrl.token_logprobs(z, y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fusedrl.token_logprobs(z, y, temperature=math.inf)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        fusedrl.token_logprobs(z, y, temperature="1")
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        fusedrl.token_logprobs(z, y, return_entropy=1)
    with pytest.raises(ValueError, match="logits must have shape"):
        fusedrl.token_logprobs(torch.randn(3, 0), y)
    meta = torch.randn(3, 5, device="meta")
    with pytest.raises(ValueError, match="labels must be on the same device as logits"):
        fusedrl.token_logprobs(meta, y)
