"""Triton token log-probs (python/fusedrl/kernels/logprobs.py) in the interpreter against the reference and the
C++ CPU kernel: values and gradients, block merges, masked vocabulary, NaN rows, strides, dtypes."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it too; must precede triton

import pytest  # noqa: E402
import torch  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl import dispatch  # noqa: E402

pytest.importorskip("triton")
from fusedrl.kernels import logprobs as tk  # noqa: E402
from fusedrl.ops import logprobs as op  # noqa: E402

# (rtol, atol) of fp32/fp64 outputs, and of the gradient stored in the logits' dtype.
TOL = {
    torch.float32: ((1e-5, 1e-5), (1e-5, 1e-6)),
    torch.bfloat16: ((1e-5, 1e-5), (2**-8, 1e-6)),
    torch.float16: ((1e-5, 1e-5), (2**-11, 1e-6)),
    torch.float64: ((1e-12, 1e-12), (1e-12, 1e-14)),
}


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 256 so that V = 1000 / 3001 span several blocks (the default is 4096)."""
    monkeypatch.setattr(tk, "FWD_BLOCK_V", 256)
    monkeypatch.setattr(tk, "BWD_BLOCK_V", 256)


def run(backend, logits, labels, g_lp, g_h, *, temperature=0.7, ignore_index=-100, entropy=True):
    z = logits.detach().clone().requires_grad_(True)
    out = fusedrl.token_logprobs(z, labels, temperature=temperature, ignore_index=ignore_index,
                                 return_entropy=entropy, backend=backend)
    lp, h = out if entropy else (out, None)
    loss = (lp * g_lp.to(lp.dtype)).sum() + ((h * g_h.to(h.dtype)).sum() if entropy else 0)
    loss.backward()
    return lp.detach(), (h.detach() if entropy else None), z.grad


def compare(logits, labels, *, rows=None, **kw):
    """Triton vs the reference (on the same values upcast) and vs the C++ kernel; returns Triton's."""
    N = labels.numel()
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    got = run("triton", logits, labels, g_lp, g_h, **kw)
    ref = run("torch", logits.to(acc), labels, g_lp, g_h, **kw)
    cpu = run("cpu", logits, labels, g_lp, g_h, **kw)
    (vr, va), (gr, ga) = TOL[logits.dtype]
    rows = slice(None) if rows is None else rows
    for name, a, b, c in zip(("logp", "entropy", "grad"), got, ref, cpu):
        if a is None:
            continue
        rt, at = (gr, ga) if name == "grad" else (vr, va)
        if name == "grad":
            assert a.dtype == logits.dtype and a.shape == logits.shape
            at *= max(1.0, b[rows].abs().max().item())
        else:
            assert a.dtype == acc
        torch.testing.assert_close(a[rows].to(acc), b[rows].to(acc), rtol=rt, atol=at, msg=f"{name} vs reference")
        torch.testing.assert_close(a[rows], c[rows], rtol=rt, atol=at, msg=f"{name} vs cpu")
    return got


def case(N, V, dtype, *, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = -100
    return logits, labels


def test_dispatch_selects_triton_under_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    ops = ("cpu", "cuda", "triton", "torch")
    assert dispatch.select("token_logprobs", ops, torch.device("cpu"), torch.float32, "triton") == "triton"


@pytest.mark.parametrize("V", [1, 7, 1000, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_values_and_gradients(V, dtype):
    logits, labels = case(6, V, dtype)
    lp, h, grad = compare(logits, labels)
    assert torch.all(lp[1] == 0) and torch.all(h[1] == 0) and torch.all(grad[1] == 0)


@pytest.mark.parametrize("V", [1000, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_several_blocks(small_blocks, V, dtype):
    logits, labels = case(5, V, dtype, seed=2, scale=10.0)
    compare(logits, labels, temperature=1.3)
    compare(logits, labels, entropy=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_vocabulary(small_blocks, dtype):
    logits, labels = case(4, 3001, dtype)
    logits[0, :1600] = float("-inf")  # six whole leading blocks of -inf, then a partial one
    labels[0] = 2000
    logits[2, ::3] = float("-inf")
    labels[2] = 1
    logits[3, 1:] = float("-inf")  # one finite entry: logp 0, entropy 0
    labels[3] = 0
    lp, h, grad = compare(logits, labels)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all() and torch.isfinite(grad).all()
    assert lp[3] == 0 and abs(h[3].item()) < 1e-50
    if dtype == torch.float32:  # in float64 exp(-128) = 3e-56 is not 0 (as in the C++ kernel)
        assert h[3] == 0 and torch.all(grad[0, :1600] == 0) and torch.all(grad[2, ::3] == 0)


def test_nan_and_inf_rows(small_blocks):
    logits, labels = case(5, 1000, torch.float32)
    logits[0, 700] = float("nan")  # in a late block
    logits[2, 5] = float("inf")
    logits[3, :300] = float("-inf")
    logits[3, 900] = float("nan")  # NaN after leading -inf blocks
    lp, h, grad = compare(logits, labels, rows=[1, 4])
    for r in (0, 2, 3):
        assert torch.isnan(lp[r]) and torch.isnan(h[r]) and torch.isnan(grad[r]).all()
    assert lp[1] == 0 and torch.isfinite(lp[4]) and torch.isfinite(grad[4]).all()


def test_row_stride_and_ignore_index():
    wide = torch.randn(6, 1100)
    logits = wide[:, :1000]  # row stride 1100, unit stride along V
    labels = torch.randint(0, 1000, (6,))
    labels[[0, 4]] = 3
    lp, h, grad = compare(logits, labels, ignore_index=3)
    assert torch.all(lp[[0, 4]] == 0) and torch.all(grad[[0, 4]] == 0)
    compare(torch.randn(12, 7)[::3], torch.tensor([0, 6, -100, 2]))  # every third row


def test_launcher_optional_arguments():
    """The None paths of the backward launcher (no entropy, no grad_logp / grad_entropy) and
    rows whose upstream gradients are both 0, against the C++ kernel."""
    logits, labels = case(5, 300, torch.float32)
    lp, h, m, ln = op.TOKEN_LOGPROBS("triton", logits, labels, 0.7, -100, True)
    lp_c, h_c, m_c, ln_c = op.TOKEN_LOGPROBS("cpu", logits, labels, 0.7, -100, True)
    torch.testing.assert_close(m, m_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ln, ln_c, rtol=1e-6, atol=1e-6)
    _, none_h, m2, ln2 = op.TOKEN_LOGPROBS("triton", logits, labels, 0.7, -100, False)
    assert none_h.numel() == 0 and torch.equal(m2, m) and torch.equal(ln2, ln)
    g_lp, g_h = torch.randn(5), torch.randn(5)
    g_lp[2] = g_h[2] = 0.0
    for args in [(h, g_lp, g_h), (h, None, g_h), (h, g_lp, None), (none_h, g_lp, None), (h, None, None)]:
        ent, a, b = args
        got = op.TOKEN_LOGPROBS_BACKWARD("triton", logits, labels, m, ln, ent, a, b, 0.7, -100)
        want = op.TOKEN_LOGPROBS_BACKWARD("cpu", logits, labels, m_c, ln_c, ent, a, b, 0.7, -100)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.all(got[[1, 2]] == 0)
