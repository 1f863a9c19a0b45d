"""linear_logprobs: equal to token_logprobs(hidden @ weight.T + bias) in values and in gradients
w.r.t. hidden, weight and bias, over chunk sizes, odd V, temperature, ignore_index and dtypes; and
its peak memory does not grow with N x V."""

import os
import subprocess
import sys

import pytest
import torch

import fusedrl
from fusedrl.testing import assert_close_to_reference


def case(N, H, V, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:: max(N // 3, 1)] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    lp, ent = fn(h, w, b, labels, **kw)
    g = torch.Generator().manual_seed(1)
    (lp * torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.dtype)).sum().add((ent * 0.3).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad, None if b is None else b.grad


def fused(h, w, b, labels, **kw):
    return fusedrl.linear_logprobs(h, w, labels, bias=b, return_entropy=True, **kw)


def unfused(h, w, b, labels, temperature=1.0, backend=None, **_):
    logits = h @ w.t() + (0 if b is None else b)
    return fusedrl.token_logprobs(logits, labels, temperature=temperature, return_entropy=True, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_unfused_float64_gold(backend, chunk_size, bias):
    hidden, weight, b, labels = case(23, 16, 1003, torch.float32, bias=bias)
    got = run(fused, hidden, weight, b, labels, temperature=0.8, chunk_size=chunk_size, backend=backend)
    gold = run(unfused, hidden.double(), weight.double(), None if b is None else b.double(), labels,
               temperature=0.8, backend="torch")
    for name, a, g in zip(("logp", "entropy", "d hidden", "d weight", "d bias"), got, gold):
        if g is None:
            assert a is None
            continue
        assert a.dtype == (torch.float32 if name in ("logp", "entropy") else hidden.dtype)
        assert_close_to_reference(a, g, dtype=torch.float32, name=name, floor=10.0)


@pytest.mark.parametrize("chunk_size", [5, 32])
def test_bf16_no_worse_than_the_unfused_bf16_path(chunk_size):
    hidden, weight, b, labels = case(40, 32, 517, torch.bfloat16)
    got = run(fused, hidden, weight, b, labels, chunk_size=chunk_size, backend="cpu")
    ref = run(unfused, hidden, weight, b, labels, backend="cpu")  # bf16 GEMM, then the kernel
    gold = run(unfused, hidden.double(), weight.double(), b.double(), labels, backend="torch")
    for name, a, r, g in zip(("logp", "entropy", "d hidden", "d weight", "d bias"), got, ref, gold):
        err_ref = (r.double() - g).abs().max().item()
        err = (a.double() - g).abs().max().item()
        assert err <= 2 * err_ref + 1e-6, (name, err, err_ref)


def test_batch_dims_and_entropy_off():
    hidden, weight, _, labels = case(12, 8, 101, torch.float32, bias=False)
    lp = fusedrl.linear_logprobs(hidden.view(3, 4, 8), weight, labels.view(3, 4), chunk_size=5)
    ref = fusedrl.token_logprobs(hidden @ weight.t(), labels).view(3, 4)
    assert lp.shape == (3, 4)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)


def test_bad_input():
    hidden, weight, b, labels = case(4, 8, 11, torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\]"):
        fusedrl.linear_logprobs(hidden, weight[:, :4], labels)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        fusedrl.linear_logprobs(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match=r"bias must have shape \[V\]"):
        fusedrl.linear_logprobs(hidden, weight, labels, bias=b[:3])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fusedrl.linear_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\)"):
        fusedrl.linear_logprobs(hidden, weight, torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match="labels must have shape"):
        fusedrl.linear_logprobs(hidden, weight, labels[:2])


def test_default_chunk_size():
    """About 128 MiB of logits per chunk, never fewer than 512 tokens (GEMM throughput), at most N."""
    from fusedrl.linear import default_chunk_size

    assert default_chunk_size(4096, 32000, torch.float32) == 128 * 2**20 // (32000 * 4)  # 1048 tokens
    assert default_chunk_size(4096, 32000, torch.bfloat16) == 2097
    assert default_chunk_size(4096, 151936, torch.float32) == 512  # 128 MiB would be 220 tokens
    assert default_chunk_size(300, 151936, torch.float32) == 300
    assert default_chunk_size(0, 151936, torch.float32) == 1


PEAK = r"""
import sys, torch, fusedrl
N, H, V = int(sys.argv[1]), 64, 32000
torch.manual_seed(0)
hidden = torch.randn(N, H, requires_grad=True); weight = torch.randn(V, H) / 8
weight.requires_grad_(True); labels = torch.randint(0, V, (N,))
def status(field):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":")))
small = fusedrl.linear_logprobs(hidden[:16], weight, labels[:16], chunk_size=256); small.sum().backward()
hidden.grad = weight.grad = None
base = status("VmRSS"); open("/proc/self/clear_refs", "w").write("5")
lp, ent = fusedrl.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=256)
(lp.sum() + ent.sum()).backward()
print((status("VmHWM") - base) * 1024)
"""


def test_peak_memory_does_not_grow_with_n_times_v():
    """Peak extra memory (RSS over the inputs) at N=1024 and N=8192 with V=32000, chunk 256: the
    difference is O(N x H) (hidden's gradient and O(N) statistics), far below one more [N, V]."""
    peaks = []
    for N in (1024, 8192):
        out = subprocess.run([sys.executable, "-c", PEAK, str(N)], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert out.returncode == 0, out.stderr
        peaks.append(int(out.stdout.strip().splitlines()[-1]))
    grew = peaks[1] - peaks[0]
    one_more_logits = (8192 - 1024) * 32000 * 4  # what an unchunked path would add: 917 MB
    assert grew < 0.05 * one_more_logits, (peaks, grew)
    assert peaks[1] < 2 * 256 * 32000 * 4 + 64 * 2**20, peaks  # about one chunk (+ its gradient) and slack
